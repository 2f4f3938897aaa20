"""GPTModel: embeddings, the transformer block and the (tied) output layer, on TP layers.

    token ids [b, s] -> word (+ learned position) embeddings -> dropout -> [s, b, h]
    -> transformer block -> output layer -> vocab-parallel logits [b, s, V_padded / tp]
                                         or per-token losses [b, s] (fp32) with labels

Under pipeline parallelism each stage builds only its part (model/pipeline_split.py); layers
keep their global numbers in their names.

Initialization is layout-invariant: every parameter's full value is drawn from a generator
seeded by (seed, parameter name), then each rank keeps its slice. So the model does not depend
on the TP or PP size or on the order in which its parts are built.
"""

import hashlib
import warnings

import torch
from torch import nn

from megatronish import ops, parallel_state
from megatronish.parallel_layout import ParallelLayout
from megatronish.model.attention import RotaryEmbedding
from megatronish.model.config import TransformerConfig
from megatronish.model.pipeline_split import stage_layers
from megatronish.model.transformer import TransformerBlock, hidden_dropout_stream
from megatronish.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    init_method_normal,
    initialize_parameter,
    scaled_init_method_normal,
    set_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)


class Embedding(nn.Module):
    """Word embeddings (vocabulary split across TP) plus learned position embeddings, then dropout.

    Returns [s, b, h]; under sequence parallelism each rank gets its own sequence shard
    [s/tp, b, h] (the word embeddings are reduce-scattered instead of all-reduced, and only the
    shard's positions are looked up, so the position table's gradient is partial per rank).
    """

    def __init__(self, config: TransformerConfig, padded_vocab_size: int, tp_group):
        super().__init__()
        self.config, self.tp_group = config, tp_group
        self.word_embeddings = _word_embeddings(config, padded_vocab_size, tp_group)
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                    dtype=config.params_dtype, device=parallel_state.get_device())
            set_tensor_model_parallel_attributes(self.position_embeddings.weight, False, 0)
            self.position_embeddings.weight.sequence_parallel = config.sequence_parallel
        else:
            self.position_embeddings = None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        sequence_parallel = self.config.sequence_parallel
        # Looking up the transposed ids gives [s, b, h] directly, without a copy of the activations.
        embeddings = self.word_embeddings(input_ids if sequence_parallel else input_ids.t().contiguous())
        if self.position_embeddings is not None:
            first, length = self._local_positions(input_ids.size(1))
            if position_ids is None:  # the same positions for every sample: looked up once, broadcast over the batch
                # (through the module, not a slice of its weight: hooks on it, e.g. the overlapped parameter
                # gather's, must see the read)
                rows = torch.arange(first, first + length, device=input_ids.device)
                positions = self.position_embeddings(rows).unsqueeze(1)
            else:
                positions = self.position_embeddings(position_ids[:, first:first + length].t())
            embeddings = embeddings + positions
        return ops.dropout(embeddings, self.config.hidden_dropout, self.training, hidden_dropout_stream(self.config))

    def _local_positions(self, seq_length: int) -> tuple[int, int]:
        """The [first, first + length) sequence positions this rank embeds."""
        if not self.config.sequence_parallel:
            return 0, seq_length
        length = seq_length // self.tp_group.size()
        return self.tp_group.rank() * length, length


class TiedEmbeddingCopy(nn.Module):
    """The last pipeline stage's copy of tied word embeddings (the first stage holds the original).

    Named like the original (`embedding.word_embeddings.weight`), so it gets the same initial value
    and the same checkpoint key; the two copies' gradients are summed over the embedding group
    (first + last stage) before each step, so they stay equal, as in Megatron.
    """

    def __init__(self, config: TransformerConfig, padded_vocab_size: int, tp_group):
        super().__init__()
        self.word_embeddings = _word_embeddings(config, padded_vocab_size, tp_group)


def _word_embeddings(config: TransformerConfig, padded_vocab_size: int, tp_group) -> VocabParallelEmbedding:
    return VocabParallelEmbedding(
        padded_vocab_size, config.hidden_size, params_dtype=config.params_dtype,
        reduce_scatter_embeddings=config.sequence_parallel, unpadded_num_embeddings=config.vocab_size,
        perform_initialization=False, tp_group=tp_group)


class GPTModel(nn.Module):
    """A GPT, or the part of it that one pipeline stage holds.

    `layout` (default: the current one, megatronish.parallel_state) gives the TP group the weights
    are split over and this rank's pipeline stage; `vp_stage` picks the model chunk of an
    interleaved pipeline. The first stage (`pre_process`) embeds the tokens; the last
    (`post_process`) applies the final norm, the output layer and the loss; the stages between
    take their input through `set_input_tensor` (the schedules in megatronish.pipeline_parallel
    do that) and return hidden states [s, b, h].
    """

    def __init__(self, config: TransformerConfig, seed: int = 1234, layout: ParallelLayout | None = None,
                 vp_stage: int | None = None):
        """Build this stage's part of the model; `seed` (with each parameter's name) fixes the initial weights."""
        super().__init__()
        self.layout = layout or parallel_state.get_layout()
        self.tp_group = self.layout.tp_group
        tp, chunks = self.layout.tp, self.layout.dims.num_model_chunks
        config.validate(tp)
        vp_stage = 0 if vp_stage is None else vp_stage
        if not 0 <= vp_stage < chunks:
            raise ValueError(f"vp_stage {vp_stage} is outside the {chunks} model chunk(s) of the layout "
                             f"{self.layout.describe()}")
        self.config, self.vp_stage = config, vp_stage
        self.pre_process = self.layout.is_first_stage and vp_stage == 0
        self.post_process = self.layout.is_last_stage and vp_stage == chunks - 1
        self.padded_vocab_size = config.padded_vocab_size(tp)
        self.input_tensor = None  # a later stage's input (set_input_tensor)

        self.embedding = Embedding(config, self.padded_vocab_size, self.tp_group) if self.pre_process else None
        self.rotary = None
        if config.position_embedding_type == "rope":
            self.rotary = RotaryEmbedding(config.rotary_dim, config.max_position_embeddings, config.rotary_base)
        layers = stage_layers(config, self.layout.pp, self.layout.pp_rank, self.layout.dims.virtual_pp, vp_stage)
        self.decoder = TransformerBlock(config, self.tp_group, layers, post_process=self.post_process)
        self.output_layer = None
        if self.post_process:
            if config.tie_word_embeddings and not self.pre_process:
                self.embedding = TiedEmbeddingCopy(config, self.padded_vocab_size, self.tp_group)
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, self.padded_vocab_size, bias=False, gather_output=False,
                sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
                perform_initialization=False, skip_weight_param_allocation=config.tie_word_embeddings,
                tp_group=self.tp_group)
            if not config.tie_word_embeddings:
                self.output_layer.weight.unpadded_rows = config.vocab_size  # padding rows stay zero
            # How many of this rank's vocabulary rows are real (not padding); may be 0 on the last ranks.
            rows_per_rank = self.padded_vocab_size // tp
            self._real_vocab_rows = min(max(0, config.vocab_size - self.layout.tp_rank * rows_per_rank), rows_per_rank)
        if config.tie_word_embeddings and self.layout.pp > 1 and self.embedding is not None:
            self.embedding.word_embeddings.weight.shared_embedding = True  # both copies: summed over the embedding group
        initialize_weights(self, seed)

    def set_input_tensor(self, input_tensor) -> None:
        """The hidden states [s, b, h] this stage starts from (a list of one is accepted, as in Megatron)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inference_context=None) -> torch.Tensor:
        """input_ids [b, s] -> vocab-parallel logits [b, s, V_padded / tp], or fp32 losses [b, s] given labels [b, s].

        position_ids [b, s] default to 0..s-1. With an inference_context (megatronish.inference.
        InferenceContext, prepared for these s tokens) the layers keep their keys and values in its
        KV cache and attend to the cached tokens; position_ids then say where the tokens sit in their
        sequences. Logit columns past config.vocab_size are padding; the loss excludes them. A stage
        other than the last returns its hidden states [s, b, h] (a sequence shard under sequence
        parallelism).
        """
        self._check_inputs(input_ids, position_ids, labels, inference_context)
        if self.pre_process:
            hidden_states = self.embedding(input_ids, position_ids)
        elif self.input_tensor is None:
            raise RuntimeError("this pipeline stage takes its input from the previous stage: call "
                               "set_input_tensor(hidden_states) first (the pipeline schedules do)")
        else:
            hidden_states = self.input_tensor
        rotary = self.rotary(input_ids.size(1), position_ids) if self.rotary is not None else None
        hidden_states = self.decoder(hidden_states, rotary, inference_context)
        if not self.post_process:
            return hidden_states
        if inference_context is not None and inference_context.logits_at is not None:
            # Only the tokens whose successor is wanted (one per row, as each prompt's last) reach the output layer.
            rows = torch.arange(hidden_states.size(1), device=hidden_states.device)
            hidden_states = hidden_states[inference_context.logits_at, rows].unsqueeze(0)
        if self.config.tie_word_embeddings:
            output_weight = self.embedding.word_embeddings.weight
        else:
            output_weight = self.output_layer.weight
        if labels is None:
            logits, _ = self.output_layer(hidden_states, output_weight)  # [s, b, V_padded / tp]
            return logits.transpose(0, 1).contiguous()
        rows = loss_vocab_rows(self._real_vocab_rows, output_weight.size(0), hidden_states.device)
        logits, _ = self.output_layer(hidden_states, output_weight[:rows])
        losses = vocab_parallel_cross_entropy(logits, labels.t(), vocab_size=self.config.vocab_size,
                                              partition_vocab_size=output_weight.size(0), tp_group=self.tp_group)
        return losses.t().contiguous()

    def compile(self, *args, **kwargs) -> None:
        """torch.compile this model in place (nn.Module.compile: parameter names and state dict unchanged).

        Needs real vocabulary on every TP rank: on a rank holding only padding the loss does not depend on
        the rank's hidden states, the compiler moves what only backward needs (the layers' collectives
        and dropout draws) out of that rank's forward graph, and the ranks fall out of step.
        """
        tp = self.layout.tp
        if self.post_process and not _vocab_on_every_rank(self.config, tp):
            raise ValueError(
                f"torch.compile needs real vocabulary on every tensor-parallel rank, but vocab_size "
                f"{self.config.vocab_size} padded to {self.padded_vocab_size} leaves the last rank(s) of TP {tp} "
                f"only padding: lower make_vocab_size_divisible_by ({self.config.make_vocab_size_divisible_by}) "
                "or the TP size, or run eagerly")
        if self.config.attention_dropout > 0 and self.config.attention_backend == "sdpa":
            warnings.warn(
                "attention dropout inside SDPA draws from the per-TP-rank stream, which a compiled graph cannot "
                "swap in: the attention core runs outside the graph (a graph break per layer). Use "
                "attention_backend='explicit' (its dropout is an op of the graph) or attention_dropout=0",
                stacklevel=2)
        super().compile(*args, **kwargs)

    def _check_inputs(self, input_ids, position_ids, labels, inference_context) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, sequence] token ids, got shape {list(input_ids.shape)}")
        self.config.validate_sequence_length(input_ids.size(1), self.layout.tp)
        for name, tensor in (("position_ids", position_ids), ("labels", labels)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {list(input_ids.shape)}, "
                                 f"got {list(tensor.shape)}")
        if inference_context is not None and self.config.sequence_parallel:
            raise ValueError("a KV-cached forward cannot split the sequence across TP ranks: build the model with "
                             "sequence_parallel=False for inference (the weights are the same; "
                             "megatronish.inference.without_sequence_parallel(model) shares them)")


def _vocab_on_every_rank(config: TransformerConfig, tp: int) -> bool:
    """Whether every TP rank holds some real (unpadded) vocabulary rows."""
    return config.vocab_size > (tp - 1) * (config.padded_vocab_size(tp) // tp)


def loss_vocab_rows(real_rows: int, padded_rows: int, device: torch.device) -> int:
    """How many of this rank's output-weight rows the output GEMM multiplies when the loss follows.

    The loss excludes the padding columns either way; the choice is only about speed, per device:
    - CUDA: every row. The padded width is a multiple of 128 / tp (and of 16-byte vectors), which keeps
      the GEMM on its aligned tensor-core tiles and the cross-entropy kernels on packed loads; the odd
      true width (50257 for GPT-2) puts both on their slow unaligned paths.
    - CPU: only the real rows. There the GEMM costs what its columns cost, so the padding would be
      computed for nothing (vocab 65 padded to 128 halves the output GEMMs of nanoGPT's CPU config).
    """
    return padded_rows if device.type == "cuda" else real_rows


def _name_seed(seed: int, name: str) -> int:
    """A generator seed that depends only on the model seed and the parameter name (stable across runs)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialize_weights(model: GPTModel, seed: int) -> None:
    """GPT-2 init: N(0, std) weights, N(0, std / sqrt(2 L)) for the two projections into the residual
    stream, zero biases, unit norm weights. Each full value comes from its own (seed, name) generator."""
    config = model.config
    normal = init_method_normal(config.init_method_std)
    scaled = scaled_init_method_normal(config.init_method_std, config.num_layers)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.zero_()
        elif "layernorm" in name:
            param.fill_(0.0 if config.apply_layernorm_1p else 1.0)  # 1p: stored as weight - 1
        else:
            method = scaled if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else normal
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_name_seed(seed, name))
                initialize_parameter(param, method, model.tp_group)
