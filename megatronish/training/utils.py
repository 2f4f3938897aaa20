"""Small helpers of the training loop: printing from one rank, RNG state capture, process settings."""

import ctypes
import gc
import random

import numpy as np
import torch
import torch.distributed as dist

from megatronish.tensor_parallel import get_cuda_rng_tracker


def is_rank_0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_0(message: str) -> None:
    if is_rank_0():
        print(message, flush=True)


def freeze_setup_objects() -> None:
    """Move every object alive now (model, optimizer, data) out of the garbage collector's reach.

    They live for the whole run anyway; frozen, the collector's periodic full passes no longer
    walk them (those passes measured 3-5% of a CPU training step, and ranks that collect at
    different moments wait for each other at the next collective).
    """
    gc.collect()
    gc.freeze()


# mallopt() parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    PyTorch's CPU tensors come from malloc. By default glibc maps large blocks afresh and trims
    the heap after big frees, so every step's activations land on new pages and the first touch
    of each 4 KB page faults: 250-1800 minor faults per step of the nanoGPT CPU config, a few
    percent of the step. With blocks up to 32 MB (glibc's largest mmap threshold) taken from the
    heap and trimming off, a step reuses the pages of the one before (under 100 faults per step).
    The heap stays at its high-water mark, as a caching allocator's does. Returns False, changing
    nothing, where the C library has no mallopt (not glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def prepare_process_for_training_loop() -> None:
    """The process settings the training loop runs under; the benchmarks call this too, to time the same."""
    retain_freed_host_memory()
    freeze_setup_objects()


def print_rank_last(message: str) -> None:
    """Megatron logs training progress on the last rank (where the loss lives with pipelining)."""
    if is_last_rank():
        print(message, flush=True)


def get_rng_state() -> dict:
    """Every random stream this rank draws from: Python, NumPy, torch CPU/CUDA and the TP tracker."""
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
