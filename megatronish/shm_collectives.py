"""Collectives over shared memory for the CPU ranks of one group on one host.

On CPU, gloo sends every collective through TCP over loopback: an all-reduce of one
[64, 12, 128] fp32 activation took 3.1 ms on a 2-core machine, and a TP=2 training step of
nanoGPT's CPU config makes about 20 of them. Ranks on one host can instead copy their tensors
into one shared buffer and read each other's, which takes a few hundred microseconds.

The shared file is made in /dev/shm by the group's first rank, mapped by every rank, then
unlinked at once (the mapping lives on; nothing is left behind if a rank dies). It holds
    lines  [ranks] of 64 bytes (one cache line each): the number of the last collective the
           rank joined (its flag) and the rank's process id
    slots  [2][ranks][capacity] bytes: collective k uses slots[k % 2], each rank writing its own slot
Collective k: copy the input into this rank's slot, set this rank's flag to k, wait until every
flag is >= k, then read the slots. A rank reaches collective k + 2 (the same slots again) only
after every rank has joined k + 1, that is, has finished reading k: one wait per collective.
Every rank combines the slots in rank order, so all ranks get bitwise the same result, as with gloo.

The flag is stored after the data; x86's total store order makes the data visible to the
other ranks first. Other architectures, tensors larger than a slot, other devices and other
reductions use torch.distributed (see megatronish.tensor_parallel.mappings).
"""

import mmap
import os
import platform
import time
import uuid
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

ENV_SLOT_MB = "MEGATRONISH_SHM_SLOT_MB"  # capacity of one rank's slot in MiB; 0 turns shared memory off
DEFAULT_SLOT_MB = 16
SHM_DIR = "/dev/shm"
_LINE = 64  # bytes: one cache line per flag, so that ranks do not write to the same line
_SPIN_S = 0.05  # wait this long with sched_yield (fast wake-up), then sleep in 1 ms steps (no busy CPU)


class SharedMemoryCollectives:
    """All-reduce (sum, max), all-gather and reduce-scatter of CPU tensors within one group."""

    REDUCE_OPS = (dist.ReduceOp.SUM, dist.ReduceOp.MAX)

    def __init__(self, mapping: mmap.mmap, rank: int, size: int, capacity: int, timeout: timedelta):
        self.rank, self.size, self.capacity, self.timeout = rank, size, capacity, timeout
        lines = np.frombuffer(mapping, dtype=np.int64, count=size * _LINE // 8).reshape(size, _LINE // 8)
        self._flags, self._pids = lines[:, 0], lines[:, 1]
        self._pids[rank] = os.getpid()  # read by the others only after create()'s all-reduce
        data = torch.frombuffer(mapping, dtype=torch.uint8)[size * _LINE:]
        self._slots = data.view(2, size, capacity)
        self._count = 0  # collectives this rank has joined

    @classmethod
    def create(cls, group: dist.ProcessGroup, ranks: list[int], timeout: timedelta) -> "SharedMemoryCollectives | None":
        """Set up shared memory for `group` (every rank of it must call this); None on every rank
        where it cannot be used (off, not x86, ranks on different hosts, /dev/shm too small)."""
        slot_mb = _slot_mb()
        if len(ranks) < 2 or slot_mb <= 0 or platform.machine().lower() not in ("x86_64", "amd64"):
            return None
        capacity = slot_mb << 20
        total = len(ranks) * _LINE + 2 * len(ranks) * capacity
        rank = ranks.index(dist.get_rank())
        path = [_make_shared_file(total) if rank == 0 else None]
        dist.broadcast_object_list(path, src=ranks[0], group=group)
        mapping = _map(path[0], total)
        mapped_everywhere = torch.tensor([0 if mapping is None else 1])
        dist.all_reduce(mapped_everywhere, op=dist.ReduceOp.MIN, group=group)
        if rank == 0 and path[0] is not None:
            os.unlink(path[0])  # every rank has mapped it or given up
        if not mapped_everywhere.item():
            return None
        return cls(mapping, rank, len(ranks), capacity, timeout)

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.numel() * tensor.element_size() <= self.capacity

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Like dist.all_reduce (op SUM or MAX): in place (a contiguous tensor), or into `out` (contiguous)
        leaving `tensor` (any strides) as it is."""
        if op not in self.REDUCE_OPS:
            raise ValueError(f"shared-memory all-reduce supports SUM and MAX, not {op}")
        out = tensor if out is None else out
        slots = self._exchange(tensor)
        (torch.sum if op == dist.ReduceOp.SUM else torch.amax)(slots, dim=0, out=out.view(-1))
        return out

    def all_gather_into_tensor(self, output: torch.Tensor, tensor: torch.Tensor) -> None:
        """output (contiguous, size * n elements) = every rank's tensor (n elements), in rank order."""
        slots = self._exchange(tensor)
        output.view(self.size, -1).copy_(slots)

    def reduce_scatter_tensor(self, output: torch.Tensor, tensor: torch.Tensor) -> None:
        """output (contiguous, n elements) = the sum over ranks of chunk `rank` of their tensor (size * n elements)."""
        slots = self._exchange(tensor)
        torch.sum(slots.view(self.size, self.size, -1)[:, self.rank], dim=0, out=output.view(-1))

    def _exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        """Publish this rank's tensor (any strides); return every rank's, as [size, numel] views of the shared slots."""
        self._count += 1
        nbytes = tensor.numel() * tensor.element_size()
        slots = self._slots[self._count % 2, :, :nbytes].view(tensor.dtype)
        slots[self.rank].view(tensor.shape).copy_(tensor)
        self._flags[self.rank] = self._count  # after the data (x86 store order)
        self._wait_for_all(self._count)
        return slots

    def _wait_for_all(self, count: int) -> None:
        flags = self._flags
        if flags.min() >= count:
            return
        start = time.monotonic()
        while flags.min() < count:
            waited = time.monotonic() - start
            if waited < _SPIN_S:
                os.sched_yield()  # returns at once on an idle core; lets another rank run on a busy one
                continue
            late = [r for r in range(self.size) if flags[r] < count]
            gone = [r for r in late if _process_gone(int(self._pids[r]))]
            if gone:  # the words "peer exited" mark it as a lost peer for training.collective_errors
                raise RuntimeError(f"peer exited: group rank(s) {gone} (pid {[int(self._pids[r]) for r in gone]}) "
                                   f"ended before joining shared-memory collective #{count}")
            if waited > self.timeout.total_seconds():
                raise RuntimeError(
                    f"timed out after {waited:.0f} s in shared-memory collective #{count}: group rank {self.rank} "
                    f"waited for group rank(s) {late}, which hung or called the collectives in another order "
                    f"(set {ENV_SLOT_MB}=0 to use gloo instead)")
            time.sleep(0.001)


def _process_gone(pid: int) -> bool:
    """True once the process has exited (a zombie not yet reaped by its parent counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _slot_mb() -> int:
    value = os.environ.get(ENV_SLOT_MB, str(DEFAULT_SLOT_MB))
    if not value.strip().isdigit():
        raise ValueError(f"{ENV_SLOT_MB}={value!r}: give the size of a rank's slot as a whole number of MiB "
                         f"(default {DEFAULT_SLOT_MB}), or 0 to use gloo instead of shared memory")
    return int(value)


def _make_shared_file(nbytes: int) -> str | None:
    """A new file of `nbytes` in /dev/shm with its memory reserved now (None if there is no room:
    memory reserved later could fail with SIGBUS on first touch instead)."""
    path = os.path.join(SHM_DIR, f"megatronish-{uuid.uuid4().hex}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        os.close(fd)
        os.unlink(path)
        return None
    os.close(fd)
    return path


def _map(path: str | None, nbytes: int) -> mmap.mmap | None:
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # another host: the file is not here
        return None
    try:
        return mmap.mmap(fd, nbytes)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
