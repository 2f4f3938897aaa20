"""The process-wide view of the parallel layout, with Megatron-core's names; device and backend choice.

`initialize_distributed()` starts torch.distributed (NCCL + GPU where there is one, gloo + CPU
otherwise); `initialize_model_parallel(tp, pp)` builds a `ParallelLayout` (parallel_layout.py:
TP ranks adjacent, then DP, then PP) and makes it current. The getters below
(`get_tensor_model_parallel_rank()`, `is_pipeline_first_stage()`, ...) describe the current
layout, so scripts written for Megatron-core keep working; the package's own components take
the layout (or its groups) explicitly and read nothing from here but defaults.

All state lives in one `_State` object so that `destroy_model_parallel()` resets it
completely (tests build and tear down many layouts in one process).
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatronish.attempt_store import torchelastic_attempt_store
from megatronish.parallel_layout import ParallelLayout, shared_memory_for
from megatronish.shm_collectives import SharedMemoryCollectives


@dataclass
class _State:
    layout: ParallelLayout | None = None
    virtual_pipeline_rank: int | None = None  # the model chunk running now (interleaved pipelines)
    device: torch.device | None = None
    timeout: timedelta | None = None  # of the layout's groups (torch would give new groups 30 minutes)


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
        store = torchelastic_attempt_store(timedelta(minutes=timeout_minutes))
        if store is None and "WORLD_SIZE" not in os.environ:
            store = dist.HashStore()  # a world of one needs no port (two such tools at once would both want 29500)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            timeout=timedelta(minutes=timeout_minutes),
            store=store,
        )
    _state.device = device
    _state.timeout = timedelta(minutes=timeout_minutes)
    return device


# Megatron-core's rank orders that equal the one here (TP fastest, then DP, then PP; no CP or EP ranks).
_RANK_ORDERS = ("tp-cp-ep-dp-pp", "tp-dp-pp", "tp-cp-dp-pp", "tp-ep-dp-pp")


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: int | None = None, *,
                              context_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                              expert_tensor_parallel_size: int | None = None, order: str = "tp-cp-ep-dp-pp",
                              distributed_timeout_minutes: float | None = None,
                              device: torch.device | str | None = None, **megatron_tuning) -> ParallelLayout:
    """Build the TP x PP x DP layout of the initialized world (Megatron's rank order) and make it current.

    Megatron-core's signature: sizes in its order, its keywords (context/expert sizes must be 1: neither
    is built here; `order` must put TP first and PP last; NCCL tuning keywords such as use_sharp or
    nccl_communicator_config_path are accepted and change nothing). Returns the layout, which can also be
    passed explicitly to the model, the DDP wrapper, the optimizer and the schedules.
    """
    if context_parallel_size != 1 or expert_model_parallel_size != 1 or expert_tensor_parallel_size not in (None, 1,
                                                                                                          tensor_model_parallel_size):
        raise ValueError(f"context_parallel_size {context_parallel_size}, expert_model_parallel_size "
                         f"{expert_model_parallel_size}: megatronish has no context or expert parallelism; use 1")
    if order not in _RANK_ORDERS:
        raise ValueError(f"rank order {order!r} is not built: ranks are ordered TP, DP, PP here (one of {_RANK_ORDERS})")
    if distributed_timeout_minutes is not None:
        _state.timeout = timedelta(minutes=distributed_timeout_minutes)
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel is already initialized: call destroy_model_parallel() first")
    layout = ParallelLayout.build(tensor_model_parallel_size, pipeline_model_parallel_size,
                                  virtual_pipeline_model_parallel_size, timeout=_state.timeout)
    if device is not None:
        _state.device = torch.device(device)
    set_layout(layout)
    return layout


def set_layout(layout: ParallelLayout | None) -> None:
    """Make `layout` the one the getters below describe (None: no current layout)."""
    _state.layout = layout
    _state.virtual_pipeline_rank = 0 if layout is not None and layout.dims.virtual_pp else None


def get_layout() -> ParallelLayout:
    """The current layout (set by initialize_model_parallel or set_layout)."""
    if _state.layout is None:
        raise RuntimeError(
            "model parallel is not initialized: call "
            "megatronish.parallel_state.initialize_model_parallel(tensor_model_parallel_size) first"
        )
    return _state.layout


def model_parallel_is_initialized() -> bool:
    return _state.layout is not None


def destroy_model_parallel() -> None:
    """Forget the current layout so that another one can be initialized."""
    global _state
    if _state.layout is not None:
        _state.layout.destroy()
    _state = _State(device=_state.device, timeout=_state.timeout)


# -- Megatron-core's getters: a view of the current layout --

def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    return get_layout().tp_group


def get_data_parallel_group() -> dist.ProcessGroup:
    return get_layout().dp_group


def get_pipeline_model_parallel_group() -> dist.ProcessGroup:
    return get_layout().pp_group


def get_model_parallel_group() -> dist.ProcessGroup:
    """TP x PP: the ranks that hold one replica of the model together."""
    return get_layout().model_parallel_group


def get_embedding_group() -> dist.ProcessGroup | None:
    """First and last pipeline stage (tied word embeddings); None on other stages or without PP."""
    return get_layout().embedding_group


def get_tensor_model_parallel_world_size() -> int:
    return get_layout().tp


def get_tensor_model_parallel_rank() -> int:
    return get_layout().tp_rank


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (the source for broadcasts)."""
    return get_layout().tp_ranks[0]


def get_tensor_model_parallel_ranks() -> list[int]:
    return list(get_layout().tp_ranks)


def get_data_parallel_world_size() -> int:
    return get_layout().dp


def get_data_parallel_rank() -> int:
    return get_layout().dp_rank


def get_data_parallel_ranks() -> list[int]:
    return list(get_layout().dp_ranks)


def get_data_parallel_src_rank() -> int:
    return get_layout().dp_ranks[0]


def get_pipeline_model_parallel_world_size() -> int:
    return get_layout().pp


def get_pipeline_model_parallel_rank() -> int:
    return get_layout().pp_rank


def get_pipeline_model_parallel_ranks() -> list[int]:
    return list(get_layout().pp_ranks)


def get_pipeline_model_parallel_first_rank() -> int:
    return get_layout().pp_ranks[0]


def get_pipeline_model_parallel_last_rank() -> int:
    return get_layout().pp_ranks[-1]


def get_pipeline_model_parallel_next_rank() -> int:
    return get_layout().next_stage_rank


def get_pipeline_model_parallel_prev_rank() -> int:
    return get_layout().prev_stage_rank


def get_virtual_pipeline_model_parallel_world_size() -> int | None:
    return get_layout().dims.virtual_pp


def get_virtual_pipeline_model_parallel_rank() -> int | None:
    get_layout()
    return _state.virtual_pipeline_rank


def set_virtual_pipeline_model_parallel_rank(rank: int | None) -> None:
    """The model chunk running now (interleaved schedules set it; is_pipeline_first/last_stage read it)."""
    get_layout()
    _state.virtual_pipeline_rank = rank


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on the first pipeline stage (and, with virtual stages, only while its first chunk runs)."""
    layout = get_layout()
    if not ignore_virtual and layout.dims.virtual_pp and _state.virtual_pipeline_rank != 0:
        return False
    return layout.is_first_stage


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the last pipeline stage (and, with virtual stages, only while its last chunk runs)."""
    layout = get_layout()
    if (not ignore_virtual and layout.dims.virtual_pp
            and _state.virtual_pipeline_rank != layout.dims.virtual_pp - 1):
        return False
    return layout.is_last_stage


def get_context_parallel_world_size() -> int:
    """1: no context parallelism here (Megatron-core model code asks)."""
    return 1


def get_context_parallel_rank() -> int:
    return 0


def get_expert_model_parallel_world_size() -> int:
    """1: no expert parallelism here."""
    return 1


def get_tensor_model_parallel_shared_memory() -> SharedMemoryCollectives | None:
    """Shared-memory collectives of this rank's TP group (gloo ranks on one host), else None."""
    return shared_memory_for(get_layout().tp_group)


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
