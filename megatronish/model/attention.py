"""Tensor-parallel causal self-attention, and the rotary position table it may use.

The fused QKV projection is column-parallel with its output laid out per key/value group, as
Megatron-core lays it out: [group 0: q of its heads, k, v | group 1: ... ], each block one head
dim wide. With one group per head (plain multi-head attention) that is [q k v] per head; with
grouped-query attention (fewer groups) the heads of a group share its k and v. The contiguous TP
split of the output dimension gives each rank whole groups, so attention needs no communication.
The output projection is row-parallel and sums the heads' contributions across ranks.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megatronish import ops, parallel_state
from megatronish.model.config import TransformerConfig
from megatronish.tensor_parallel import (
    TP_RNG_STREAM,
    ColumnParallelLinear,
    RowParallelLinear,
    checkpoint,
    divide,
    get_cuda_rng_tracker,
)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [s, dim / 2] in fp32 for the rotate-half convention (as Hugging Face Llama and
    Megatron); `dim` is the number of rotated dims of a head (all of them, or int(head dim x --rotary-percent))."""

    def __init__(self, dim: int, max_positions: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        device = parallel_state.get_device()
        # Buffers, not parameters: derived from the config, so not saved or trained.
        self.register_buffer("cos", angles.cos().float().to(device), persistent=False)
        self.register_buffer("sin", angles.sin().float().to(device), persistent=False)

    def forward(self, seq_length: int, position_ids: torch.Tensor | None = None):
        """The tables for positions 0..seq_length-1, or for position_ids [b, s]: [s, d/2] when one row of
        positions serves the whole batch (the fused kernel's shape), else [s, b, d/2]."""
        if position_ids is None:
            return self.cos[:seq_length], self.sin[:seq_length]
        positions = position_ids.t()
        if positions.size(1) == 1:
            positions = positions[:, 0]
        return self.cos[positions], self.sin[positions]


class ParallelAttention(nn.Module):
    def __init__(self, config: TransformerConfig, tp_group):
        super().__init__()
        self.config = config
        tp = tp_group.size()
        self.heads_per_rank = divide(config.num_attention_heads, tp, "num_attention_heads")
        self.groups_per_rank = divide(config.query_groups, tp, "num_query_groups")
        self.heads_per_group = config.num_attention_heads // config.query_groups
        self.head_dim = config.head_dim
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, config.qkv_width, gather_output=False,
                                               tp_group=tp_group, **config.linear_kwargs())
        self.linear_proj = RowParallelLinear(config.attention_width, config.hidden_size,
                                             input_is_parallel=True, skip_bias_add=config.defer_residual_bias(tp),
                                             tp_group=tp_group, **config.linear_kwargs())

    def forward(self, hidden_states: torch.Tensor, rotary=None, batch_first: bool = False, inference_context=None):
        """hidden_states [s, b, h] (or [s/tp, b, h] sequence parallel) -> (output, bias) of the same shape.

        With batch_first=True (not under sequence parallelism) the input is [b, s, h] instead; the
        output stays [s, b, h]. With an inference_context (megatronish.inference.InferenceContext) the
        new keys and values go into its KV cache and the queries attend to the cached ones its mask allows.
        """
        # Attention works batch-first: SDPA takes q, k, v as views of [b, s, np, 3, hn] memory and returns
        # its context in [b, s, np, hn] memory, the layout its CPU kernels work in. (Copying q, k and v
        # one by one into [b, np, s, hn] instead measured 1.8x slower forward + backward on CPU.)
        if self.config.sequence_parallel:  # the projection gathers the sequence first: transpose its output
            mixed = self.linear_qkv(hidden_states)[0].transpose(0, 1).contiguous()
        else:  # transpose the input, 3x narrower than the output (TransformerLayer does it before the norm)
            mixed, _ = self.linear_qkv(hidden_states if batch_first else hidden_states.transpose(0, 1).contiguous())
        b, s = mixed.shape[:2]
        per_group = self.heads_per_group
        grouped = mixed.view(b, s, self.groups_per_rank, per_group + 2, self.head_dim)
        if per_group == 1:  # a view of the projection's output, as the heads' own q k v
            query = grouped[:, :, :, 0]  # [b, s, np, hn]
        else:
            query = grouped[:, :, :, :per_group].reshape(b, s, self.heads_per_rank, self.head_dim)
        key, value = grouped[:, :, :, per_group], grouped[:, :, :, per_group + 1]  # [b, s, ng, hn]
        if rotary is not None:
            query, key = self._rotate(query, key, rotary)
        if inference_context is not None:  # the cache keeps one key/value head per group
            key, value = inference_context.store(self, key, value)
        if per_group > 1:  # each query head attends with its group's key/value head
            key, value = (t.repeat_interleave(per_group, dim=2) for t in (key, value))
        if inference_context is not None:
            context = self.core_attention(query, key, value, inference_context.attention_mask)
        elif self.config.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            context = checkpoint(self.core_attention, False, query, key, value)
        else:
            context = self.core_attention(query, key, value)
        return self.linear_proj(context)

    def _rotate(self, query, key, rotary):
        """RoPE on the first rotary_dim dims of each head (all of them unless --rotary-percent < 1); the rotary
        op takes [s, b, n, d] of any strides."""
        rotated = rotary[0].size(-1) * 2
        q_rot, k_rot = ops.apply_rotary_pos_emb(query[..., :rotated].transpose(0, 1),
                                                key[..., :rotated].transpose(0, 1), *rotary)
        q_rot, k_rot = q_rot.transpose(0, 1), k_rot.transpose(0, 1)
        if rotated == self.head_dim:
            return q_rot, k_rot
        return (torch.cat([q_rot, query[..., rotated:]], dim=-1), torch.cat([k_rot, key[..., rotated:]], dim=-1))

    def core_attention(self, query, key, value, attention_mask=None):
        """Attention of this rank's heads: q [b, s, np, hn], k and v [b, sk, np, hn] -> context [s, b, np * hn].

        Causal (sk = s) without a mask; with attention_mask (bool [b, 1, s, sk], True = attend) each
        query sees the keys its row allows (a KV cache, padded rows, token trees).

        The heads are split across TP ranks, so attention dropout draws from the per-TP-rank
        stream of the RNG tracker (a single process would draw different masks for them too);
        activation recompute restores that stream and replays the masks exactly.
        """
        b, s = query.shape[:2]
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [b, np, s, hn] views
        dropout = self.config.attention_dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.config.attention_backend == "sdpa":
            # SDPA draws its mask inside the kernel: the stream is swapped in around it (torch.compile cannot
            # trace the swap; with attention dropout, compile the explicit backend, whose mask is an op).
            with get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
                context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                         is_causal=attention_mask is None, scale=scale)
        else:
            scores = torch.matmul(query, key.transpose(-2, -1))  # [b, np, s, sk]
            if attention_mask is None:
                probs = ops.scaled_causal_softmax(scores, scale)
            else:
                probs = ops.scaled_masked_softmax(scores, ~attention_mask, scale)
            context = torch.matmul(ops.dropout(probs, dropout, dropout > 0, TP_RNG_STREAM), value)
        # [b, np, s, hn] (memory [b, s, np, hn]) -> contiguous [s, b, np * hn]: one copy, and a contiguous
        # input lets the projection add its bias inside the GEMM.
        return context.permute(2, 0, 1, 3).contiguous().view(s, b, -1)
