"""Pre-norm transformer layer and the block of layers with its final norm.

    x = x + dropout(attention(norm(x)))
    x = x + dropout(mlp(norm(x)))

Residual branches end in `ops.bias_dropout_add`, which adds the bias the row-parallel
projection deferred past its all-reduce (TP > 1; at TP = 1 the GEMM adds it), drops out and
adds the residual in one op.
"""

import torch
from torch import nn

from megatronish import ops
from megatronish.model.attention import ParallelAttention
from megatronish.model.config import TransformerConfig
from megatronish.model.mlp import ParallelMLP
from megatronish.model.norm import Norm
from megatronish.tensor_parallel import TP_RNG_STREAM, checkpoint


def hidden_dropout_stream(config: TransformerConfig) -> str | None:
    """The random stream for dropout on the residual stream (the rng_stream of the dropout ops).

    Without sequence parallelism the residual stream is replicated across TP ranks and all
    of them must draw the same mask (the default stream, seeded alike on every rank). With it,
    each rank holds a different sequence shard and draws from its own per-TP-rank stream.
    """
    return TP_RNG_STREAM if config.sequence_parallel else None


def make_norm(config: TransformerConfig) -> Norm:
    return Norm(config.hidden_size, config.normalization, config.layernorm_epsilon, config.params_dtype,
                config.sequence_parallel, config.apply_layernorm_1p)


class TransformerLayer(nn.Module):
    def __init__(self, config: TransformerConfig, tp_group):
        super().__init__()
        self.config = config
        self.input_layernorm = make_norm(config)
        self.self_attention = ParallelAttention(config, tp_group)
        self.pre_mlp_layernorm = make_norm(config)
        self.mlp = ParallelMLP(config, tp_group)

    def forward(self, hidden_states: torch.Tensor, rotary=None, inference_context=None) -> torch.Tensor:
        dropout = self.config.hidden_dropout
        if self.config.sequence_parallel:
            attention_out, attention_bias = self.self_attention(self.input_layernorm(hidden_states), rotary,
                                                                inference_context=inference_context)
        else:
            # Attention wants its input batch-first. Transposing before the norm (which works per token, so
            # it commutes) rather than after it hands the norm's backward a contiguous gradient: a copy less.
            attention_out, attention_bias = self.self_attention(
                self.input_layernorm(hidden_states.transpose(0, 1).contiguous()), rotary, batch_first=True,
                inference_context=inference_context)
        stream = hidden_dropout_stream(self.config)
        hidden_states = ops.bias_dropout_add(attention_out, attention_bias, hidden_states, dropout, self.training, stream)
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return ops.bias_dropout_add(mlp_out, mlp_bias, hidden_states, dropout, self.training, stream)


class TransformerBlock(nn.Module):
    """The layers numbered `layer_numbers` (all of them by default), keyed by their global number so that a
    layer keeps its name (`layers.<i>.`) whichever pipeline stage holds it; the final norm on the last stage."""

    def __init__(self, config: TransformerConfig, tp_group, layer_numbers: range | None = None,
                 post_process: bool = True):
        super().__init__()
        self.config = config
        numbers = range(config.num_layers) if layer_numbers is None else layer_numbers
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, tp_group) for i in numbers})
        self.final_layernorm = make_norm(config) if post_process else None

    def forward(self, hidden_states: torch.Tensor, rotary=None, inference_context=None) -> torch.Tensor:
        full_recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        for layer in self.layers.values():
            if full_recompute:
                # Keep only each layer's input; backward reruns the layer with the same dropout masks.
                hidden_states = checkpoint(layer, False, hidden_states, rotary)
            else:
                hidden_states = layer(hidden_states, rotary, inference_context)
        return hidden_states if self.final_layernorm is None else self.final_layernorm(hidden_states)
