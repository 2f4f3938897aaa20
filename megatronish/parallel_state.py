"""Process groups for tensor parallelism (TP) and data parallelism (DP).

Ranks are laid out TP-first: with world size W and TP size t, ranks [0, t), [t, 2t), ...
form the TP groups (adjacent ranks share a node's fast links), and ranks {i, i+t, i+2t, ...}
form the DP groups. DP size = W / t.

All state lives in one `_State` object so that `destroy_model_parallel()` resets it
completely (tests build and tear down many layouts in one process).
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatronish.attempt_store import torchelastic_attempt_store
from megatronish.shm_collectives import SharedMemoryCollectives


@dataclass
class _State:
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    tp_ranks: list[int] | None = None
    dp_ranks: list[int] | None = None
    device: torch.device | None = None
    timeout: timedelta | None = None  # of the TP/DP groups (torch would give new groups 30 minutes)
    tp_shared_memory: SharedMemoryCollectives | None = None  # the TP group's CPU collectives, where usable


_state = _State()


def default_backend() -> str:
    """NCCL where a GPU is present, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_device(backend: str | None = None) -> torch.device:
    """The device that matches a backend: the local GPU for NCCL, the CPU for gloo."""
    backend = backend or (dist.get_backend() if dist.is_initialized() else default_backend())
    if backend == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def set_cpu_threads(local_world_size: int | None = None) -> int:
    """Give each rank on this node an equal share of the CPU cores (at least one).

    Ranks that each use every core fight for them: on 2 cores, 2 ranks x 2 threads made a
    TP MLP 4-8x slower than 2 ranks x 1 thread. MEGATRONISH_NUM_THREADS, when set, wins (the
    test harness pins forked ranks to 1: OpenMP cannot start threads in a child forked from a
    process that already ran them). Returns the thread count it set.
    """
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = int(os.environ.get("MEGATRONISH_NUM_THREADS", 0)) or max(1, (cores or 1) // local_world_size)
    torch.set_num_threads(threads)
    return threads


def initialize_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> torch.device:
    """Start torch.distributed from torchrun's environment (or as a single process).

    Chooses NCCL + the local GPU where CUDA is available and gloo + CPU otherwise; pass
    `backend` to override. Without torchrun's variables it runs as a world of one.
    Returns the device this rank computes on.
    """
    backend = backend or default_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"unknown distributed backend {backend!r}: use 'nccl' (GPU) or 'gloo' (CPU)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' needs a CUDA GPU and none is visible: use --distributed-backend gloo")
    device = default_device(backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        set_cpu_threads()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            timeout=timedelta(minutes=timeout_minutes),
            store=torchelastic_attempt_store(timedelta(minutes=timeout_minutes)),
        )
    _state.device = device
    _state.timeout = timedelta(minutes=timeout_minutes)
    return device


def initialize_model_parallel(tensor_model_parallel_size: int = 1, device: torch.device | str | None = None) -> None:
    """Split the initialized world into TP groups of adjacent ranks and DP groups across them."""
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call megatronish.parallel_state.initialize_distributed() "
            "(or torch.distributed.init_process_group) before initialize_model_parallel()"
        )
    world_size = dist.get_world_size()
    tp = tensor_model_parallel_size
    if tp < 1 or world_size % tp != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-model-parallel size {tp}: "
            f"launch a multiple of {tp} ranks or choose a TP size that divides {world_size}"
        )
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel is already initialized: call destroy_model_parallel() first")
    rank = dist.get_rank()
    # Every rank must take part in creating every group, in the same order.
    for start in range(0, world_size, tp):
        ranks = list(range(start, start + tp))
        group = dist.new_group(ranks, timeout=_state.timeout)
        if rank in ranks:
            _state.tp_group, _state.tp_ranks = group, ranks
    for offset in range(tp):
        ranks = list(range(offset, world_size, tp))
        group = dist.new_group(ranks, timeout=_state.timeout)
        if rank in ranks:
            _state.dp_group, _state.dp_ranks = group, ranks
    _state.device = torch.device(device) if device is not None else (_state.device or default_device())
    if dist.get_backend(_state.tp_group) == "gloo":  # CPU ranks: TP activations go through shared memory
        _state.tp_shared_memory = SharedMemoryCollectives.create(
            _state.tp_group, _state.tp_ranks, _state.timeout or timedelta(minutes=30))


def model_parallel_is_initialized() -> bool:
    return _state.tp_group is not None and _state.dp_group is not None


def destroy_model_parallel() -> None:
    """Forget the groups so that another layout can be initialized."""
    global _state
    _state = _State()


def _require_initialized() -> None:
    if not model_parallel_is_initialized():
        raise RuntimeError(
            "model parallel is not initialized: call "
            "megatronish.parallel_state.initialize_model_parallel(tensor_model_parallel_size) first"
        )


def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    _require_initialized()
    return _state.tp_group


def get_tensor_model_parallel_shared_memory() -> SharedMemoryCollectives | None:
    """Shared-memory collectives of this rank's TP group (gloo ranks on one host), else None."""
    _require_initialized()
    return _state.tp_shared_memory


def get_data_parallel_group() -> dist.ProcessGroup:
    _require_initialized()
    return _state.dp_group


def get_tensor_model_parallel_world_size() -> int:
    _require_initialized()
    return len(_state.tp_ranks)


def get_tensor_model_parallel_rank() -> int:
    _require_initialized()
    return _state.tp_ranks.index(dist.get_rank())


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (the source for broadcasts)."""
    _require_initialized()
    return _state.tp_ranks[0]


def get_tensor_model_parallel_ranks() -> list[int]:
    _require_initialized()
    return list(_state.tp_ranks)


def get_data_parallel_world_size() -> int:
    _require_initialized()
    return len(_state.dp_ranks)


def get_data_parallel_rank() -> int:
    _require_initialized()
    return _state.dp_ranks.index(dist.get_rank())


def get_data_parallel_ranks() -> list[int]:
    _require_initialized()
    return list(_state.dp_ranks)


def all_reduce_in_group(tensor: torch.Tensor, group: dist.ProcessGroup | None = None,
                        op=dist.ReduceOp.SUM) -> None:
    """dist.all_reduce(tensor, op, group) (None: every rank), skipped when the group is this rank alone.

    For the per-step reductions of scalars (loss, gradient norm, stop flags): gloo takes ~150 us
    for a one-rank all-reduce on CPU, which is pure overhead then.
    """
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def get_device() -> torch.device:
    """The device this rank computes on (CUDA for NCCL, CPU for gloo)."""
    return _state.device or default_device()
