"""The tensor-parallel MLP: column-parallel h -> ffn, GeLU or SwiGLU, row-parallel ffn -> h."""

import torch
from torch import nn

from megatronish import ops
from megatronish.model.config import TransformerConfig
from megatronish.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class ParallelMLP(nn.Module):
    def __init__(self, config: TransformerConfig, tp_group):
        super().__init__()
        tp = tp_group.size()
        self.swiglu = config.activation == "swiglu"
        # SwiGLU's fc1 is [gate; up] stacked: stride 2 gives each rank its slice of both halves, so the
        # full weight is the same at every TP size and each rank's output chunks into (gate, up).
        # Its bias goes into the matmul (free in the GEMM on CPU and GPU alike) rather than into the
        # activation op: a separate bias pass over the widest activation measured ~10% of the MLP on CPU.
        width = 2 * config.ffn_hidden_size if self.swiglu else config.ffn_hidden_size
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, width, gather_output=False,
                                               stride=2 if self.swiglu else 1, tp_group=tp_group, **config.linear_kwargs())
        self.linear_fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, input_is_parallel=True,
                                            skip_bias_add=config.defer_residual_bias(tp), tp_group=tp_group,
                                            **config.linear_kwargs())

    def forward(self, hidden_states: torch.Tensor):
        """[s, b, h] (or a sequence shard) -> (output, bias), the bias None or left for bias_dropout_add."""
        intermediate, _ = self.linear_fc1(hidden_states)
        if self.swiglu:
            intermediate = ops.bias_swiglu(intermediate, None)
        else:
            intermediate = ops.bias_gelu(intermediate, None)
        return self.linear_fc2(intermediate)
