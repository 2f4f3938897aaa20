"""Checkpoint save/load times on CPU (gloo), against a plain torch.save/torch.load of the same tensors.

    python tools/bench_checkpoint.py                       # GPT 4 layers x hidden 256, vocab 50257
    python tools/bench_checkpoint.py --layers 8 --hidden 512

Saves at TP=2 (2 ranks) synchronously and asynchronously (reported: how long training is stalled
by the staging copy, and when the background write is done), loads at TP=2 and at TP=1 (reshard),
and times torch.save/torch.load of each rank's tensors in the same processes as the baseline.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig
from megatronish.optimizer import (
    DistributedDataParallel,
    OptimizerConfig,
    OptimizerParamScheduler,
    get_megatron_optimizer,
)
from megatronish.testing import run_distributed
from megatronish.training import checkpointing
from megatronish.training.progress import TrainingProgress


def _build(config: TransformerConfig, tp: int):
    parallel_state.initialize_model_parallel(tp)
    model = GPTModel(config)
    ddp = DistributedDataParallel(model)
    optimizer = get_megatron_optimizer(ddp, OptimizerConfig())
    scheduler = OptimizerParamScheduler(optimizer, max_lr=1e-4, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=10,
                                        lr_decay_style="constant")
    return model, optimizer, scheduler


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _save_side(config, root):
    model, optimizer, scheduler = _build(config, 2)
    progress = TrainingProgress(iteration=1)
    args = argparse.Namespace()
    sync = _timed(lambda: checkpointing.save_checkpoint(os.path.join(root, "sync"), progress, model, optimizer,
                                                         scheduler, args))
    stall = _timed(lambda: checkpointing.save_checkpoint(os.path.join(root, "async"), progress, model, optimizer,
                                                          scheduler, args, async_save=True))
    done = stall + _timed(checkpointing.wait_for_async_save)
    load = _timed(lambda: checkpointing.load_checkpoint(os.path.join(root, "sync"), model, optimizer, scheduler))
    state = {"model": model.state_dict(), "optimizer": optimizer.sharded_state_by_name()}
    path = os.path.join(root, f"baseline{parallel_state.get_tensor_model_parallel_rank()}.pt")
    baseline_save = _timed(lambda: torch.save(state, path))
    baseline_load = _timed(lambda: torch.load(path, weights_only=False))
    return {"sync": sync, "stall": stall, "done": done, "load": load, "baseline_save": baseline_save,
            "baseline_load": baseline_load}


def _reshard_side(config, root):
    model, optimizer, scheduler = _build(config, 1)
    return _timed(lambda: checkpointing.load_checkpoint(os.path.join(root, "sync"), model, optimizer, scheduler))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50257)
    args = p.parse_args(argv)
    config = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8,
                               vocab_size=args.vocab, max_position_embeddings=512)
    with tempfile.TemporaryDirectory() as root:
        times = run_distributed(_save_side, 2, args=(config, root), timeout=1800)[0]
        folder = checkpointing.checkpoint_dir(os.path.join(root, "sync"), 1)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        reshard = run_distributed(_reshard_side, 1, args=(config, root), timeout=1800)[0]
    print(f"GPT {args.layers} layers x hidden {args.hidden}, vocab {args.vocab}: checkpoint {size / 2**20:.0f} MiB "
          f"(weights + fp32 master + 2 Adam moments), TP=2 on 2 gloo ranks")
    print(f"  save (sync)            {times['sync']:.2f} s   torch.save baseline (per rank) {times['baseline_save']:.2f} s"
          f"   ratio {times['sync'] / times['baseline_save']:.2f}")
    print(f"  save (async)  stall    {times['stall']:.2f} s   written after {times['done']:.2f} s")
    print(f"  load at TP=2           {times['load']:.2f} s   torch.load baseline (per rank) {times['baseline_load']:.2f} s"
          f"   ratio {times['load'] / times['baseline_load']:.2f}")
    print(f"  load at TP=1 (reshard) {reshard:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
