"""Parameters, gradients and optimizer state of one rank, predicted to the byte.

The inventory lists the parameters GPTModel builds for one pipeline stage's model chunk, in
module order (the order DistributedDataParallel and the optimizer see them). From it the
byte counts follow the code that allocates them:
  - parameters: the model dtype; with the distributed optimizer they live in one flat buffer
    per chunk, padded like the gradient buffer;
  - gradients: one fp32 buffer per chunk, bucketed in reverse parameter order and each bucket
    padded to a multiple of DP (`bucket_layout`, shared with the DDP wrapper);
  - optimizer state: Adam's two fp32 moments per main element, an fp32 master copy only when
    the model is bf16/fp16 (an fp32 model's master is the parameter itself), and the 4-byte step
    tensor that fused AdamW keeps per main tensor; with the distributed optimizer a DP rank holds
    the elements of its shard of each bucket, padding excluded.
Megatron's report_theoretical_memory.py counts 18 bytes per parameter (6 + 12 / DP with the
distributed optimizer) for bf16 training; this gives the same totals up to bucket padding and
step tensors, and 16 bytes (4 + 12 / DP) for fp32 training, which keeps no master copy.
"""

from dataclasses import dataclass

import torch

from megatronish.model.config import TransformerConfig
from megatronish.model.pipeline_split import stage_layers
from megatronish.optimizer.distributed_data_parallel import DEFAULT_BUCKET_SIZE, bucket_layout, shard_range
from megatronish.parallel_layout import ParallelDims

FP32_BYTES = 4
ADAM_MOMENTS = 2
STEP_TENSOR_BYTES = 4  # fused AdamW's per-tensor step count: an fp32 scalar


def chunk_parameters(config: TransformerConfig, dims: ParallelDims, pp_rank: int,
                     vp_stage: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each parameter of one TP rank's model chunk, in GPTModel's module order."""
    t, h = dims.tp, config.hidden_size
    vocab_rows = config.padded_vocab_size(t) // t
    pre_process = pp_rank == 0 and vp_stage == 0
    post_process = pp_rank == dims.pp - 1 and vp_stage == dims.num_model_chunks - 1
    params = []
    if pre_process:
        params.append(("embedding.word_embeddings.weight", (vocab_rows, h)))
        if config.position_embedding_type == "learned_absolute":
            params.append(("embedding.position_embeddings.weight", (config.max_position_embeddings, h)))
    for layer in stage_layers(config, dims.pp, pp_rank, dims.virtual_pp, vp_stage):
        params += _layer_parameters(config, t, f"decoder.layers.{layer}.")
    if post_process:
        params += _norm_parameters(config, "decoder.final_layernorm.")
        if config.tie_word_embeddings and not pre_process:  # the last stage's copy of the tied embeddings
            params.append(("embedding.word_embeddings.weight", (vocab_rows, h)))
        if not config.tie_word_embeddings:
            params.append(("output_layer.weight", (vocab_rows, h)))
    return params


def _norm_parameters(config: TransformerConfig, prefix: str) -> list:
    h = config.hidden_size
    return [(prefix + "weight", (h,))] + ([(prefix + "bias", (h,))] if config.normalization == "LayerNorm" else [])


def _linear_parameters(config: TransformerConfig, prefix: str, rows: int, columns: int, bias_rows: int) -> list:
    bias = [(prefix + "bias", (bias_rows,))] if config.add_bias_linear else []
    return [(prefix + "weight", (rows, columns))] + bias


def _layer_parameters(config: TransformerConfig, t: int, prefix: str) -> list:
    h, f = config.hidden_size, config.ffn_hidden_size
    fc1_rows = (2 * f if config.activation == "swiglu" else f) // t
    qkv_rows = config.qkv_width // t
    return (_norm_parameters(config, prefix + "input_layernorm.")
            + _linear_parameters(config, prefix + "self_attention.linear_qkv.", qkv_rows, h, qkv_rows)
            + _linear_parameters(config, prefix + "self_attention.linear_proj.", h, config.attention_width // t, h)
            + _norm_parameters(config, prefix + "pre_mlp_layernorm.")
            + _linear_parameters(config, prefix + "mlp.linear_fc1.", fc1_rows, h, fc1_rows)
            + _linear_parameters(config, prefix + "mlp.linear_fc2.", h, f // t, h))


@dataclass(frozen=True)
class StateBytes:
    """Bytes of one rank's parameters, gradient buffers and optimizer state, and its element counts."""
    parameters: int
    gradients: int
    optimizer: int
    numel: int               # parameter elements of this rank (padding excluded)
    main_elements: int       # elements this rank's optimizer updates (its DP shard with the distributed optimizer)
    buckets: int             # gradient buckets (one DP collective each)
    tensors: int             # parameter tensors of this rank


def state_bytes(config: TransformerConfig, dims: ParallelDims, pp_rank: int, dp_rank: int = 0,
                distributed_optimizer: bool = False, bucket_size: int = DEFAULT_BUCKET_SIZE) -> StateBytes:
    """Exact bytes of the parameters, gradients and optimizer state that one rank of stage `pp_rank` allocates."""
    param_bytes = torch.empty((), dtype=config.params_dtype).element_size()
    parameters = gradients = numel = main_elements = main_tensors = buckets = tensors = 0
    for chunk in range(dims.num_model_chunks):
        numels = [_numel(shape) for _, shape in reversed(chunk_parameters(config, dims, pp_rank, chunk))]
        bucket_ranges, starts = bucket_layout(numels, bucket_size, dims.dp)
        padded = bucket_ranges[-1][1]
        numel += sum(numels)
        tensors += len(numels)
        buckets += len(bucket_ranges)
        gradients += padded * FP32_BYTES
        parameters += (padded if distributed_optimizer else sum(numels)) * param_bytes
        for start, end, members in bucket_ranges:
            shard_start, shard_end = (shard_range(start, end, dp_rank, dims.dp) if distributed_optimizer
                                      else (start, end))
            for i in members:
                held = min(starts[i] + numels[i], shard_end) - max(starts[i], shard_start)
                if held > 0:
                    main_elements += held
                    main_tensors += 1
    master_bytes = 0 if param_bytes == FP32_BYTES else FP32_BYTES
    optimizer = main_elements * (ADAM_MOMENTS * FP32_BYTES + master_bytes) + main_tensors * STEP_TENSOR_BYTES
    return StateBytes(parameters, gradients, optimizer, numel, main_elements, buckets, tensors)


def total_parameters(config: TransformerConfig, dims: ParallelDims) -> int:
    """The model's parameters, each once (TP shards summed, the last stage's copy of tied embeddings not),
    as megatronish.training.training.count_parameters counts them."""
    total = 0
    for pp_rank in range(dims.pp):
        for chunk in range(dims.num_model_chunks):
            for name, shape in chunk_parameters(config, dims, pp_rank, chunk):
                tied_copy = name == "embedding.word_embeddings.weight" and not (pp_rank == 0 and chunk == 0)
                if not tied_copy:
                    total += _numel(shape) * (dims.tp if _is_tensor_parallel(name) else 1)
    return total


def _is_tensor_parallel(name: str) -> bool:
    """Split across TP ranks: the embedding and output rows, QKV and fc1 (rows, with their bias), proj and fc2
    (columns)."""
    if name.endswith(".bias"):
        return name.endswith(("linear_qkv.bias", "linear_fc1.bias"))
    return name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
                          "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
