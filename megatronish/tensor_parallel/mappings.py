"""Communication between tensor-parallel ranks, as autograd functions.

Each op is the adjoint of another: what one does in forward, its partner does in backward.

    op                                    forward                 backward
    copy_to_tensor_model_parallel_region  identity                all-reduce
    reduce_from_tensor_model_parallel...  all-reduce              identity
    scatter_to_tensor_model_parallel...   split last dim          all-gather last dim
    gather_from_tensor_model_parallel...  all-gather last dim     split last dim
    scatter_to_sequence_parallel_region   split dim 0             all-gather dim 0
    gather_from_sequence_parallel_region  all-gather dim 0        reduce-scatter dim 0
    reduce_scatter_to_sequence_parallel.. reduce-scatter dim 0    all-gather dim 0

With a TP size of 1 every op is the identity and no collective is called.
"""

import torch
import torch.distributed as dist

from megatronish import parallel_state
from megatronish.tensor_parallel.utils import divide

# torch >= 2.12 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# The primitives below run only at TP > 1: the public ops return their input at TP = 1 (_apply).
# Within a CPU TP group on one host they use shared memory (megatronish/shm_collectives.py), else the group's backend.
def _tp_group_and_size():
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()


def _shared_memory_for(x: torch.Tensor):
    """The TP group's shared-memory collectives if it has them and `x` fits, else None (use the backend)."""
    shared_memory = parallel_state.get_tensor_model_parallel_shared_memory()
    return shared_memory if shared_memory is not None and shared_memory.fits(x) else None


def all_reduce_in_tensor_model_parallel_group(x: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
    """dist.all_reduce over the TP group (in place), through shared memory where the group has it."""
    shared_memory = _shared_memory_for(x)
    if shared_memory is not None and x.is_contiguous() and op in shared_memory.REDUCE_OPS:
        shared_memory.all_reduce(x, op)
    else:
        dist.all_reduce(x, op=op, group=parallel_state.get_tensor_model_parallel_group())


def _reduce(x):
    # The sum goes into a new tensor, never into the caller's (an incoming gradient may be
    # shared with other consumers of the graph).
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    shared_memory = _shared_memory_for(x)
    if shared_memory is not None:
        return shared_memory.all_reduce(x, out=out)
    out.copy_(x)
    dist.all_reduce(out, group=parallel_state.get_tensor_model_parallel_group())
    return out


def _split_along_last_dim(x):
    _, size = _tp_group_and_size()
    width = divide(x.size(-1), size, "last dimension")
    rank = parallel_state.get_tensor_model_parallel_rank()
    return x[..., rank * width:(rank + 1) * width].contiguous()


def _gather_along_last_dim(x):
    group, size = _tp_group_and_size()
    # Collectives gather contiguous chunks along dim 0; reassemble them along the last dim.
    gathered = _gather_along_first_dim(x)
    return torch.cat(gathered.chunk(size, dim=0), dim=-1)


def _split_along_first_dim(x):
    _, size = _tp_group_and_size()
    length = divide(x.size(0), size, "sequence length")
    rank = parallel_state.get_tensor_model_parallel_rank()
    return x[rank * length:(rank + 1) * length].contiguous()


def _gather_along_first_dim(x):
    group, size = _tp_group_and_size()
    x = x.contiguous()
    out = torch.empty((size * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
    shared_memory = _shared_memory_for(x)
    if shared_memory is not None:
        shared_memory.all_gather_into_tensor(out, x)
    else:
        _all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_along_first_dim(x):
    group, size = _tp_group_and_size()
    length = divide(x.size(0), size, "sequence length")
    x = x.contiguous()
    out = torch.empty((length, *x.shape[1:]), dtype=x.dtype, device=x.device)
    shared_memory = _shared_memory_for(x)
    if shared_memory is not None:
        shared_memory.reduce_scatter_tensor(out, x)
    else:
        _reduce_scatter_single(out, x, group=group)
    return out


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad)


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_along_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_last_dim(grad)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_along_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_along_last_dim(grad)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_along_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_first_dim(grad)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_along_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        # The gathered tensor feeds TP-partitioned work (each rank's grad is a partial sum):
        # reduce-scatter. If it fed replicated work instead, every rank already holds the full
        # gradient and only needs its own slice.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_along_first_dim(grad), None
        return _split_along_first_dim(grad), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_along_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_first_dim(grad)


def _apply(op, x, *args):
    # At TP = 1 every op is the identity both ways: skip the autograd node and its Python calls.
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x
    return op.apply(x, *args)


def copy_to_tensor_model_parallel_region(x):
    return _apply(_CopyToModelParallelRegion, x)


def reduce_from_tensor_model_parallel_region(x):
    return _apply(_ReduceFromModelParallelRegion, x)


def scatter_to_tensor_model_parallel_region(x):
    return _apply(_ScatterToModelParallelRegion, x)


def gather_from_tensor_model_parallel_region(x):
    return _apply(_GatherFromModelParallelRegion, x)


def scatter_to_sequence_parallel_region(x):
    return _apply(_ScatterToSequenceParallelRegion, x)


def gather_from_sequence_parallel_region(x, tensor_parallel_output_grad: bool = True):
    return _apply(_GatherFromSequenceParallelRegion, x, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x):
    return _apply(_ReduceScatterToSequenceParallelRegion, x)
