"""LayerNorm and RMSNorm as modules over megatronish.ops (where the fused kernels plug in)."""

import torch
from torch import nn

from megatronish import ops, parallel_state
from megatronish.tensor_parallel import set_tensor_model_parallel_attributes


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the last dimension.

    With `zero_centered` (Megatron's --apply-layernorm-1p) the weight is stored as (scale - 1): it starts
    at 0 and the norm multiplies by 1 + weight. The parameters are replicated on every TP rank. Under sequence parallelism each rank
    normalizes only its sequence shard, so its gradients are partial sums: they carry
    `sequence_parallel = True` and are all-reduced by `allreduce_sequence_parallel_grads`.
    """

    def __init__(self, hidden_size: int, normalization: str, eps: float, params_dtype: torch.dtype,
                 sequence_parallel: bool, zero_centered: bool = False):
        super().__init__()
        self.rms, self.eps, self.zero_centered = normalization == "RMSNorm", eps, zero_centered
        device = parallel_state.get_device()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype, device=device))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype, device=device))
        for param in (self.weight, self.bias):
            if param is not None:
                set_tensor_model_parallel_attributes(param, False, 0)
                param.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1.0 if self.zero_centered else self.weight  # --apply-layernorm-1p
        if self.rms:
            return ops.rms_norm(x, weight, self.eps)
        return ops.layer_norm(x, weight, self.bias, self.eps)
