"""Data-parallel wrapper: fp32 gradient buffers and bucketed reduction over the DP group.

Every trainable parameter gets a `main_grad`: a view into one contiguous fp32 buffer. After
each backward a hook adds the parameter's own `.grad` (in the model's dtype) into `main_grad`
and frees it, so gradient accumulation over micro-batches happens in fp32 whatever the model
dtype. Once per iteration the buffer is averaged over the DP group bucket by bucket: an all-reduce
for the plain optimizer, a reduce-scatter for the distributed optimizer (each DP rank then
holds the averaged gradient of its own slice of every bucket). With `overlap_grad_reduce`
a bucket's reduction starts, asynchronously, as soon as the last micro-batch's backward has
produced all of its gradients (run the earlier micro-batches under `no_sync()`), so the
communication hides behind the rest of backward; otherwise all buckets start in
`finish_grad_sync()`. That call then waits for them and all-reduces over the TP group the
gradients of replicated parameters that only saw a sequence shard (`param.sequence_parallel`,
e.g. norm weights under sequence parallelism); sums over TP and averages over DP commute.
Under pipeline parallelism with tied embeddings, the first and the last stage each hold a copy
of the word embeddings (`param.shared_embedding`): `finish_grad_sync()` first sums their
gradients over the layout's embedding group, and their bucket starts its reduction only then.
Buckets are laid out in reverse parameter order (roughly the order backward produces them)
and padded to a multiple of the DP size so that a bucket splits evenly across DP ranks.

With `use_distributed_optimizer=True` the parameters are also moved into one contiguous
buffer with the same layout, so that the updated slices can be all-gathered in place.
`all_gather_params()` (after each optimizer step) gathers every bucket and waits; with
`overlap_param_gather` (Megatron's --overlap-param-gather) it only starts the gathers, and each
module waits, in a forward pre-hook, for the buckets of the parameters it owns or is handed (a
tied output layer gets the embedding weight), so the gathers hide behind the next forward. As in
Megatron, a module must therefore read no parameter of a submodule without calling that submodule.
Whatever reads or writes parameters outside a forward calls `finish_param_sync()` first (the
optimizer does in its step, its state and its norms).
"""

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megatronish import parallel_state
from megatronish.parallel_layout import ParallelLayout
from megatronish.tensor_parallel import all_reduce_coalesced

# Recent torch names these *_single and deprecates the older *_tensor names (same semantics).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# Gradient elements per bucket (a bucket closes at the first parameter that reaches this size).
DEFAULT_BUCKET_SIZE = 40_000_000


def bucket_layout(numels: list[int], bucket_size: int, dp_size: int) -> tuple[list[tuple[int, int, range]], list[int]]:
    """Where parameters of these sizes (in buffer order) go in the flat buffers.

    Returns the buckets as (start, end, indices of their parameters), each padded at its end to a
    multiple of dp_size so that it splits evenly over the DP ranks, and each parameter's start offset.
    The DDP wrapper lays its buffers out with this, and the layout planner predicts their bytes with it.
    """
    buckets, starts = [], []
    offset = bucket_start = first = 0
    for i, numel in enumerate(numels):
        starts.append(offset)
        offset += numel
        if offset - bucket_start >= bucket_size or i == len(numels) - 1:
            offset = -(-offset // dp_size) * dp_size  # pad: the bucket splits evenly over DP
            buckets.append((bucket_start, offset, range(first, i + 1)))
            bucket_start, first = offset, i + 1
    return buckets, starts


def shard_range(start: int, end: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """The [start, end) of the bucket [start, end) that DP rank `dp_rank` reduces and updates."""
    size = (end - start) // dp_size
    return start + dp_rank * size, start + (dp_rank + 1) * size


@dataclass
class Bucket:
    start: int            # [start, end) in the flat buffers, padding included
    end: int
    params: list
    ready: set = field(default_factory=set)  # ids of parameters whose last-micro-batch gradient arrived
    holds_shared_embedding: bool = False    # then it starts in finish_grad_sync, after the sum over stages
    handle: object = None                   # the running reduction, once started
    param_gather: object = None             # the running all-gather of updated parameters (overlap_param_gather)
    started: bool = False
    reduced: tuple | None = None            # (bf16 copy, where it goes) when reducing in bf16

    def shard(self, dp_rank: int, dp_size: int) -> tuple[int, int]:
        """The [start, end) of this bucket that DP rank `dp_rank` reduces and updates."""
        return shard_range(self.start, self.end, dp_rank, dp_size)

    def finish_param_gather(self) -> None:
        if self.param_gather is not None:
            self.param_gather.wait()
            self.param_gather = None


class DistributedDataParallel(nn.Module):
    """Wrap `module` (one model chunk); call `zero_grad_buffer()` before and `finish_grad_sync()` after the
    backward passes (the backward passes of all micro-batches but the last under `no_sync()`).
    `layout` (default: the current one) gives the DP group, and the TP and embedding groups."""

    def __init__(self, module: nn.Module, *, bucket_size: int = DEFAULT_BUCKET_SIZE,
                 use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
                 grad_reduce_in_bf16: bool = False, overlap_param_gather: bool = False,
                 layout: ParallelLayout | None = None):
        super().__init__()
        if overlap_param_gather and not use_distributed_optimizer:
            raise ValueError("overlap_param_gather needs use_distributed_optimizer=True: only the distributed "
                             "optimizer all-gathers parameters")
        self.module = module
        self.layout = layout or parallel_state.get_layout()
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_grad_reduce = overlap_grad_reduce
        self.overlap_param_gather = overlap_param_gather
        # Megatron's --grad-reduce-in-bf16: the DP reduction sends bf16 (half the bytes); gradients are
        # accumulated in fp32 before and after it.
        self.reduce_dtype = torch.bfloat16 if grad_reduce_in_bf16 else torch.float32
        self._sync_enabled = True
        self.dp_group, self.dp_size, self.dp_rank = self.layout.dp_group, self.layout.dp, self.layout.dp_rank
        device = parallel_state.get_device()

        params = [p for p in module.parameters() if p.requires_grad]  # tied parameters appear once
        if not params:
            raise ValueError("DistributedDataParallel: the module has no trainable parameters")
        self.buckets, self.param_range = self._layout(list(reversed(params)), bucket_size)
        numel = self.buckets[-1].end

        self.grad_buffer = torch.zeros(numel, dtype=torch.float32, device=device)
        self.bucket_of = {}
        for bucket in self.buckets:
            for param in bucket.params:
                self.bucket_of[param] = bucket
        for param, (start, end) in self.param_range.items():
            param.main_grad = self.grad_buffer[start:end].view_as(param)
            param.register_post_accumulate_grad_hook(self._accumulate_into_main_grad)

        self.param_buffer = None
        if use_distributed_optimizer:
            dtypes = {p.dtype for p in params}
            if len(dtypes) != 1:
                raise ValueError(f"the distributed optimizer needs one parameter dtype, found {sorted(map(str, dtypes))}")
            self.param_buffer = torch.zeros(numel, dtype=dtypes.pop(), device=device)
            for param, (start, end) in self.param_range.items():
                view = self.param_buffer[start:end].view_as(param)
                view.copy_(param.data)
                param.data = view

        self.sequence_parallel_params = [p for p in params if getattr(p, "sequence_parallel", False)]
        self.shared_embedding_params = [p for p in params if getattr(p, "shared_embedding", False)]
        for bucket in self.buckets:
            bucket.holds_shared_embedding = any(getattr(p, "shared_embedding", False) for p in bucket.params)
        self._broadcast_params()
        if overlap_param_gather:
            for submodule in module.modules():
                submodule.register_forward_pre_hook(self._wait_for_params_of, with_kwargs=True)

    def _layout(self, params, bucket_size):
        bucket_ranges, starts = bucket_layout([p.numel() for p in params], bucket_size, self.dp_size)
        buckets = [Bucket(start, end, [params[i] for i in members]) for start, end, members in bucket_ranges]
        param_range = {p: (start, start + p.numel()) for p, start in zip(params, starts)}
        return buckets, param_range

    @torch.no_grad()
    def _broadcast_params(self):
        """Start every DP replica from DP rank 0's values (they should already agree: init is seeded)."""
        if self.dp_size == 1:
            return
        src = self.layout.dp_ranks[0]
        for param in self.param_range:
            dist.broadcast(param.data, src, group=self.dp_group)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_input_tensor(self, input_tensor) -> None:
        """A pipeline stage's input from the previous stage (see GPTModel.set_input_tensor)."""
        self.module.set_input_tensor(input_tensor)

    def zero_grad_buffer(self) -> None:
        self.grad_buffer.zero_()
        for param in self.param_range:
            # An fp32 parameter's .grad is its slice of the buffer: autograd adds into an existing .grad
            # in place, so no gradient tensor is allocated and none is copied in afterwards.
            param.grad = param.main_grad if param.dtype == torch.float32 else None

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate: no bucket starts its reduction (earlier micro-batches)."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    @torch.no_grad()
    def _accumulate_into_main_grad(self, param: torch.Tensor) -> None:
        if param.grad.data_ptr() != param.main_grad.data_ptr():  # bf16/fp16 (or .grad reset by a caller)
            param.main_grad.add_(param.grad)
            param.grad = None
        if self.overlap_grad_reduce and self._sync_enabled:
            bucket = self.bucket_of[param]
            if bucket.started:
                raise RuntimeError("a gradient arrived for a parameter whose bucket is already being reduced: "
                                   "is a parameter used by two backward passes of one micro-batch? Turn off "
                                   "overlap_grad_reduce (--overlap-grad-reduce)")
            bucket.ready.add(id(param))
            # A shared embedding's gradient is complete only after the sum over stages in finish_grad_sync.
            if len(bucket.ready) == len(bucket.params) and not bucket.holds_shared_embedding:
                self._start_reduction(bucket)

    def _start_reduction(self, bucket: Bucket) -> None:
        bucket.started = True
        if self.dp_size == 1:
            return
        data = self.grad_buffer[bucket.start:bucket.end]
        data.div_(self.dp_size)
        if self.use_distributed_optimizer:
            start, end = bucket.shard(self.dp_rank, self.dp_size)
            target = self.grad_buffer[start:end]
        else:
            target = data
        if self.reduce_dtype != data.dtype:
            sent = data.to(self.reduce_dtype)
            bucket.reduced = (sent if target is data else sent.new_empty(target.shape), target)
            data = sent
            received = bucket.reduced[0]
        else:
            received = target
        if self.use_distributed_optimizer:
            bucket.handle = _reduce_scatter(received, data, group=self.dp_group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(data, group=self.dp_group, async_op=True)

    @torch.no_grad()
    def finish_grad_sync(self) -> None:
        """Make `main_grad` hold the DP-averaged, TP-complete gradient (only the local shard with the
        distributed optimizer). Call once per iteration, after the last micro-batch's backward."""
        self._allreduce_shared_embedding_grads()
        for bucket in self.buckets:  # without overlap: all of them; with it: buckets holding unused parameters
            if not bucket.started:
                self._start_reduction(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            if bucket.reduced is not None:
                received, target = bucket.reduced
                target.copy_(received)
            bucket.ready, bucket.handle, bucket.started, bucket.reduced = set(), None, False, None
        self._allreduce_sequence_parallel_grads()

    def _allreduce_shared_embedding_grads(self) -> None:
        """Sum the gradients of the two copies of tied word embeddings (first and last pipeline stage)."""
        if self.shared_embedding_params and self.layout.embedding_group is not None:
            all_reduce_coalesced([p.main_grad for p in self.shared_embedding_params], self.layout.embedding_group)

    def _allreduce_sequence_parallel_grads(self) -> None:
        """Sum over TP the gradients of sequence-parallel parameters, where this DP rank holds them reduced."""
        if not self.sequence_parallel_params or self.layout.tp == 1:
            return
        pieces = []  # the same ranges on every TP rank: the buffer layouts are identical across TP
        for param in self.sequence_parallel_params:
            start, end = self.param_range[param]
            if self.use_distributed_optimizer and self.dp_size > 1:
                shard_start, shard_end = self.bucket_of[param].shard(self.dp_rank, self.dp_size)
                start, end = max(start, shard_start), min(end, shard_end)
            if start < end:
                pieces.append(self.grad_buffer[start:end])
        all_reduce_coalesced(pieces, self.layout.tp_group)

    @torch.no_grad()
    def all_gather_params(self) -> None:
        """Distributed optimizer: after each DP rank updated its shard of `param_buffer`, share them. With
        overlap_param_gather the gathers are only started: the forward pre-hooks and finish_param_sync wait."""
        if self.dp_size == 1:
            return
        for bucket in reversed(self.buckets):  # in the order the forward needs them (buckets are laid out backward-first)
            start, end = bucket.shard(self.dp_rank, self.dp_size)
            bucket.param_gather = _all_gather(self.param_buffer[bucket.start:bucket.end], self.param_buffer[start:end],
                                              group=self.dp_group, async_op=True)
        if not self.overlap_param_gather:
            self.finish_param_sync()

    def finish_param_sync(self) -> None:
        """Wait for every parameter all-gather still running (a no-op when none is)."""
        for bucket in self.buckets:
            bucket.finish_param_gather()

    def _wait_for_params_of(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: the buckets of the parameters `module` owns, or is handed (whole or a view), are
        gathered before it runs. Each bucket is waited for once; later calls find nothing running."""
        if all(bucket.param_gather is None for bucket in self.buckets):
            return  # every forward after the first of an iteration (and evaluation's): nothing in flight
        handed = (value._base if value._base is not None else value
                  for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor))
        for param in (*module.parameters(recurse=False), *handed):
            bucket = self.bucket_of.get(param)
            if bucket is not None:
                bucket.finish_param_gather()


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
