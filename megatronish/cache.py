"""Where on-disk caches live, and how several processes share them safely.

Cached files are published with an atomic rename, so a reader never sees half a file, and
builders that may race (several ranks of one node) serialize on a file lock.
"""

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def cache_root() -> Path:
    """`$MEGATRONISH_CACHE` if set, else `~/.cache/megatronish`."""
    return Path(os.environ.get("MEGATRONISH_CACHE") or Path.home() / ".cache" / "megatronish")


@contextmanager
def file_lock(path: str | Path):
    """Hold an exclusive advisory lock on `path` (created if missing) for the `with` block.

    flock, unlike a lock file that is created and deleted, is released by the kernel if its
    holder dies, so a crashed rank never leaves the others waiting.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def partial_path(path: str | Path) -> str:
    """The name a file is written under before it is published; unique per process."""
    return f"{path}.partial-{os.getpid()}"


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    tmp = partial_path(path)
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)
