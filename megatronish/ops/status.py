"""Which implementation each op uses on CUDA tensors now, and why (`python -m megatronish.ops` prints it)."""

import torch

from megatronish.ops import extension

OPS = (
    "scaled_causal_softmax",
    "scaled_masked_softmax",
    "layer_norm",
    "rms_norm",
    "bias_gelu",
    "bias_swiglu",
    "bias_dropout_add",
    "apply_rotary_pos_emb",
    "cross_entropy_stats",
    "cross_entropy_backward_",
)
APEX_NORM_OPS = ("layer_norm", "rms_norm")


def kernel_status(build: bool = True) -> dict:
    """{op: "cuda kernel" | "apex ..." | "pytorch (<why>)"} for a CUDA tensor of a kernel dtype, plus
    "fused_adam". With build=True (the default) a missing extension is built now so the answer is true."""
    if not torch.cuda.is_available():
        backend = "pytorch (no CUDA device; CPU tensors always take the PyTorch path)"
    elif not extension.kernels_enabled():
        why = extension.build_failure() or f"kernels switched off: {extension.ENV_SWITCH}=0 or set_kernels_enabled(False)"
        backend = f"pytorch ({why})"
    elif (extension.load() if build else extension._module) is not None:
        backend = "cuda kernel"
    else:
        backend = f"pytorch (extension not built: {extension.build_failure() or 'not tried yet'})"
    status = {}
    for op in OPS:
        if op in APEX_NORM_OPS and backend.startswith("pytorch (extension") and extension.apex_norms() is not None:
            status[op] = "apex fused_layer_norm (when weight/bias dtypes equal the input's), else pytorch"
        else:
            status[op] = backend
    status["fused_adam"] = (
        "apex FusedAdam available (apex.optimizers)" if extension.apex_fused_adam_class() is not None
        else "not provided (apex not installed or kernels off); torch.optim.AdamW(fused=True) is the CUDA choice"
    )
    return status


def format_status(status: dict) -> str:
    width = max(len(op) for op in status)
    lines = [f"megatronish.ops (torch {torch.__version__}, CUDA {torch.version.cuda}, kernels enabled: {extension.kernels_enabled()})"]
    lines += [f"  {op:<{width}}  {backend}" for op, backend in status.items()]
    return "\n".join(lines)
