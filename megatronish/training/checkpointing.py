"""Training checkpoints that load at any TP x PP x DP layout, saved atomically, optionally in the background.

On disk (Megatron's names for the folders):
    <save>/latest_checkpointed_iteration.txt      the newest complete checkpoint's iteration
    <save>/iter_0000100/checkpoint.json           iteration, consumed samples, arguments, model config
                                                  (with the true vocab size), LR scheduler, loss scaler,
                                                  Adam step, the layout it was saved at, tensor shapes
    <save>/iter_0000100/.metadata                 DCP's index: every tensor's global shape and chunks
    <save>/iter_0000100/__<rank>_0.distcp          DCP data files, one per writing rank
    <save>/iter_0000100/manifest.json             every other file with its size, written last
Tensors (see checkpoint_format.py for how a TP shard becomes a block of a global tensor):
    model.<param name>                            the weights (vocabulary rows unpadded)
    optimizer.<param name>.{master,exp_avg,exp_avg_sq}   fp32, the parameter's layout
    rng.rank<global rank>                         this rank's Python, NumPy, torch, CUDA, TP-tracker states
Parameter names are global (a layer keeps its number at any PP size), so each pipeline stage
writes and reads its own parameters by name; the two copies of tied embeddings (first and last
stage) are one entry. The optimizer state comes from `sharded_state_by_name()` (the distributed optimizer gathers its
DP shards into the TP-shard shape), so it reshards exactly like the parameters.

With --ckpt-format torch_dist the same tensors are laid out as Megatron-LM's torch_dist checkpoints lay them out
(megatron_checkpoint.TorchDistLayout: Megatron's keys, layers stacked, vocabulary padded; the optimizer states
under `optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<key>`), Megatron's common.pt and metadata.json take
checkpoint.json's place, and checkpoint.json's content sits in common.pt under "megatronish"; saving, publishing
and loading are the same code.

A save writes everything into `iter_XXXXXXX.tmp`, fsyncs it, and only then renames it to
`iter_XXXXXXX`, checks the published folder against its manifest, and only then rewrites the
tracker file (write + rename): a crash at any point leaves the previous checkpoint as the latest,
complete and loadable. `keep_last` prunes after that, among the iterations up to the new one.
`load_checkpoint` loads the tracked checkpoint if it is complete, otherwise the newest complete
one before it (checkpoint_manifest.py), with a log line.
With `async_save=True` the state is copied to CPU memory (staging) and written by a background
thread over a process group of its own while training goes on; the next save, and the end of
training (`wait_for_async_save`), wait for it.

The training loop calls `save_checkpoint`, `load_checkpoint` and `wait_for_async_save`;
evaluation and tools call `load_model_for_inference` / `read_checkpoint_config`.
"""

import argparse
import json
import os
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from megatronish.model import GPTModel, TransformerConfig
from megatronish.parallel_layout import ParallelLayout
from megatronish.tensor_parallel import model_parallel_manual_seed
from megatronish.training import megatron_checkpoint
from megatronish.training.checkpoint_compat import check_architecture
from megatronish.training.checkpoint_format import (
    Block,
    MegatronishLayout,
    add_block,
    blocks_of,
    check_against_metadata,
    load_blocks,
    parameter_block,
    read_metadata,
    save_blocks,
)
from megatronish.training.checkpoint_manifest import (
    MANIFEST_FILENAME,
    checkpoint_iterations,
    choose_checkpoint,
    why_incomplete,
    write_manifest,
)
from megatronish.training.collective_errors import named_collective
from megatronish.training.progress import TrainingProgress
from megatronish.training.utils import get_rng_state, print_rank_0, set_rng_state

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
COMMON_FILENAME = "checkpoint.json"
FORMAT_NAME = "megatronish-dcp"
FORMAT_VERSION = 1
OPTIMIZER_KEYS = ("master", "exp_avg", "exp_avg_sq")


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str) -> int | None:
    """The iteration in the tracker file, or None when `root` holds no checkpoint yet (or does not exist)."""
    tracker = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, "rb") as f:
        text = f.read().decode("utf-8", errors="backslashreplace").strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{tracker} should hold an iteration number, found {text!r}: fix or delete the file")
    return int(text)


# ----------------------------------------------------------------------------------------- saving

_writer: ThreadPoolExecutor | None = None
_pending: Future | None = None
_async_group, _async_group_world = None, None  # the writer's process group, and the world it belongs to


def save_checkpoint(save_dir: str, progress: TrainingProgress, model, optimizer, scheduler, args,
                    keep_last: int | None = None, async_save: bool = False) -> str:
    """Save everything needed to resume at `progress.iteration`; returns the checkpoint's folder.

    Collective: every rank calls it. `model` is the unwrapped GPTModel (or the list of this pipeline
    stage's model chunks); `optimizer` has `sharded_state_by_name()`; `scheduler` has `state_dict()`;
    `args` is the argparse Namespace. `keep_last` keeps the newest `keep_last` checkpoints up to this
    one (folders of later iterations are another run's). With `async_save` the files are written in
    the background; the folder appears when they are complete (training raises the error of a failed
    one at its next iteration: raise_if_async_save_failed).
    """
    wait_for_async_save()
    with named_collective(f"while saving the checkpoint of iteration {progress.iteration}"):
        return _save(save_dir, progress, model, optimizer, scheduler, args, keep_last, async_save)


def _save(save_dir, progress, model, optimizer, scheduler, args, keep_last, async_save) -> str:
    start = time.perf_counter()
    state, common = checkpoint_state(progress, model, optimizer, scheduler, args,
                                     torch_dist=getattr(args, "ckpt_format", None) == "torch_dist")
    final = checkpoint_dir(save_dir, progress.iteration)
    temporary = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        _remove_stale_temporaries(save_dir)
    dist.barrier()

    if not async_save:
        _write(state, common, temporary, final, save_dir, keep_last, group=None)
        print_rank_0(f"saved checkpoint at iteration {progress.iteration} to {final} "
                     f"({time.perf_counter() - start:.2f} s)")
        return final
    global _writer, _pending, _async_group, _async_group_world
    if _async_group_world is not dist.group.WORLD:  # the writer thread's collectives must not interleave
        _async_group, _async_group_world = dist.new_group(backend="gloo"), dist.group.WORLD  # with training's
        _writer = _writer or ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
    _pending = _writer.submit(_write, stage_on_cpu(state), common, temporary, final, save_dir, keep_last,
                              _async_group)
    print_rank_0(f"staged checkpoint at iteration {progress.iteration} in {time.perf_counter() - start:.2f} s; "
                 f"writing {final} in the background")
    return final


def wait_for_async_save() -> None:
    """Block until a background save has finished (and raise its error, if it failed)."""
    global _pending
    if _pending is not None:
        pending, _pending = _pending, None
        pending.result()


def checkpoint_state(progress: TrainingProgress, model, optimizer, scheduler, args,
                     torch_dist: bool = False) -> tuple[dict, dict]:
    """(this rank's tensors and RNG states as DCP blocks, the checkpoint's description): what a save writes.
    `torch_dist`: laid out as Megatron-LM's torch_dist checkpoints are (megatron_checkpoint.TorchDistLayout), the
    description wrapped in Megatron's common state; otherwise this format's layout and checkpoint.json's content.
    Collective (the distributed optimizer gathers its shards; under PP the stages share their shapes)."""
    optimizer_state = optimizer.sharded_state_by_name()
    stored = megatron_checkpoint.TorchDistLayout(_chunks(model)[0].config.num_layers) if torch_dist else MegatronishLayout
    state = checkpoint_blocks(model, optimizer_state, stored)
    state[_rng_key(dist.get_rank())] = get_rng_state()
    common = checkpoint_description(progress, model, optimizer_state, scheduler, args)
    return state, _megatron_common_state(common, model, args) if torch_dist else common


def stage_on_cpu(state: dict) -> dict:
    """A copy of `checkpoint_state`'s blocks that training cannot change, for a background writer: the weights
    are live tensors (copied); the optimizer state is already a private copy (only moved off the GPU)."""
    return {name: _staged_on_cpu(value, copy=not name.startswith("optimizer.")) for name, value in state.items()}


def _staged_on_cpu(value, copy: bool):
    blocks = blocks_of(value)
    if blocks is None:
        return value
    staged = [Block(block.local.detach().to("cpu", copy=copy), block.global_shape, block.offsets) for block in blocks]
    return staged[0] if isinstance(value, Block) else staged


def checkpoint_blocks(model, optimizer_state: dict, stored=MegatronishLayout) -> dict:
    """The tensors a checkpoint stores for `model` (weights) and its optimizer (`sharded_state_by_name()`), laid out
    as `stored` says (this format's, or megatron_checkpoint.TorchDistLayout)."""
    state = _model_blocks(model, lambda name, param: param.detach(), stored)
    state.update(_optimizer_blocks(model, lambda name, param, key: optimizer_state["params"][name][key], stored))
    state.update(stored.extra_items(name for name, _ in _named_parameters(model)))
    return state


def raise_if_async_save_failed() -> None:
    """Raise the error of a background save that has failed, now (training calls this every iteration:
    a full disk must stop the run at once, not one save interval later)."""
    if _pending is not None and _pending.done() and _pending.exception() is not None:
        wait_for_async_save()


def _write(state, common, temporary, final, save_dir, keep_last, group) -> None:
    with named_collective(f"writing {final}"):
        try:
            save_blocks(state, temporary, process_group=group)  # DCP fsyncs every data file
        except CheckpointException as error:  # DCP's message is a dump of every rank's traceback
            raise OSError(f"writing checkpoint {temporary} failed: {_cause_of_failed_write(error, temporary)}") from None
        if dist.get_rank() == 0:  # DCP returned on rank 0 only after every rank's files were written
            publish_checkpoint(temporary, save_dir, common, keep_last)
        dist.barrier(group=group)


def _cause_of_failed_write(error: CheckpointException, folder: str) -> str:
    """The OS error behind a failed DCP save (a full disk...). torch.save reports a failed write as
    "unexpected pos", so the folder is probed with a write of its own, which fails the same way."""
    try:
        probe = os.open(os.path.join(folder, ".write-probe"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(probe, bytes(1 << 20))
            os.fsync(probe)
        finally:
            os.close(probe)
            os.remove(os.path.join(folder, ".write-probe"))
    except OSError as os_error:
        return str(os_error).split(":")[0]  # "[Errno 28] No space left on device" without the path
    failures = [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
    return f"{type(failures[0]).__name__}: {failures[0]}" if failures else str(error)


def publish_checkpoint(temporary: str, save_dir: str, common: dict, keep_last: int | None = None) -> str:
    """Finish a folder whose DCP files are written and synced: add checkpoint.json (`common`; or Megatron's
    common.pt and metadata.json when `common` is a torch_dist common state) and the manifest, rename it to
    iter_XXXXXXX, check it, and only then name it in the tracker file."""
    final = checkpoint_dir(save_dir, common["iteration"])
    if megatron_checkpoint.MEGATRONISH_KEY in common:
        megatron_checkpoint.write_common_state(temporary, common)
    else:
        _write_json_durably(os.path.join(temporary, COMMON_FILENAME), common)
    write_manifest(temporary, _write_text_durably)
    _fsync_dir(temporary)
    _publish(temporary, final)
    incomplete = why_incomplete(final)
    if incomplete:  # the tracker must never name it
        raise OSError(f"checkpoint {final} is incomplete right after saving: {incomplete}")
    _write_text_durably(os.path.join(save_dir, TRACKER_FILENAME), str(common["iteration"]))
    if keep_last:
        _delete_old_checkpoints(save_dir, keep_last, common["iteration"])
    return final


def _publish(temporary: str, final: str) -> None:
    """Rename the finished folder into place (replacing an older save of the same iteration)."""
    replaced = None
    if os.path.exists(final):
        replaced = final + ".replaced.tmp"
        os.rename(final, replaced)
    os.rename(temporary, final)
    _fsync_dir(os.path.dirname(final) or ".")
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)


def checkpoint_description(progress, model, optimizer_state, scheduler, args, all_stages: bool = True) -> dict:
    """checkpoint.json's content. Under PP it lists every stage's parameters (a collective over the
    pipeline), unless `all_stages` is False (a SWARM stage, which merges the lists when it assembles)."""
    layout, config = _layout(model), _chunks(model)[0].config
    # TP rank 0's block: a rank holding only vocabulary padding has none, and the global shape is the same.
    parameters = {name: {"stored_shape": list(parameter_block(param, param, 0, layout.tp).global_shape),
                         "shape": _full_unpadded_shape(param, layout.tp)} for name, param in _named_parameters(model)}
    if layout.pp > 1 and all_stages:  # every stage's parameters, so that one file describes the whole model
        per_stage = [None] * layout.pp
        dist.all_gather_object(per_stage, parameters, group=layout.pp_group)
        parameters = {name: shapes for stage in per_stage for name, shapes in stage.items()}
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "iteration": progress.iteration, "progress": progress.to_dict(),
        "layout": _layout_record(layout),
        "model_config": config.to_dict(), "vocab_size": config.vocab_size,
        "parameters": parameters,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "optimizer": ({"step": optimizer_state["step"], "grad_scaler": optimizer_state["grad_scaler"]}
                      if optimizer_state is not None else None),
        "args": {key: value for key, value in vars(args).items() if _is_json(value)} if args is not None else None,
        "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _megatron_common_state(description: dict, model, args) -> dict:
    """Megatron-LM's common state for a torch_dist save: its args (this run's, with the model's shape and layout by
    Megatron's names, and the consumed samples it resumes from), iteration and opt_param_scheduler, and
    `description` (checkpoint.json's content) beside them. Megatron's own optimizer dict (param groups by its
    grouping) and RNG states are not written: the args say no_save_optim / no_save_rng, so Megatron-LM starts
    both fresh from it; megatronish resumes them (the optimizer tensors, the step and its RNG items)."""
    layout, config, progress = _layout(model), _chunks(model)[0].config, description["progress"]
    shape = megatron_checkpoint.megatron_args(
        config, tp=layout.tp, pp=layout.pp, iteration=description["iteration"], seq_length=args.seq_length,
        extra={"consumed_train_samples": progress["consumed_train_samples"],
               "consumed_valid_samples": progress["consumed_valid_samples"], "data_parallel_size": layout.dp,
               "world_size": layout.dims.world_size})
    saved_args = argparse.Namespace(**{**(description["args"] or {}), **vars(shape)})
    return megatron_checkpoint.common_state(saved_args, description["iteration"], description["scheduler"], description)


# ---------------------------------------------------------------------------------------- loading

@dataclass
class LoadedCheckpoint:
    """What a load restored, for the caller's log (an elastic restart reports it)."""
    progress: TrainingProgress
    folder: str
    saved_layout: str           # the layout it was saved at, e.g. "TP=2 x PP=1 x DP=2"
    seconds: float
    node_local: bool = False    # a local checkpoint (local_checkpoint.py), not one under --load


def load_checkpoint(load_dir: str, model, optimizer, scheduler, *, load_optim: bool = True,
                    load_rng: bool = True, finetune: bool = False, allow_architecture_change: bool = False,
                    seed: int | None = None) -> TrainingProgress | None:
    """Restore the newest checkpoint under `load_dir` into model/optimizer/scheduler, in place, at
    whatever TP x PP x DP layout this run has.

    Returns the saved TrainingProgress, or None when `load_dir` holds no checkpoint yet (a fresh
    start: the same command line then works for the first run and every restart).
    `load_optim=False` restores the weights only (optimizer and scheduler start fresh, the
    progress still comes back). `finetune=True` loads the weights only and starts at iteration 0;
    with `allow_architecture_change` too, a checkpoint of another architecture loads the parameters
    both models share (checkpoint_compat.py). RNG states come back only when the layout is the one
    they were saved at; otherwise, given `seed` (--seed), they are re-derived (load_checkpoint_folder).
    """
    loaded = load_newest_checkpoint(load_dir, model, optimizer, scheduler, load_optim=load_optim, load_rng=load_rng,
                                    finetune=finetune, allow_architecture_change=allow_architecture_change, seed=seed)
    return loaded.progress if loaded else None


def load_newest_checkpoint(load_dir: str, model, optimizer, scheduler, **options) -> LoadedCheckpoint | None:
    """load_checkpoint, returning what was loaded (None: no checkpoint, a fresh start)."""
    megatron = _megatron_lm_checkpoint(load_dir)
    if megatron is not None:  # Megatron-LM's torch_dist or legacy torch format
        start = time.perf_counter()
        progress, what = megatron_checkpoint.load_for_training(load_dir, _chunks(model), optimizer, scheduler,
                                                               finetune=options.get("finetune", False))
        print_rank_0(f"loaded checkpoint {load_dir} at iteration {progress.iteration}: {what}")
        return LoadedCheckpoint(progress, megatron[0], "a Megatron-LM layout", time.perf_counter() - start)
    iteration = agreed_checkpoint_iteration(load_dir)
    if iteration is None:
        if options.get("finetune"):
            raise FileNotFoundError(f"--finetune --load {load_dir}: there is no checkpoint in {load_dir} to fine-tune "
                                    "from; give the folder of a saved checkpoint (or drop --finetune)")
        print_rank_0(f"no checkpoint in {load_dir} (neither {TRACKER_FILENAME} nor iter_* folders): "
                     "starting from scratch")
        return None
    return load_checkpoint_folder(checkpoint_dir(load_dir, iteration), model, optimizer, scheduler, **options)


def load_checkpoint_folder(folder: str, model, optimizer, scheduler, *, load_optim: bool = True,
                           load_rng: bool = True, finetune: bool = False, allow_architecture_change: bool = False,
                           seed: int | None = None, no_dist: bool = False) -> LoadedCheckpoint:
    """Restore one checkpoint folder (see load_checkpoint). `no_dist=True`: each rank reads on its own (a
    node-local folder that holds the files this rank needs, local_checkpoint.py; folders differ between nodes).

    RNG states saved at another layout do not apply (each rank has its own streams); with `seed` they are
    re-derived from it and the checkpoint's iteration, so that a change of layout at a given iteration
    draws the same dropout masks each time it is replayed; the log says so.
    """
    start = time.perf_counter()
    common = read_common(folder)
    metadata = FileSystemReader(folder).read_metadata() if no_dist else read_metadata(folder)
    iteration = common["iteration"]
    load_optim = load_optim and not finetune
    load_rng = load_rng and not finetune
    changed = check_architecture(folder, common["model_config"], _chunks(model)[0].config.to_dict(),
                                 allow_change=finetune and allow_architecture_change)

    stored = _stored_layout(folder, metadata, _chunks(model)[0].config)
    state = _model_blocks(model, lambda name, param: param.data, stored)
    if changed:
        state = _shared_blocks(state, metadata, changed)
    moments = {}
    if load_optim:
        if common["optimizer"] is None:
            raise ValueError(f"{folder} holds no optimizer state (a model-only checkpoint): resume with "
                             "--no-load-optim or --finetune")
        moments = {name: {key: torch.zeros(param.shape, dtype=torch.float32, device=param.device)
                          for key in OPTIMIZER_KEYS} for name, param in _named_parameters(model)}
        state.update(_optimizer_blocks(model, lambda name, param, key: moments[name][key], stored))
    rng_key = _rng_key(dist.get_rank())
    rng_unusable = _why_rng_unusable(common, metadata, rng_key, _layout(model)) if load_rng else None
    restore_rng = load_rng and rng_unusable is None
    if restore_rng:
        state[rng_key] = None
    check_against_metadata(state, metadata)
    _zero_vocabulary_padding(model)
    try:
        load_blocks(state, folder, no_dist=no_dist)
    except Exception as error:
        raise RuntimeError(f"reading checkpoint {folder} failed: {error}") from error

    if load_optim:
        optimizer.load_state_by_name({"params": moments, "step": common["optimizer"]["step"],
                                      "grad_scaler": common["optimizer"]["grad_scaler"]})
        scheduler.load_state_dict(common["scheduler"])
    else:
        optimizer.reload_model_params()
    if restore_rng:
        set_rng_state(state[rng_key])
    elif rng_unusable and seed is not None:
        _rederive_rng(seed, iteration, _layout(model))
        print_rank_0(f"not restoring the RNG states: {rng_unusable}; every stream (torch, CUDA, the tensor-parallel "
                     f"tracker, Python, NumPy) is re-derived from --seed {seed} and iteration {iteration}")
    elif rng_unusable:
        print_rank_0(f"not restoring the RNG states: {rng_unusable}; the streams continue from --seed")
    progress = TrainingProgress() if finetune else TrainingProgress.from_dict(common["progress"])
    what = "weights only (--finetune: starting at iteration 0)" if finetune else (
        ("model, optimizer, scheduler" if load_optim else "weights only (--no-load-optim)")
        + (", RNG" if restore_rng else ""))
    seconds = time.perf_counter() - start
    print_rank_0(f"loaded checkpoint {folder} at iteration {iteration}: {what} ({seconds:.2f} s)")
    return LoadedCheckpoint(progress, folder, _describe(_layout_record_filled(common["layout"])), seconds)


def _rederive_rng(seed: int, iteration: int, layout: ParallelLayout) -> None:
    """Seed every stream as a fresh run would, from a seed that mixes --seed with the iteration."""
    mixed = int(np.random.SeedSequence([seed, iteration]).generate_state(1)[0])
    model_parallel_manual_seed(mixed, layout)
    random.seed(mixed)
    np.random.seed(mixed)




def _shared_blocks(state: dict, metadata, changed: list[str]) -> dict:
    """The blocks the checkpoint holds at the same global shape; says which keep their initialization."""
    stored = metadata.state_dict_metadata
    shared = {name: block for name, block in state.items()
              if name in stored and tuple(getattr(stored[name], "size", ())) == tuple(blocks_of(block)[0].global_shape)}
    fresh = sorted(set(state) - set(shared))
    print_rank_0(f"--allow-architecture-change ({'; '.join(changed)}): {len(shared)} tensors loaded, "
                 f"{len(fresh)} keep their initialization{': ' + ', '.join(fresh[:8]) if fresh else ''}"
                 f"{' ...' if len(fresh) > 8 else ''}")
    return shared


def newest_complete_checkpoint(load_dir: str) -> tuple[int | None, list[str]]:
    """(iteration, log lines): the tracked checkpoint if complete, else the newest complete one
    before it; (None, []) for an empty or missing folder. Raises if folders exist but none is complete."""
    return choose_checkpoint(load_dir, read_latest_iteration(load_dir), lambda i: checkpoint_dir(load_dir, i))


def durable_checkpoint_iteration(load_dir: str) -> int | None:
    """The iteration of the checkpoint load_newest_checkpoint would load from `load_dir` (None: none). Collective."""
    megatron = _megatron_lm_checkpoint(load_dir)
    return megatron[1] if megatron is not None else agreed_checkpoint_iteration(load_dir)


def agreed_checkpoint_iteration(load_dir: str) -> int | None:
    """Rank 0 chooses (a bucket mount may show files to one node sooner than to another), every rank loads it."""
    choice = [None]
    if dist.get_rank() == 0:
        try:
            iteration, notes = newest_complete_checkpoint(load_dir)
            for note in notes:
                print_rank_0(note)
            choice = [iteration]
        except (OSError, ValueError) as error:
            choice = [error]
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    return choice[0]


def _why_rng_unusable(common: dict, metadata, rng_key: str, layout: ParallelLayout) -> str | None:
    """None when this rank's saved RNG states apply to it, otherwise the reason."""
    saved, now = _layout_record_filled(common["layout"]), _layout_record(layout)
    if saved != now:
        return (f"the checkpoint was saved at {_describe(saved)}, this run is {_describe(now)} "
                "(per-rank streams do not carry over)")
    if rng_key not in metadata.state_dict_metadata:
        return "the checkpoint holds none (weights only)"
    return None


def read_common(folder: str) -> dict:
    """checkpoint.json of one checkpoint folder, checked to be ours."""
    if _is_torch_dist(folder):
        return _megatronish_description(folder)
    path = os.path.join(folder, COMMON_FILENAME)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} is missing (the tracker file names it): "
                                "restore it, or fix latest_checkpointed_iteration.txt to name one that exists")
    if not os.path.isfile(path):
        legacy = os.path.join(folder, "mp_rank_00", "model_optim_rng.pt")
        hint = (" It is in the old per-TP-rank torch.save format, which this version does not read."
                if os.path.isfile(legacy) else " Was it written by another tool? Only megatronish training "
                "checkpoints load here; convert others with tools/convert_checkpoint.py.")
        raise FileNotFoundError(f"{path} is missing: {folder} is not a megatronish checkpoint.{hint}")
    try:
        with open(path) as f:
            common = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the checkpoint is truncated or corrupt") from error
    if not isinstance(common, dict) or common.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a megatronish checkpoint description (format "
                         f"{common.get('format') if isinstance(common, dict) else None!r}, expected {FORMAT_NAME!r})")
    if common.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {common['format_version']}, newer than this megatronish "
                         f"reads ({FORMAT_VERSION}): upgrade megatronish")
    return common


def _resolve_folder(load_dir: str) -> str:
    """A checkpoint root (with the tracker file) or one iter_XXXXXXX folder -> the folder to read."""
    if os.path.isfile(os.path.join(load_dir, COMMON_FILENAME)) or _is_torch_dist(load_dir):
        return load_dir
    iteration, notes = newest_complete_checkpoint(load_dir)
    for note in notes:
        print_rank_0(note)
    if iteration is None:
        raise FileNotFoundError(f"{load_dir} holds no checkpoint: neither {TRACKER_FILENAME} nor {COMMON_FILENAME}")
    return checkpoint_dir(load_dir, iteration)


def read_checkpoint_config(load_dir: str) -> TransformerConfig:
    """The saved model's config (true vocab size included), without reading any weights."""
    return TransformerConfig.from_dict(read_common(_resolve_folder(load_dir))["model_config"])


def read_checkpoint_args(load_dir: str) -> dict:
    """The training arguments saved with the checkpoint (JSON-able ones; empty if it saved none)."""
    return read_common(_resolve_folder(load_dir)).get("args") or {}


def load_model_for_inference(load_dir: str) -> GPTModel:
    """A GPTModel in eval mode, built for the current TP size from the saved config, with the saved
    weights (the newest checkpoint under `load_dir`, or `load_dir` itself if it is an iter_ folder).
    Collective over the world; model parallelism must be initialized. `model.config.vocab_size`
    is the true (unpadded) vocabulary."""
    folder = _resolve_folder(load_dir)
    config = TransformerConfig.from_dict(read_common(folder)["model_config"])
    model = GPTModel(config)
    metadata = read_metadata(folder)
    state = _model_blocks(model, lambda name, param: param.data, _stored_layout(folder, metadata, config))
    check_against_metadata(state, metadata)
    _zero_vocabulary_padding(model)
    load_blocks(state, folder)
    return model.eval()


# ------------------------------------------------------------------------- full (unsharded) state

def read_full_model_state(load_dir: str) -> tuple[TransformerConfig, dict, dict]:
    """(config, {param name: full unpadded value on CPU}, checkpoint.json) in one process, no
    process group needed (for tools/convert_checkpoint.py)."""
    folder = _resolve_folder(load_dir)
    common = read_common(folder)
    config = TransformerConfig.from_dict(common["model_config"])
    if _is_torch_dist(folder):
        return config, megatron_checkpoint.model_state(megatron_checkpoint.read(folder), config.vocab_size), common
    metadata = read_metadata(folder)
    state = {}
    for name, shapes in common["parameters"].items():
        stored = tuple(shapes["stored_shape"])
        state["model." + name] = Block(torch.empty(stored, dtype=_stored_dtype(metadata, "model." + name)),
                                       stored, (0,) * len(stored))
    check_against_metadata(state, metadata)
    load_blocks(state, folder, no_dist=True)
    full = {name: state["model." + name].local.reshape(shapes["shape"])
            for name, shapes in common["parameters"].items()}
    return config, full, common


def save_model_only(save_dir: str, model, iteration: int = 0, args=None) -> str:
    """Save only the weights of `model` (at this run's layout) as a checkpoint of this format: it
    loads at any TP size with --finetune or --no-load-optim, and for inference. `args` (a Namespace)
    are kept as the training arguments (the tokenizer for inference). Collective."""
    progress = TrainingProgress(iteration=iteration)
    final = checkpoint_dir(save_dir, iteration)
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        _remove_stale_temporaries(save_dir)
    dist.barrier()
    state = _model_blocks(model, lambda name, param: param.detach())
    common = checkpoint_description(progress, model, None, None, args)
    _write(state, common, final + ".tmp", final, save_dir, None, None)
    return final


# ------------------------------------------------------------------------------------ state maps

def _chunks(model) -> list:
    """A GPTModel, or the list of a pipeline stage's model chunks -> the list."""
    return model if isinstance(model, list) else [model]


def _named_parameters(model):
    """(name, parameter) of every chunk; names are global (layers keep their number at any PP size)."""
    for chunk in _chunks(model):
        yield from chunk.named_parameters()


def _layout(model) -> ParallelLayout:
    return _chunks(model)[0].layout


def _layout_record(layout: ParallelLayout) -> dict:
    return {"tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
            "virtual_pipeline_model_parallel_size": layout.dims.virtual_pp, "data_parallel_size": layout.dp,
            "world_size": layout.dims.world_size}


def _layout_record_filled(saved: dict) -> dict:
    """A saved layout record with the entries that checkpoints from before pipeline parallelism lack."""
    return {"pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None, **saved}


def _describe(record: dict) -> str:
    virtual = record["virtual_pipeline_model_parallel_size"]
    return (f"TP={record['tensor_model_parallel_size']} x PP={record['pipeline_model_parallel_size']}"
            + (f" (virtual {virtual})" if virtual else "") + f" x DP={record['data_parallel_size']}")


def _model_blocks(model, tensor_of, stored=MegatronishLayout) -> dict:
    blocks, layout = {}, _layout(model)
    for name, param in _named_parameters(model):
        for block in stored.blocks(name, tensor_of(name, param), param, layout.tp_rank, layout.tp):
            add_block(blocks, stored.key(name), block)
    return blocks


def _optimizer_blocks(model, tensor_of, stored=MegatronishLayout) -> dict:
    blocks, layout = {}, _layout(model)
    for name, param in _named_parameters(model):
        for key in OPTIMIZER_KEYS:
            for block in stored.blocks(name, tensor_of(name, param, key), param, layout.tp_rank, layout.tp):
                add_block(blocks, stored.key(name, key), block)
    return blocks


def _is_torch_dist(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, megatron_checkpoint.METADATA_FILE))


def _megatron_lm_checkpoint(load_dir: str) -> tuple[str, int, str] | None:
    """megatron_checkpoint.find's answer for a checkpoint that Megatron-LM (or the converter) wrote; None for one that
    megatronish training wrote, torch_dist ones included: those are chosen by their manifests (a damaged newest one
    falls back to the one before) and resume everything (optimizer and RNG too)."""
    found = megatron_checkpoint.find(load_dir)
    return None if found is None or os.path.isfile(os.path.join(found[0], MANIFEST_FILENAME)) else found


def _megatronish_description(folder: str) -> dict:
    common = megatron_checkpoint.read_common_state(folder)
    if megatron_checkpoint.MEGATRONISH_KEY not in common:
        raise ValueError(f"{folder} is a Megatron-LM torch_dist checkpoint that megatronish training did not write: "
                         "pretrain_gpt.py --load reads it; tools/convert_checkpoint.py --input-format megatron "
                         "converts it")
    return common[megatron_checkpoint.MEGATRONISH_KEY]


def _stored_layout(folder: str, metadata, config: TransformerConfig):
    """How the tensors of a checkpoint folder are laid out: this format's, or Megatron's torch_dist (its
    vocabulary padded as stored)."""
    if not _is_torch_dist(folder):
        return MegatronishLayout
    rows = metadata.state_dict_metadata["embedding.word_embeddings.weight"].size[0]
    return megatron_checkpoint.TorchDistLayout(config.num_layers, vocab_rows=rows)


def _rng_key(rank: int) -> str:
    return f"rng.rank{rank:05d}"


@torch.no_grad()
def _zero_vocabulary_padding(model) -> None:
    """Rows past the true vocabulary are not stored: they must be zero, whatever was there."""
    tp_rank = _layout(model).tp_rank
    for _, param in _named_parameters(model):
        rows = getattr(param, "unpadded_rows", None)
        if rows is not None:
            real = min(max(rows - tp_rank * param.size(0), 0), param.size(0))
            param.data[real:].zero_()


def _full_unpadded_shape(param, tp: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    if getattr(param, "unpadded_rows", None) is not None:
        shape[0] = param.unpadded_rows
    return shape


def _stored_dtype(metadata, name: str) -> torch.dtype:
    return metadata.state_dict_metadata[name].properties.dtype


def _is_json(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------ file system

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_durably(path: str, data) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the folder: readers see old or new."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _write_text_durably(path: str, text: str) -> None:
    _write_bytes_durably(path, text.encode())


def _write_json_durably(path: str, value: dict) -> None:
    _write_text_durably(path, json.dumps(value, indent=1) + "\n")


def _remove_stale_temporaries(root: str) -> None:
    """Folders left by saves that were killed midway (never loaded: only renamed folders count)."""
    for name in os.listdir(root):
        if name.startswith("iter_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _delete_old_checkpoints(root: str, keep_last: int, newest: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `newest` (the one just written). Folders of
    higher iterations come from another run of this folder (reused --save, a rollback): not ours to judge."""
    for old in [i for i in checkpoint_iterations(root) if i <= newest][keep_last:]:
        shutil.rmtree(checkpoint_dir(root, old), ignore_errors=True)
