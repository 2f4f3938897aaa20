"""TransformerConfig: every shape and option of the GPT model in one plain dataclass.

Field checks that need no context run when the config is made; `validate(tp_size)` adds the
ones that depend on the tensor-parallel size, and GPTModel calls it before building anything.
Every error names the bad value and how to fix it.
"""

import dataclasses
from dataclasses import dataclass

import torch

ACTIVATIONS = ("gelu", "swiglu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
ATTENTION_BACKENDS = ("sdpa", "explicit")
PARAMS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {field} {value!r}: choose one of {', '.join(repr(a) for a in allowed)}")


@dataclass
class TransformerConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # the true vocabulary; the embedding is padded past it (see padded_vocab_size)
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    max_position_embeddings: int = 1024  # longest sequence the model accepts
    hidden_dropout: float = 0.1  # embeddings and both residual branches
    attention_dropout: float = 0.1  # attention probabilities
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # "gelu" (tanh form, GPT-2) or "swiglu" (Llama)
    normalization: str = "LayerNorm"  # or "RMSNorm"
    position_embedding_type: str = "learned_absolute"  # or "rope", or "none" (no positions: NoPE)
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0  # RoPE rotates the first int(head_dim * rotary_percent) dims of each head
    num_query_groups: int | None = None  # grouped-query attention: heads share K/V per group (None: one per head)
    kv_channels: int | None = None  # the head dim (None: hidden_size / num_attention_heads)
    apply_layernorm_1p: bool = False  # norm weights stored zero-centered, applied as 1 + weight
    add_bias_linear: bool = True  # biases on the QKV, projection and MLP linears
    tie_word_embeddings: bool = True  # the output layer reuses the word embedding matrix
    init_method_std: float = 0.02
    params_dtype: torch.dtype = torch.float32
    sequence_parallel: bool = False
    recompute_granularity: str | None = None  # None, "full" (whole layers) or "selective" (attention core)
    attention_backend: str = "sdpa"  # F.scaled_dot_product_attention, or "explicit" (ops softmax + dropout)
    make_vocab_size_divisible_by: int = 128
    # Pipeline split (model/pipeline_split.py): None = an even share for the first/last stage.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None

    def __post_init__(self):
        if isinstance(self.params_dtype, str):
            _choice("params_dtype", self.params_dtype, tuple(PARAMS_DTYPES))
            self.params_dtype = PARAMS_DTYPES[self.params_dtype]
        _choice("params_dtype", self.params_dtype, tuple(PARAMS_DTYPES.values()))
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size",
                     "max_position_embeddings", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.layernorm_epsilon <= 0:
            raise ValueError(f"layernorm_epsilon must be > 0, got {self.layernorm_epsilon!r}")
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _choice("recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}: "
                f"choose a head count that divides {self.hidden_size}, or give kv_channels (the head dim)"
            )
        if self.kv_channels is not None and self.kv_channels < 1:
            raise ValueError(f"kv_channels must be a positive integer, got {self.kv_channels!r}")
        groups = self.query_groups
        if not isinstance(groups, int) or groups < 1 or self.num_attention_heads % groups != 0:
            raise ValueError(f"num_query_groups {groups!r} must be a positive divisor of num_attention_heads "
                             f"{self.num_attention_heads}: each group shares one key/value head")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {self.rotary_percent!r}")
        if self.position_embedding_type == "rope" and self.rotary_dim % 2 != 0:
            raise ValueError(
                f"rotary embeddings need an even number of rotated dims, got int(head dim {self.head_dim} x "
                f"rotary_percent {self.rotary_percent}) = {self.rotary_dim}: change the head dim or rotary_percent"
            )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads: num_query_groups, or one per attention head."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def attention_width(self) -> int:
        """Width of the queries and of the attention output (linear_proj's input): heads x head dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of the keys (and of the values): one head dim per key/value group."""
        return self.query_groups * self.head_dim

    @property
    def qkv_width(self) -> int:
        """Width of the fused QKV projection: the queries, keys and values of every group."""
        return self.attention_width + 2 * self.kv_width

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    def validate(self, tp_size: int) -> None:
        """Checks that depend on the tensor-parallel size."""
        if tp_size < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {tp_size}")
        if self.num_attention_heads % tp_size != 0:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by the tensor-parallel size "
                f"{tp_size}: each rank must hold whole heads; choose a TP size that divides {self.num_attention_heads}"
            )
        if self.query_groups % tp_size != 0:
            raise ValueError(
                f"num_query_groups {self.query_groups} is not divisible by the tensor-parallel size {tp_size}: "
                f"each rank must hold whole key/value groups; choose a TP size that divides {self.query_groups}"
            )
        if self.ffn_hidden_size % tp_size != 0:
            raise ValueError(
                f"ffn_hidden_size {self.ffn_hidden_size} is not divisible by the tensor-parallel size {tp_size}: "
                f"choose an ffn_hidden_size that is a multiple of {tp_size}"
            )
        padded = self.padded_vocab_size(tp_size)
        if padded % tp_size != 0:  # cannot happen with the padding rule; guards a future change to it
            raise ValueError(f"padded vocabulary {padded} is not divisible by the tensor-parallel size {tp_size}")

    def validate_sequence_length(self, seq_length: int, tp_size: int) -> None:
        if seq_length > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_length} is longer than max_position_embeddings {self.max_position_embeddings}: "
                f"use sequences of at most {self.max_position_embeddings} tokens or raise max_position_embeddings"
            )
        if self.sequence_parallel and seq_length % tp_size != 0:
            raise ValueError(
                f"sequence length {seq_length} is not divisible by the tensor-parallel size {tp_size}, which "
                f"sequence parallelism needs: use a multiple of {tp_size} or turn sequence_parallel off"
            )

    def linear_kwargs(self) -> dict:
        """Keyword arguments shared by the layers' column- and row-parallel linears (GPTModel initializes them)."""
        return dict(bias=self.add_bias_linear, sequence_parallel=self.sequence_parallel,
                    params_dtype=self.params_dtype, perform_initialization=False)

    @staticmethod
    def defer_residual_bias(tp_size: int) -> bool:
        """Whether the projections into the residual stream (attention output, fc2) hand their bias back.

        Their bias must be added after the TP all-reduce, so with TP > 1 it goes into the fused
        bias_dropout_add; with TP = 1 there is no reduction and the GEMM adds it at no cost (a
        separate pass over the activations measured ~1% of a training step on CPU).
        """
        return tp_size > 1

    def padded_vocab_size(self, tp_size: int) -> int:
        """The vocabulary rounded up to a multiple of make_vocab_size_divisible_by * tp_size."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple

    def to_dict(self) -> dict:
        """A JSON-ready dict (params_dtype as its name); `from_dict` reverses it."""
        out = dataclasses.asdict(self)
        out["params_dtype"] = next(name for name, dtype in PARAMS_DTYPES.items() if dtype == self.params_dtype)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig option(s) {unknown}: valid options are {sorted(known)}")
        return cls(**values)
