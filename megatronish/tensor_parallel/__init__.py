"""Tensor-parallel building blocks with the API of Megatron-core's `tensor_parallel`."""

from megatronish.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatronish.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_shape,
    gather_full,
    initialize_parameter,
    param_is_tensor_parallel,
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
    get_rng_tracker,
    model_parallel_manual_seed,
)
from megatronish.tensor_parallel.utils import (
    VocabUtility,
    all_reduce_coalesced,
    broadcast_data,
    divide,
    init_method_normal,
    scaled_init_method_normal,
    split_tensor_along_last_dim,
)

__all__ = [name for name in dir() if not name.startswith("_")]
