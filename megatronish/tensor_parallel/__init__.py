"""Tensor-parallel building blocks with the API of Megatron-core's `tensor_parallel`: a module written for
`megatron.core.tensor_parallel` runs with its import lines changed (`config=`, `init_method`, Megatron-core's
positional arguments, `tp_group=`, `checkpoint(function, distribute_saved_activations, *args)`,
`model_parallel_cuda_manual_seed`). Not provided: the CUDA-graph and generalized-TP helpers
(convert_cuda_rng_state, is_graph_safe_cuda_rng_tracker, CheckpointWithoutOutput, copy_gtp_attributes,
param_is_not_gtp_duplicate)."""

from megatronish.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatronish.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_tensor_model_parallel_attributes,
    full_shape,
    gather_full,
    initialize_parameter,
    linear_with_grad_accumulation_and_async_allreduce,
    param_is_not_tensor_parallel_duplicate,
    param_is_tensor_parallel,
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
    shard_of_full,
)
from megatronish.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatronish.tensor_parallel.random import (
    TP_RNG_STREAM,
    RNGStatesTracker,
    checkpoint,
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
    get_rng_tracker,
    model_parallel_cuda_manual_seed,
    model_parallel_manual_seed,
)
from megatronish.tensor_parallel.utils import (
    VocabUtility,
    all_reduce_coalesced,
    broadcast_data,
    divide,
    gather_split_1d_tensor,
    init_method_normal,
    scaled_init_method_normal,
    split_tensor_along_last_dim,
    split_tensor_into_1d_equal_chunks,
)

__all__ = [name for name in dir() if not name.startswith("_")]
