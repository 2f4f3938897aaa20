"""Training-step benchmark on CPU: TP=1 with all cores vs TP=2 with one thread per rank.

    python tools/bench_train.py                    # nanoGPT's CPU config, 20 timed iterations
    python tools/bench_train.py --iters 50 --threads 2

The model is nanoGPT's shakespeare-char CPU config: 4 layers, 4 heads, hidden 128, sequence 64,
micro-batch 12, vocabulary 65, dropout 0, fp32. Each configuration runs the real training step of
megatronish.training (forward, backward, DP/TP gradient handling, clipping, AdamW) on random
tokens in gloo ranks:
  - TP=1: one rank with --threads torch threads (default: every core);
  - TP=2: two ranks, each with --threads / 2 threads (the split torchrun makes);
  - and, for context, TP=1 with a single thread.
It prints ms/iteration, tokens/s and model FLOP utilization (MFU): the model FLOPs of an
iteration (formula in megatronish/training/training_log.py) per second, divided by the
rate of a plain fp32 torch.mm (1024^3, --threads threads) measured in the same run, which is
the machine's practical matmul peak. Goal of the issue: TP=2 reaches >= 0.8x TP=1's tokens/s.
Timings on a shared machine are noisy: the configurations take turns, and each reports the median
of its --repeats runs.
"""

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import torch

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig
from megatronish.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from megatronish.testing import run_distributed
from megatronish.training.training import train_step
from megatronish.training.training_log import num_floating_point_operations
from megatronish.training.utils import prepare_process_for_training_loop

SHAPE = dict(num_layers=4, num_attention_heads=4, hidden_size=128, vocab_size=65, max_position_embeddings=64)
SEQ, MICRO_BATCH = 64, 12


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="cores to use in total")
    return p.parse_args(argv)


def matmul_gflops(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """Run inside a rank: after OpenMP threads run in a parent, its forked children can hang."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def _time_training(tp: int, threads: int, iters: int, warmup: int) -> float:
    """Seconds per training iteration in this rank (collective: every rank runs it)."""
    torch.set_num_threads(threads)
    parallel_state.initialize_model_parallel(tp)
    config = TransformerConfig(**SHAPE, hidden_dropout=0.0, attention_dropout=0.0)
    model = DistributedDataParallel(GPTModel(config, seed=0))
    optimizer = get_megatron_optimizer(model, OptimizerConfig(lr=1e-3))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab_size"], (warmup + iters, MICRO_BATCH, SEQ + 1), generator=generator)
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(MICRO_BATCH, SEQ)} for t in tokens]
    prepare_process_for_training_loop()  # as pretrain_gpt.py does before its loop
    for batch in batches[:warmup]:
        train_step([batch], model, optimizer)
    torch.distributed.barrier()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        train_step([batch], model, optimizer)
    torch.distributed.barrier()
    return (time.perf_counter() - start) / iters


def _matmul_in_rank(threads: int) -> float:
    return matmul_gflops(threads)


def main(argv=None):
    args = parse_args(argv)
    peak = statistics.median(run_distributed(_matmul_in_rank, 1, args=(args.threads,))[0] for _ in range(3))
    flops_args = SimpleNamespace(hidden_size=128, seq_length=SEQ, num_layers=4, ffn_hidden_size=512, swiglu=False,
                                 recompute_granularity=None, global_batch_size=MICRO_BATCH)
    padded_vocab = {tp: TransformerConfig(**SHAPE).padded_vocab_size(tp) for tp in (1, 2)}
    print(f"torch {torch.__version__}, {args.threads} cores; fp32 torch.mm 1024^3 with {args.threads} threads: "
          f"{peak:.1f} GFLOP/s (the MFU denominator)")
    print(f"model: 4 layers, 4 heads, hidden 128, seq {SEQ}, micro-batch {MICRO_BATCH}, vocab 65 "
          f"(padded {padded_vocab[1]} at TP=1, {padded_vocab[2]} at TP=2); {args.iters} timed iterations, "
          f"median of {args.repeats} runs")
    results = {}
    layouts = ((1, 1, args.threads), (1, 1, 1), (2, 2, max(1, args.threads // 2)))  # TP=1 x 1 thread: context
    runs = {layout: [] for layout in layouts}
    for _ in range(args.repeats):  # the layouts take turns, so that a busy spell slows each alike
        for tp, ranks, threads in layouts:
            per_rank = run_distributed(_time_training, ranks, args=(tp, threads, args.iters, args.warmup), timeout=600)
            runs[tp, ranks, threads].append(max(per_rank))
    for (tp, ranks, threads), layout_runs in runs.items():
        seconds = statistics.median(layout_runs)
        # MFU counts the FLOPs of the true model (vocabulary 65 padded as at TP=1), whatever the layout.
        flops = num_floating_point_operations(flops_args, padded_vocab[1])
        tokens_per_second = MICRO_BATCH * SEQ / seconds
        results.setdefault(tp, tokens_per_second)
        print(f"TP={tp} ({ranks} rank(s) x {threads} thread(s)): {seconds * 1000:8.1f} ms/iteration  "
              f"{tokens_per_second:9.0f} tokens/s  MFU {flops / seconds / (peak * 1e9) * 100:5.1f}%  "
              f"(runs: {', '.join(f'{r * 1000:.0f}' for r in layout_runs)} ms)")
    print(f"TP=2 / TP=1 ({args.threads} threads) tokens/s: {results[2] / results[1]:.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
