"""One writer per --save folder: two runs saving into one folder would interleave their checkpoints
and prune each other's. Rank 0 of a run holds an flock on `<save>/.megatronish.lock` (with its
host and pid written in it) for as long as its process lives; the kernel releases it when the
process dies, however it dies, so a crashed run never blocks its restart."""

import fcntl
import os
import socket

import torch.distributed as dist

LOCK_FILENAME = ".megatronish.lock"
_held: dict[str, object] = {}  # real path of a save folder -> its open lock file (this process is the writer)


def claim_save_folder(save_dir: str) -> None:
    """Collective: rank 0 takes the folder's lock; every rank raises if another run holds it."""
    outcome = [None]
    if dist.get_rank() == 0:
        outcome = [_lock(save_dir)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise RuntimeError(outcome[0])


def _lock(save_dir: str) -> str | None:
    """None once this process holds the lock, else why it cannot."""
    os.makedirs(save_dir, exist_ok=True)
    key = os.path.realpath(save_dir)
    if key in _held:
        return None
    path = os.path.join(save_dir, LOCK_FILENAME)
    lock_file = open(path, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        owner = lock_file.read().strip() or "unknown"
        lock_file.close()
        return (f"another run ({owner}) is saving into --save {save_dir} (it holds {path}): stop it, or give this "
                "run its own --save folder")
    except OSError:  # a file system without locks (some bucket mounts): nothing to enforce with
        lock_file.close()
        return None
    lock_file.truncate(0)
    lock_file.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    lock_file.flush()
    _held[key] = lock_file
    return None
