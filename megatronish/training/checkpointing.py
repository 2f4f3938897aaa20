"""Saving and loading training checkpoints (first version: same TP size on save and load).

Layout, as Megatron's:
    <dir>/latest_checkpointed_iteration.txt     the newest complete checkpoint's iteration
    <dir>/iter_0000100/mp_rank_00/model_optim_rng.pt   one file per TP rank
Each file holds the model's state dict (this TP rank's shards), the optimizer state by
parameter name (`sharded_state_by_name`, gathered over DP when sharded, so DP rank 0's file
has all of it), the LR scheduler, this rank's RNG streams, the training progress and the
arguments. DP rank 0 of each TP group writes; every rank reads its TP rank's file and the
optimizer takes its own DP slice. The tracker file is written last, after every rank has
finished, so a crash mid-save leaves the previous checkpoint as the latest.

The training loop calls only `save_checkpoint` and `load_checkpoint` with the signatures below.
"""

import os
import shutil

import torch
import torch.distributed as dist

from megatronish import parallel_state
from megatronish.training.progress import TrainingProgress
from megatronish.training.utils import get_rng_state, print_rank_0, set_rng_state

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank_file(root: str, iteration: int, tp_rank: int) -> str:
    return os.path.join(checkpoint_dir(root, iteration), f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")


def read_latest_iteration(root: str) -> int | None:
    """The iteration in the tracker file, or None when `root` holds no checkpoint yet."""
    tracker = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker} should hold an iteration number, found {text!r}: fix or delete the file")
    return int(text)


def save_checkpoint(save_dir: str, progress: TrainingProgress, model, optimizer, scheduler, args,
                    keep_last: int | None = None) -> str:
    """Save everything needed to resume at `progress.iteration`; returns the checkpoint's folder.

    Collective: every rank calls it. `model` is the unwrapped GPTModel; `optimizer` has
    `sharded_state_by_name()`; `scheduler` has `state_dict()`; `args` is the argparse Namespace.
    `keep_last` deletes all but the newest `keep_last` checkpoints.
    """
    optimizer_state = optimizer.sharded_state_by_name()  # collective with the distributed optimizer
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    path = _rank_file(save_dir, progress.iteration, tp_rank)
    if parallel_state.get_data_parallel_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = {
            "progress": progress.to_dict(),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "model": model.state_dict(),
            "optimizer": optimizer_state,
            "opt_param_scheduler": scheduler.state_dict(),
            "rng_state": get_rng_state(),
            "args": vars(args),
        }
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a reader never sees a half-written file
    _barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, TRACKER_FILENAME + ".tmp"), "w") as f:
            f.write(str(progress.iteration))
        os.replace(os.path.join(save_dir, TRACKER_FILENAME + ".tmp"), os.path.join(save_dir, TRACKER_FILENAME))
        if keep_last:
            _delete_old_checkpoints(save_dir, keep_last)
    _barrier()
    folder = checkpoint_dir(save_dir, progress.iteration)
    print_rank_0(f"saved checkpoint at iteration {progress.iteration} to {folder}")
    return folder


def load_checkpoint(load_dir: str, model, optimizer, scheduler, *, load_optim: bool = True,
                    load_rng: bool = True) -> TrainingProgress | None:
    """Restore the newest checkpoint under `load_dir` into model/optimizer/scheduler (in place).

    Returns the saved TrainingProgress, or None when `load_dir` holds no checkpoint yet (a fresh
    start: the run then saves its first checkpoint there). `load_optim=False` restores only the
    model weights (optimizer and scheduler start fresh; the progress still comes back).
    """
    iteration = read_latest_iteration(load_dir)
    if iteration is None:
        print_rank_0(f"no checkpoint found in {load_dir} ({TRACKER_FILENAME} missing): starting from scratch")
        return None
    tp = parallel_state.get_tensor_model_parallel_world_size()
    path = _rank_file(load_dir, iteration, parallel_state.get_tensor_model_parallel_rank())
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} is missing: the checkpoint at iteration {iteration} is "
                                "incomplete, or was saved at a larger TP size")
    state = torch.load(path, map_location=parallel_state.get_device(), weights_only=False)
    saved_tp = state["tensor_model_parallel_size"]
    if saved_tp != tp:
        raise ValueError(f"checkpoint {path} was saved at TP={saved_tp}, this run uses TP={tp}: "
                         f"resume with --tp {saved_tp}")
    model.load_state_dict(state["model"])
    if load_optim:
        optimizer.load_state_by_name(state["optimizer"])  # also sets the model weights from the fp32 masters
        scheduler.load_state_dict(state["opt_param_scheduler"])
    else:
        optimizer.reload_model_params()
    if load_rng:
        set_rng_state(state["rng_state"])
    print_rank_0(f"loaded checkpoint from {checkpoint_dir(load_dir, iteration)} at iteration {iteration}")
    return TrainingProgress.from_dict(state["progress"])


def _delete_old_checkpoints(root: str, keep_last: int) -> None:
    iterations = sorted(int(name[5:]) for name in os.listdir(root) if name.startswith("iter_") and name[5:].isdigit())
    for old in iterations[:-keep_last]:
        shutil.rmtree(checkpoint_dir(root, old), ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
