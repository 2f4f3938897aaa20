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

The collectives themselves are torch.library custom ops (megatronish::tp_all_reduce, tp_all_gather,
tp_reduce_scatter) that take the group by name, with fake implementations: torch.compile traces these
Functions with each collective inside as one op, whichever transport (shared memory or the group's
backend) runs it.
"""

import torch
import torch.distributed as dist

from megatronish import parallel_state
from megatronish.parallel_layout import shared_memory_for
from megatronish.tensor_parallel.utils import divide

# torch >= 2.12 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# The primitives below run only at TP > 1: the public ops return their input at TP = 1 (_apply).
# Within a CPU TP group on one host they use shared memory (megatronish/shm_collectives.py), else the group's backend.
def _shared_memory_for(x: torch.Tensor, group):
    """The TP group's shared-memory collectives if it has them and `x` fits, else None (use the backend)."""
    shared_memory = shared_memory_for(group)
    return shared_memory if shared_memory is not None and shared_memory.fits(x) else None


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def _group_named(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("megatronish::tp_all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
    # The result goes into a new tensor, never into the caller's (an incoming gradient may be
    # shared with other consumers of the graph).
    group = _group_named(group_name)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    shared_memory = _shared_memory_for(x, group)
    if shared_memory is not None:
        return shared_memory.all_reduce(x, _REDUCE_OPS[op], out=out)
    out.copy_(x)
    dist.all_reduce(out, op=_REDUCE_OPS[op], group=group)
    return out


@_all_reduce.register_fake
def _(x, op, group_name):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def all_reduce_in_tensor_model_parallel_group(x: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """The sum ("sum") or maximum ("max") of x over the TP group, as a new tensor (no autograd)."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"unknown reduction {op!r}: use one of {sorted(_REDUCE_OPS)}")
    group = group or parallel_state.get_tensor_model_parallel_group()
    return _all_reduce(x, op, group.group_name)


def _reduce(x, group):
    return _all_reduce(x, "sum", group.group_name)


def _split_along_last_dim(x, group):
    width = divide(x.size(-1), group.size(), "last dimension")
    rank = group.rank()
    return x[..., rank * width:(rank + 1) * width].contiguous()


def _gather_along_last_dim(x, group):
    # Collectives gather contiguous chunks along dim 0; reassemble them along the last dim.
    gathered = _gather_along_first_dim(x, group)
    return torch.cat(gathered.chunk(group.size(), dim=0), dim=-1)


def _split_along_first_dim(x, group):
    length = divide(x.size(0), group.size(), "sequence length")
    rank = group.rank()
    return x[rank * length:(rank + 1) * length].contiguous()


def _gather_along_first_dim(x, group):
    return _all_gather(x, group.group_name, group.size())


def _reduce_scatter_along_first_dim(x, group):
    divide(x.size(0), group.size(), "sequence length")
    return _reduce_scatter(x, group.group_name, group.size())


# The group's size is an argument too, so that the fake implementations know the output shapes.
@torch.library.custom_op("megatronish::tp_all_gather", mutates_args=())
def _all_gather(x: torch.Tensor, group_name: str, group_size: int) -> torch.Tensor:
    group = _group_named(group_name)
    x = x.contiguous()
    out = torch.empty((group_size * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)
    shared_memory = _shared_memory_for(x, group)
    if shared_memory is not None:
        shared_memory.all_gather_into_tensor(out, x)
    else:
        _all_gather_single(out, x, group=group)
    return out


@torch.library.custom_op("megatronish::tp_reduce_scatter", mutates_args=())
def _reduce_scatter(x: torch.Tensor, group_name: str, group_size: int) -> torch.Tensor:
    group = _group_named(group_name)
    x = x.contiguous()
    out = torch.empty((x.size(0) // group_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    shared_memory = _shared_memory_for(x, group)
    if shared_memory is not None:
        shared_memory.reduce_scatter_tensor(out, x)
    else:
        _reduce_scatter_single(out, x, group=group)
    return out


@_all_gather.register_fake
def _(x, group_name, group_size):
    return x.new_empty((group_size * x.size(0), *x.shape[1:]))


@_reduce_scatter.register_fake
def _(x, group_name, group_size):
    return x.new_empty((x.size(0) // group_size, *x.shape[1:]))


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_last_dim(grad, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_along_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_along_last_dim(grad, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_first_dim(grad, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group, ctx.tensor_parallel_output_grad = group, tensor_parallel_output_grad
        return _gather_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        # The gathered tensor feeds TP-partitioned work (each rank's grad is a partial sum):
        # reduce-scatter. If it fed replicated work instead, every rank already holds the full
        # gradient and only needs its own slice.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_along_first_dim(grad, ctx.group), None, None
        return _split_along_first_dim(grad, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_along_first_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_first_dim(grad, ctx.group), None


def _apply(op, x, group, *args):
    # At TP = 1 every op is the identity both ways: skip the autograd node and its Python calls.
    group = group or parallel_state.get_tensor_model_parallel_group()
    if group.size() == 1:
        return x
    return op.apply(x, group, *args)


# Each op works over `group` (a TP group: a layer passes its own), or the current layout's TP group.
def copy_to_tensor_model_parallel_region(x, group=None):
    return _apply(_CopyToModelParallelRegion, x, group)


def reduce_from_tensor_model_parallel_region(x, group=None):
    return _apply(_ReduceFromModelParallelRegion, x, group)


def scatter_to_tensor_model_parallel_region(x, group=None):
    return _apply(_ScatterToModelParallelRegion, x, group)


def gather_from_tensor_model_parallel_region(x, group=None):
    return _apply(_GatherFromModelParallelRegion, x, group)


def scatter_to_sequence_parallel_region(x, group=None):
    return _apply(_ScatterToSequenceParallelRegion, x, group)


def gather_from_sequence_parallel_region(x, tensor_parallel_output_grad: bool = True, group=None):
    return _apply(_GatherFromSequenceParallelRegion, x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x, group=None):
    return _apply(_ReduceScatterToSequenceParallelRegion, x, group)
