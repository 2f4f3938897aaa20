"""Activation memory: the bytes autograd holds for backward, per micro-batch and at a stage's peak.

The structure is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", table 2): per layer and micro-batch, with s sequence, b micro-batch, h hidden, a heads,
t TP ranks, their 16-bit model holds sbh (34 + 5 as/h) bytes without recompute, sbh (10 + 24/t
+ 5 as/(h t)) with TP, sbh/t (34 + 5 as/h) with sequence parallelism too; selective recompute
drops the 5 as/h term (the attention core's softmax, its dropout mask and output), full
recompute keeps only each layer's input, 2 sbh. A pipeline stage holds that for each
micro-batch in flight (1F1B: p - r on stage r; interleaved: Megatron's 1 + (p-1)/(p v) factor).

The constants below describe *this* model, op by op, as its code saves tensors (each line names
the op; the planner's tests compare them with SavedTensorBytes on CPU within 10%). They differ
from the paper's where our code differs:
  - On the PyTorch path (CPU) every fused op computes in fp32 (megatronish/ops/torch_impl.py): the
    norms keep an fp32 input, GeLU an fp32 input and output. Dropout keeps a bool mask (drawn by
    megatronish::dropout_keep_mask). On CUDA the kernels (ops/cuda_impl.py) keep inputs in the model
    dtype, and the fused bias-dropout-add regenerates its mask from a seed.
  - Attention is torch's scaled_dot_product_attention: a flash-style kernel that keeps q, k, v
    (one fused QKV buffer), its output and the fp32 log-sum-exp, never the s x s scores. Only on CPU
    with attention dropout does torch fall back to the math path, which keeps three s x s tensors
    (probabilities, mask, dropped probabilities); the `explicit` backend keeps the fp32 exponentials
    and the probabilities. So "selective recompute" saves little on the default path here.
  - Under sequence parallelism the column-parallel linears (QKV, fc1, output layer) keep the
    all-gathered input (s b h, not s b h / t as Megatron, which gathers it again in backward); the
    norms, dropout masks and the residual stream are split.
  - The loss keeps the logits (fp32 on CPU, the model dtype on CUDA) of this rank's vocabulary
    rows: on CPU only the real rows (GPTModel.loss_vocab_rows), on CUDA the padded ones.
  - Full recompute still holds one layer's activations while that layer is recomputed in backward,
    and selective recompute one attention core's (the "transient" below): the paper leaves it out.
"""

from dataclasses import dataclass

import torch

from megatronish.model.config import TransformerConfig
from megatronish.model.pipeline_split import stage_layers
from megatronish.pipeline_parallel.schedules import model_chunk_id, num_warmup_microbatches

FP32, INT64, BOOL = 4, 8, 1


@dataclass(frozen=True)
class ActivationBytes:
    """Per micro-batch: what stays held until its backward (the layers', the embedding's, the output layer
    and loss's), and what its backward holds on top for a moment (recomputed activations). Backward frees
    the output's first, before any layer is recomputed."""
    layers: int = 0
    embedding: int = 0
    output: int = 0
    transient: int = 0

    @property
    def extras(self) -> int:
        return self.embedding + self.output

    @property
    def held(self) -> int:
        return self.layers + self.extras


@dataclass(frozen=True)
class _Shape:
    n: int         # tokens of a micro-batch, s b
    n_res: int     # residual-stream rows on this rank: s b / t under sequence parallelism, else s b
    s: int
    b: int
    h: int
    qt: int        # attention_width / t: this rank's query (and attention output) width
    qkvt: int      # qkv_width / t: this rank's slice of the fused QKV projection
    grouped: bool  # grouped-query attention: fewer key/value heads than query heads
    ft: int        # ffn / t
    at: int        # heads / t
    e: int         # bytes of the model dtype
    cuda: bool     # the CUDA kernels and attention kernels run (else the PyTorch path of megatronish.ops)


def _shape(config: TransformerConfig, seq_length: int, micro_batch_size: int, tp: int, device: str) -> _Shape:
    n = seq_length * micro_batch_size
    return _Shape(n=n, n_res=n // tp if config.sequence_parallel else n, s=seq_length, b=micro_batch_size,
                  h=config.hidden_size, qt=config.attention_width // tp, qkvt=config.qkv_width // tp,
                  grouped=config.query_groups != config.num_attention_heads, ft=config.ffn_hidden_size // tp,
                  at=config.num_attention_heads // tp, e=torch.empty((), dtype=config.params_dtype).element_size(),
                  cuda=device == "cuda")


def _norm(c: _Shape, config: TransformerConfig) -> int:
    """A norm over the residual rows: its input (fp32 on the PyTorch path) and per-row statistics."""
    rms = config.normalization == "RMSNorm"
    if c.cuda:
        return c.n_res * c.h * c.e + (1 if rms else 2) * c.n_res * FP32
    upcast_weights = (1 if rms else 2) * c.h * FP32 if c.e != FP32 else 0  # weight.float() of a bf16/fp16 norm
    if rms:  # x, 1/rms and their product (for the weight's gradient)
        return 2 * c.n_res * c.h * FP32 + c.n_res * FP32 + upcast_weights
    return c.n_res * c.h * FP32 + 2 * c.n_res * FP32 + upcast_weights  # x, mean, 1/std


def _attention_core(c: _Shape, config: TransformerConfig) -> tuple[int, int]:
    """(bytes the core keeps beyond q, k, v, whether q, k, v are kept as the fused QKV buffer)."""
    scores = c.b * c.at * c.s * c.s
    if config.attention_backend == "explicit":
        # copies of q, k^T, v for the batched matmuls; fp32 exponentials, probabilities; the causal mask,
        # row sums; with dropout its bool mask (ops.dropout)
        dropout_mask = scores * BOOL if config.attention_dropout > 0 else 0
        exponentials = 0 if c.cuda else scores * FP32 + c.s * c.s * BOOL + c.b * c.at * c.s * (FP32 + BOOL)
        return 3 * c.n * c.qt * c.e + scores * c.e + exponentials + dropout_mask, False
    if config.attention_dropout > 0 and not c.cuda:
        # the math path on CPU, in fp32 whatever the model dtype: copies of q (scaled), k^T, v and three s x s tensors
        return 3 * c.n * c.qt * FP32 + 3 * scores * FP32, False
    return c.n * c.qt * c.e + c.b * c.at * c.s * FP32, True  # flash-style: the output and the log-sum-exp


def layer_activation_bytes(config: TransformerConfig, seq_length: int, micro_batch_size: int, tp: int,
                           device: str = "cpu") -> ActivationBytes:
    """One transformer layer, one micro-batch, one TP rank."""
    c = _shape(config, seq_length, micro_batch_size, tp, device)
    rotary = config.position_embedding_type == "rope"
    core, keeps_qkv_buffer = _attention_core(c, config)
    # Flash-style attention on rotated q, k writes its output in the layout the projection wants: no copy.
    proj_input = 0 if (rotary and keeps_qkv_buffer) else c.n * c.qt * c.e
    if not c.grouped:
        qkv_buffer = c.n * c.qkvt * c.e
        rope = 2 * c.n * c.qt * c.e if rotary else 0  # rotated q and k
    else:
        # The core gets q (rotated, or copied out of the group-interleaved buffer) and k, v repeated once per
        # query head: the rotated k is dropped once repeated, and the buffer is not what the core keeps.
        # Without RoPE one more query-width copy stays (measured, tests/planner/test_measured_memory.py).
        rope = 0
        qkv_buffer = (3 if rotary else 4) * c.n * c.qt * c.e if keeps_qkv_buffer else 0
    dropout_masks = 2 * c.n_res * c.h * BOOL if config.hidden_dropout > 0 and not c.cuda else 0
    if c.cuda:
        mlp = (3 if config.activation == "swiglu" else 2) * c.n * c.ft * c.e  # kernel input (gate+up) and output
    elif config.activation == "swiglu":  # fp32 gate+up, silu(gate), product; fc2's input
        mlp = c.n * c.ft * (3 * FP32 + (FP32 if c.e == FP32 else c.e))
    else:  # fp32 input and output of GeLU; fc2's input in the model dtype unless that is fp32 (the same tensor)
        mlp = c.n * c.ft * (2 * FP32 + (0 if c.e == FP32 else c.e))
    linear_inputs = 2 * c.n * c.h * c.e  # QKV and fc1 keep their (all-gathered) input
    without_core = 2 * _norm(c, config) + linear_inputs + rope + proj_input + dropout_masks + mlp
    full = without_core + core + (qkv_buffer if keeps_qkv_buffer else 0)
    if config.recompute_granularity == "full":  # the layer's input; the whole layer again while recomputed
        # (under sequence parallelism the recomputed first norm keeps that same input, unless it upcasts a copy)
        shared = c.n_res * c.h * c.e if config.sequence_parallel and (c.cuda or c.e == FP32) else 0
        return ActivationBytes(layers=c.n_res * c.h * c.e, transient=full - shared)
    if config.recompute_granularity == "selective":  # the core's inputs (q, k, v) stay; its insides are recomputed
        context = c.n * c.qt * c.e if rotary and keeps_qkv_buffer else 0  # now a copy again: the core's output is gone
        return ActivationBytes(layers=without_core + qkv_buffer + context, transient=core)
    return ActivationBytes(layers=full)


def embedding_activation_bytes(config: TransformerConfig, seq_length: int, micro_batch_size: int, tp: int,
                               device: str = "cpu") -> int:
    """The first stage's extras: token ids, the vocabulary-range mask (TP > 1), the embedding dropout's mask."""
    c = _shape(config, seq_length, micro_batch_size, tp, device)
    mask = c.n * BOOL if tp > 1 else 0
    dropout = c.n_res * c.h * BOOL if config.hidden_dropout > 0 else 0  # ops.dropout's bool mask
    return c.n * INT64 + mask + dropout


def output_activation_bytes(config: TransformerConfig, seq_length: int, micro_batch_size: int, tp: int,
                            vocab_rows: int, device: str = "cpu") -> int:
    """The last stage's extras: the final norm, the output layer's input, the logits the loss keeps for its
    backward (`vocab_rows` of them per token), labels, log-sum-exp and the loss mask."""
    c = _shape(config, seq_length, micro_batch_size, tp, device)
    logits = c.n * vocab_rows * c.e
    return _norm(c, config) + c.n * c.h * c.e + logits + c.n * (INT64 + FP32) + c.n * FP32


def loss_vocab_rows(config: TransformerConfig, tp: int, tp_rank: int, device: str) -> int:
    """The output rows the loss multiplies on a TP rank: all padded ones on CUDA, the real ones on CPU
    (megatronish.model.gpt_model.loss_vocab_rows makes the same choice)."""
    rows = config.padded_vocab_size(tp) // tp
    if device == "cuda":
        return rows
    return min(max(0, config.vocab_size - tp_rank * rows), rows)


def chunk_activation_bytes(config: TransformerConfig, dims, pp_rank: int, vp_stage: int, seq_length: int,
                           micro_batch_size: int, device: str = "cpu", tp_rank: int = 0) -> ActivationBytes:
    """One micro-batch through one model chunk of stage `pp_rank` on TP rank `tp_rank`."""
    layer = layer_activation_bytes(config, seq_length, micro_batch_size, dims.tp, device)
    layers = len(stage_layers(config, dims.pp, pp_rank, dims.virtual_pp, vp_stage))
    embedding = output = 0
    if pp_rank == 0 and vp_stage == 0:
        embedding = embedding_activation_bytes(config, seq_length, micro_batch_size, dims.tp, device)
    if pp_rank == dims.pp - 1 and vp_stage == dims.num_model_chunks - 1:
        output = output_activation_bytes(config, seq_length, micro_batch_size, dims.tp,
                                         loss_vocab_rows(config, dims.tp, tp_rank, device), device)
    return ActivationBytes(layers=layers * layer.layers, embedding=embedding, output=output,
                           transient=layer.transient if layers else 0)


@dataclass(frozen=True)
class PeakActivations:
    layers: int            # bytes of transformer-layer activations at the peak (recomputed ones included)
    extras: int            # embedding / loss activations at the peak
    in_flight: int         # micro-batches (of all chunks) held at the peak

    @property
    def total(self) -> int:
        return self.layers + self.extras


def peak_activations(chunks: list[ActivationBytes], p: int, r: int, m: int) -> PeakActivations:
    """The most bytes stage r holds during an iteration of m micro-batches, following its schedule's order:
    warm-up forwards, then one forward and one backward at a time (then the remaining backwards)."""
    v = len(chunks)
    total = m * v
    warmup = num_warmup_microbatches(p, r, m, v) if p > 1 else 0
    order = [("F", k) for k in range(warmup)]
    # The steady phase repeats with period p v (the chunks of forward and backward k cycle with it): one period
    # shows its peak; the backwards that drain the pipeline only free.
    steady = min(total - warmup, p * v + 1)
    for i in range(steady):
        order += [("F", warmup + i), ("B", i)]
    if steady == total - warmup:  # all of it simulated: the drain's first backwards (each recomputes a chunk)
        order += [("B", k) for k in range(steady, min(total, steady + v))]
    held, layers, extras = 0, 0, 0  # micro-batches and their bytes held now
    best = PeakActivations(0, 0, 0)
    for kind, k in order:
        chunk = chunks[model_chunk_id(k, p, v, forward=kind == "F")]
        if kind == "F":
            held, layers, extras = held + 1, layers + chunk.layers, extras + chunk.extras
            now = PeakActivations(layers, extras, held)
        else:  # its loss and output layer are done first; then each layer's backward (recomputing it)
            now = PeakActivations(layers + chunk.transient, extras - chunk.output, held)
            held, layers, extras = held - 1, layers - chunk.layers, extras - chunk.extras
        if now.total > best.total:
            best = now
    return best
