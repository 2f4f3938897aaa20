"""Fused ops: one function per op, a CUDA kernel (kernels/) and a plain PyTorch path with the same semantics.

Callers never check for CUDA: CPU tensors take the PyTorch path; CUDA tensors take the kernel unless
MEGATRONISH_KERNELS=0 / set_kernels_enabled(False), or the extension failed to build (one warning says why).
A distributed job calls initialize_kernels() on every rank first, so that all ranks take the same path.
"""

from megatronish.ops.extension import apex_fused_adam_class, initialize_kernels, kernels_enabled, set_kernels_enabled
from megatronish.ops.functional import (
    apply_rotary_pos_emb,
    bias_dropout_add,
    bias_gelu,
    bias_swiglu,
    cross_entropy_backward_,
    cross_entropy_stats,
    dropout,
    layer_norm,
    rms_norm,
    scaled_causal_softmax,
    scaled_masked_softmax,
)
from megatronish.ops.status import kernel_status

__all__ = [
    "apex_fused_adam_class",
    "apply_rotary_pos_emb",
    "bias_dropout_add",
    "bias_gelu",
    "bias_swiglu",
    "cross_entropy_backward_",
    "cross_entropy_stats",
    "dropout",
    "initialize_kernels",
    "kernel_status",
    "kernels_enabled",
    "layer_norm",
    "rms_norm",
    "scaled_causal_softmax",
    "scaled_masked_softmax",
    "set_kernels_enabled",
]
