"""Column- and row-parallel linear layers and the vocabulary-parallel embedding.

A parallel parameter carries three attributes that say how its full (master) value is cut:
    tensor_model_parallel  True if each TP rank holds a slice (False: replicated)
    partition_dim          the dimension that is cut
    partition_stride       the full dimension is `stride` stacked parts, each cut on its own
                           (stride 2 keeps [gate; up] of a SwiGLU projection together per rank)
A vocabulary weight also carries `unpadded_rows`: rows from there on are padding (zeros).
Replicated parameters whose gradients are partial per rank (they act on a sequence shard
under sequence parallelism) carry `sequence_parallel = True`; their gradients must be
all-reduced across the TP group before the optimizer step.

Every layer (and helper) takes `tp_group=`, the process group its weight is split over, as
Megatron-core's newer API does; it defaults to the current layout's TP group
(megatronish.parallel_state), so models of two layouts can live in one process. As in Megatron-core,
the layers also take `config=` (a ModelParallelConfig or TransformerConfig: sequence_parallel,
params_dtype, perform_initialization come from it) and `init_method`, and their positional arguments
are Megatron-core's (input_size, output_size; num_embeddings, embedding_dim).

Initialization is TP-invariant: the full value is drawn on the CPU (from the default
generator, or from a per-name generator by the model) and each rank keeps its slice, so a
model built at TP=k holds exactly the slices of the one built at TP=1.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatronish import parallel_state
from megatronish.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatronish.tensor_parallel.utils import VocabUtility, divide, init_method_normal


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, dim: int, stride: int = 1) -> None:
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim
    param.partition_stride = stride


def param_is_tensor_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_model_parallel", False)


def set_defaults_if_not_set_tensor_model_parallel_attributes(param: torch.Tensor) -> None:
    """Mark a parameter replicated (not split) unless it says otherwise (Megatron-core's name)."""
    for name, default in (("tensor_model_parallel", False), ("partition_dim", -1), ("partition_stride", 1)):
        if not hasattr(param, name):
            setattr(param, name, default)


def copy_tensor_model_parallel_attributes(destination: torch.Tensor, source: torch.Tensor) -> None:
    for name in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(source, name):
            setattr(destination, name, getattr(source, name))


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor, tp_group=None) -> bool:
    """True where this rank's copy counts (split parameters everywhere, replicated ones on TP rank 0)."""
    return param_is_tensor_parallel(param) or _tp_group(tp_group).rank() == 0


def linear_with_grad_accumulation_and_async_allreduce(input, weight, bias, gradient_accumulation_fusion=False,
                                                      allreduce_dgrad=False, sequence_parallel=False,
                                                      grad_output_buffer=None, wgrad_deferral_limit=None,
                                                      tp_group=None, **_):
    """Megatron-core's column-parallel matmul as a function: with `sequence_parallel` the input (a sequence
    shard) is all-gathered first; with `allreduce_dgrad` its gradient is all-reduced over TP in backward.
    (Gradient-accumulation fusion and deferral are CUDA tuning: the result is the same.)"""
    group = _tp_group(tp_group)
    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, group=group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group)
    return F.linear(input, weight, bias)


def _tp_group(group):
    return group or parallel_state.get_tensor_model_parallel_group()


# Megatron-core keyword arguments that tune CUDA kernels or buffers; accepted at their defaults only.
_MEGATRON_ONLY = {"keep_master_weight_for_test": False, "is_expert": False, "tp_comm_buffer_name": None,
                  "embedding_activation_buffer": None, "grad_output_buffer": None, "disable_grad_reduce": False}


def _from_config(layer: str, config, megatron_only: dict, **given) -> dict:
    """The settings a layer takes from Megatron-core's `config=` (where the caller did not pass them itself)."""
    unknown = sorted(set(megatron_only) - set(_MEGATRON_ONLY))
    if unknown:
        raise TypeError(f"{layer} got unexpected keyword argument(s) {unknown}")
    changed = sorted(k for k, v in megatron_only.items() if v != _MEGATRON_ONLY[k])
    if changed:
        raise ValueError(f"{layer}: {changed} are not supported here (leave them at their defaults "
                         f"{ {k: _MEGATRON_ONLY[k] for k in changed} })")
    settings = {}
    for name, value in given.items():
        if value is None and config is not None:
            value = getattr(config, name)
        settings[name] = value
    return settings


def full_shape(param: torch.Tensor, tp_group=None) -> torch.Size:
    """The shape of the full (unsharded) value of a parameter split over `tp_group` (default: the current TP group)."""
    if not param_is_tensor_parallel(param):
        return param.shape
    shape = list(param.shape)
    shape[param.partition_dim] *= _tp_group(tp_group).size()
    return torch.Size(shape)


def shard_ranges(full_size: int, stride: int, tp: int, rank: int) -> list[tuple[int, int]]:
    """[start, end) ranges of the full dimension that make up `rank`'s shard, in order."""
    part = divide(full_size, stride, "partitioned dimension")
    chunk = divide(part, tp, "partitioned dimension")
    return [(s * part + rank * chunk, s * part + (rank + 1) * chunk) for s in range(stride)]


def shard_of_full(full: torch.Tensor, param: torch.Tensor, rank: int | None = None, tp_group=None) -> torch.Tensor:
    """This rank's (or TP rank `rank`'s) slice of a parameter's full value (the identity for replicated parameters)."""
    if not param_is_tensor_parallel(param):
        return full
    group = _tp_group(tp_group)
    tp = group.size()
    rank = group.rank() if rank is None else rank
    dim = param.partition_dim
    ranges = shard_ranges(full.size(dim), param.partition_stride, tp, rank)
    return torch.cat([full.narrow(dim, start, end - start) for start, end in ranges], dim=dim)


def gather_full(tensor: torch.Tensor, like: torch.Tensor | None = None, tp_group=None) -> torch.Tensor:
    """Reassemble the full value of a parameter (or of its gradient: pass the parameter as `like`)."""
    like = tensor if like is None else like
    if not param_is_tensor_parallel(like):
        return tensor.detach().clone()
    group = _tp_group(tp_group)
    tp = group.size()
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(shards, tensor.detach().contiguous(), group=group)
    dim, stride = like.partition_dim, like.partition_stride
    full = torch.empty(full_shape(like, group), dtype=tensor.dtype, device=tensor.device)
    for rank, shard in enumerate(shards):
        ranges = shard_ranges(full.size(dim), stride, tp, rank)
        pieces = shard.split(ranges[0][1] - ranges[0][0], dim=dim)
        for (start, end), piece in zip(ranges, pieces):
            full.narrow(dim, start, end - start).copy_(piece)
    return full


@torch.no_grad()
def initialize_parameter(param: torch.Tensor, init_method, tp_group=None) -> None:
    """Draw the full value with `init_method` on the CPU in fp32, then keep this rank's slice.

    The draw uses the default CPU generator; callers that want a value that depends only on a
    seed and a name wrap this in `torch.random.fork_rng()` + `torch.manual_seed(...)`.
    """
    shape = list(full_shape(param, tp_group))
    unpadded = getattr(param, "unpadded_rows", None)
    if unpadded is not None:
        full = torch.zeros(shape, dtype=torch.float32)
        init_method(full[:unpadded])  # padding rows stay zero at every TP size
    else:
        full = torch.empty(shape, dtype=torch.float32)
        init_method(full)
    param.copy_(shard_of_full(full, param, tp_group=tp_group))


def _new_parameter(shape, params_dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=params_dtype, device=parallel_state.get_device()))


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by columns: each rank computes Y_i = X A_i + b_i.

    The weight is [output_size / tp, input_size]. Returns `(output, bias_or_None)`: the bias
    comes back un-added when `skip_bias_add=True` so that a caller can fuse it into the next op.
    With `gather_output=True` the output is all-gathered to the full width; otherwise each rank
    keeps its slice (the usual case: a row-parallel layer follows). With `sequence_parallel`
    the input is a sequence shard [s/tp, b, h], all-gathered along dim 0 first.
    `stride` > 1 cuts the output dimension as `stride` stacked parts, each split on its own.
    `skip_weight_param_allocation=True` makes a layer whose weight is passed to forward (a
    tied output layer).
    """

    def __init__(self, input_size: int, output_size: int, *, config=None, init_method=None, bias: bool = True,
                 gather_output: bool = False, stride: int = 1, skip_bias_add: bool = False,
                 skip_weight_param_allocation: bool = False, sequence_parallel: bool | None = None,
                 params_dtype: torch.dtype | None = None, perform_initialization: bool | None = None, tp_group=None,
                 **megatron_only):
        super().__init__()
        settings = _from_config("ColumnParallelLinear", config, megatron_only, sequence_parallel=sequence_parallel,
                                params_dtype=params_dtype, perform_initialization=perform_initialization)
        sequence_parallel = bool(settings["sequence_parallel"])
        params_dtype = settings["params_dtype"] or torch.float32
        perform_initialization = settings["perform_initialization"] is not False
        self.tp_group = _tp_group(tp_group)
        tp = self.tp_group.size()
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: sequence_parallel=True needs gather_output=False")
        if stride > 1 and gather_output:
            # The gathered columns would come in shard order, not in the order of the full weight.
            raise ValueError(f"ColumnParallelLinear: stride={stride} needs gather_output=False")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, tp, "ColumnParallelLinear output_size")
        divide(self.output_size_per_partition * tp, stride * tp, "ColumnParallelLinear output_size / stride")
        self.gather_output, self.skip_bias_add, self.sequence_parallel = gather_output, skip_bias_add, sequence_parallel
        init_method = init_method or init_method_normal(0.02)

        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight = _new_parameter((self.output_size_per_partition, input_size), params_dtype)
            set_tensor_model_parallel_attributes(self.weight, True, 0, stride)
            if perform_initialization:
                initialize_parameter(self.weight, init_method, self.tp_group)
        if bias:
            self.bias = _new_parameter((self.output_size_per_partition,), params_dtype)
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
            with torch.no_grad():
                self.bias.zero_()
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None):
        if weight is None:
            if self.weight is None:
                raise ValueError("ColumnParallelLinear built with skip_weight_param_allocation=True needs `weight`")
            weight = self.weight
        if self.sequence_parallel:
            input_ = gather_from_sequence_parallel_region(input_, group=self.tp_group)
        else:
            input_ = copy_to_tensor_model_parallel_region(input_, self.tp_group)
        bias = None if self.skip_bias_add else self.bias
        output = F.linear(input_, weight, bias)
        returned_bias = self.bias if self.skip_bias_add else None
        if self.gather_output:
            output = gather_from_tensor_model_parallel_region(output, self.tp_group)
            if returned_bias is not None:  # match the gathered output's width
                returned_bias = gather_from_tensor_model_parallel_region(returned_bias, self.tp_group)
        return output, returned_bias

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size} (per rank {self.output_size_per_partition})"


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split by rows and X by columns: Y = sum_i X_i A_i, then + b.

    The weight is [output_size, input_size / tp]; the bias is replicated and added after the
    all-reduce (or reduce-scatter along the sequence with `sequence_parallel`). With
    `input_is_parallel=False` the input is full width and split here first.
    Returns `(output, bias_or_None)` as ColumnParallelLinear does.
    """

    def __init__(self, input_size: int, output_size: int, *, config=None, init_method=None, bias: bool = True,
                 input_is_parallel: bool = False, skip_bias_add: bool = False, stride: int = 1,
                 sequence_parallel: bool | None = None, params_dtype: torch.dtype | None = None,
                 perform_initialization: bool | None = None, tp_group=None, **megatron_only):
        super().__init__()
        settings = _from_config("RowParallelLinear", config, megatron_only, sequence_parallel=sequence_parallel,
                                params_dtype=params_dtype, perform_initialization=perform_initialization)
        sequence_parallel = bool(settings["sequence_parallel"])
        params_dtype = settings["params_dtype"] or torch.float32
        perform_initialization = settings["perform_initialization"] is not False
        if stride != 1:
            raise ValueError(f"RowParallelLinear: stride {stride} is not supported (Megatron-core asserts 1 too)")
        self.tp_group = _tp_group(tp_group)
        tp = self.tp_group.size()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True")
        self.input_size, self.output_size, self.tp_size = input_size, output_size, tp
        self.input_size_per_partition = divide(input_size, tp, "RowParallelLinear input_size")
        self.input_is_parallel, self.skip_bias_add, self.sequence_parallel = input_is_parallel, skip_bias_add, sequence_parallel
        init_method = init_method or init_method_normal(0.02)

        self.weight = _new_parameter((output_size, self.input_size_per_partition), params_dtype)
        set_tensor_model_parallel_attributes(self.weight, True, 1)
        if perform_initialization:
            initialize_parameter(self.weight, init_method, self.tp_group)
        if bias:
            self.bias = _new_parameter((output_size,), params_dtype)
            set_tensor_model_parallel_attributes(self.bias, False, 0)
            self.bias.sequence_parallel = sequence_parallel
            with torch.no_grad():
                self.bias.zero_()
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor):
        if not self.input_is_parallel:
            input_ = scatter_to_tensor_model_parallel_region(input_, self.tp_group)
        # The bias is added once, after the sum over ranks; at TP = 1 there is no sum and the GEMM adds it.
        bias_in_gemm = self.tp_size == 1 and not self.skip_bias_add
        partial = F.linear(input_, self.weight, self.bias if bias_in_gemm else None)
        if self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        else:
            output = reduce_from_tensor_model_parallel_region(partial, self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        if self.bias is None or bias_in_gemm:
            return output, None
        return output + self.bias, None

    def extra_repr(self) -> str:
        return f"in={self.input_size} (per rank {self.input_size_per_partition}), out={self.output_size}"


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split across TP ranks.

    Each rank looks up the ids it owns, writes zeros for the others, and an all-reduce sums
    the ranks' contributions. Input ids [b, s] give [b, s, h]; with
    `reduce_scatter_embeddings=True` the output is [s/tp, b, h] (sequence-first, sequence
    parallel) through a reduce-scatter instead. `num_embeddings` is the padded vocabulary
    size; rows from `unpadded_num_embeddings` on are padding, initialized to zero.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method=None, config=None,
                 reduce_scatter_embeddings: bool = False, params_dtype: torch.dtype | None = None,
                 unpadded_num_embeddings: int | None = None, perform_initialization: bool | None = None,
                 tp_group=None):
        super().__init__()
        settings = _from_config("VocabParallelEmbedding", config, {}, params_dtype=params_dtype,
                                perform_initialization=perform_initialization)
        params_dtype = settings["params_dtype"] or torch.float32
        perform_initialization = settings["perform_initialization"] is not False
        self.tp_group = _tp_group(tp_group)
        tp, rank = self.tp_group.size(), self.tp_group.rank()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        per_partition = divide(num_embeddings, tp, "VocabParallelEmbedding num_embeddings (padded vocabulary size)")
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_per_partition_vocab_size(
            per_partition, rank, tp)
        init_method = init_method or init_method_normal(0.02)

        self.weight = _new_parameter((per_partition, embedding_dim), params_dtype)
        set_tensor_model_parallel_attributes(self.weight, True, 0)
        if unpadded_num_embeddings is not None:
            if not 0 < unpadded_num_embeddings <= num_embeddings:
                raise ValueError(f"unpadded_num_embeddings {unpadded_num_embeddings} must be in [1, {num_embeddings}]")
            self.weight.unpadded_rows = unpadded_num_embeddings
        if perform_initialization:
            initialize_parameter(self.weight, init_method, self.tp_group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tp = self.tp_group.size()
        if tp > 1:
            outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
            local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        else:
            local_ids = input_ids
        output = F.embedding(local_ids, self.weight)
        if tp > 1:
            output = output.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(output.transpose(0, 1).contiguous(), self.tp_group)
        return reduce_from_tensor_model_parallel_region(output, self.tp_group)
