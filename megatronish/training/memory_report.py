"""Per-rank memory of a training run, measured, for the log (and to check the layout planner against).

    monitor = MemoryMonitor(model_chunks, ddp_chunks, optimizer)
    with monitor.watch():                 # the first log interval's steps: activations are counted
        train_step(...)
    monitor.report(iteration, layout)     # once, after the first log line: one line per TP x PP rank

Parameters, gradient buffers and optimizer state are counted as the bytes of their storages (each
once: the distributed optimizer's parameters are views of one flat buffer, an fp32 model's master
weights are the parameters themselves). Activations are the peak bytes autograd held for backward
(SavedTensorBytes), the number the planner's activation formulas predict; on CUDA the line adds the
allocator's peak, which also holds temporaries, the logits' gradient and the allocator's caching.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatronish.training.activation_memory import SavedTensorBytes
from megatronish.training.utils import is_last_rank, print_rank_last

MiB = 2**20


@dataclass
class MeasuredMemory:
    parameters: int
    gradients: int
    optimizer: int
    activations: int                   # peak bytes saved for backward during the watched steps
    cuda_max_allocated: int | None = None

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def _storage_bytes(tensors, skip: set | None = None) -> int:
    """Bytes of the distinct storages of `tensors` (not those whose data pointer is in `skip`)."""
    seen = set(skip or ())
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def state_memory(model_chunks, ddp_chunks, optimizer) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes this rank holds."""
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    parameter_bytes = _storage_bytes(params)
    gradient_bytes = _storage_bytes(chunk.grad_buffer for chunk in ddp_chunks)
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    masters = [e.main for e in optimizer.main_params]
    state = [t for s in optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return parameter_bytes, gradient_bytes, _storage_bytes(masters + state, skip=param_storages)


class MemoryMonitor:
    """Counts activations during the watched steps and reports this rank's memory once."""

    def __init__(self, model_chunks, ddp_chunks, optimizer):
        self.model_chunks, self.ddp_chunks, self.optimizer = model_chunks, ddp_chunks, optimizer
        self.counter = SavedTensorBytes(exclude=[p for chunk in model_chunks for p in chunk.parameters()])
        self.measured: MeasuredMemory | None = None

    def watch(self):
        """Count the activations of the step run inside, until the report."""
        return self.counter if self.measured is None else contextlib.nullcontext()

    def report(self, iteration: int, layout) -> MeasuredMemory:
        """Measure once and print, from the last rank, the line of every DP-rank-0 rank (as Megatron, which
        reports those ranks); later calls return that measurement. Every rank calls it at the same iteration."""
        if self.measured is not None:
            return self.measured
        cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        self.measured = MeasuredMemory(*state_memory(self.model_chunks, self.ddp_chunks, self.optimizer),
                                       activations=self.counter.peak, cuda_max_allocated=cuda_peak)
        line = memory_log_line(layout.rank, iteration, self.measured) if layout.dp_rank == 0 else None
        # One rank prints them all, after its iteration line: lines from many processes would interleave.
        lines = [line]
        if dist.is_initialized():
            lines = [None] * dist.get_world_size() if is_last_rank() else None
            dist.gather_object(line, lines, dst=dist.get_world_size() - 1)
        print_rank_last("\n".join(line for line in lines or () if line is not None))
        return self.measured


def memory_log_line(rank: int, iteration: int, m: MeasuredMemory) -> str:
    line = (f"[Rank {rank}] (after {iteration} iterations) memory (MB) | parameters: {m.parameters / MiB:.1f} | "
            f"gradients: {m.gradients / MiB:.1f} | optimizer state: {m.optimizer / MiB:.1f} | "
            f"activations (peak saved for backward): {m.activations / MiB:.1f} | total: {m.total / MiB:.1f}")
    if m.cuda_max_allocated is not None:
        line += f" | max allocated: {m.cuda_max_allocated / MiB:.1f}"
    return line
