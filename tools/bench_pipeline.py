"""Pipeline bubble and activation memory: measured against the theory, on CPU ranks (gloo).

    python tools/bench_pipeline.py [--micro-batches 4 8 16] [--steps 3] [--layers 8 --hidden 256 --seq 128]

For PP = 2 and 4 (1F1B, and interleaved with 2 virtual stages) and each number of micro-batches
m, it times training steps of a GPT and prints for stage 0:
  - the bubble: the time stage 0 waits in pipeline transfers, over the step time, next to the
    theory (p-1)/(m+p-1) for 1F1B and (p-1)/(v m+p-1) interleaved;
  - the peak bytes of activations held for backward on each stage (autograd's saved tensors),
    in units of one micro-batch's activations on that stage (1F1B: p - r on stage r).
The ranks are forked on this machine, one thread each: with more stages than cores they share
cores, which the bubble measure counts as work (it only counts waiting in transfers).
"""

import argparse
import time

import torch

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig
from megatronish.optimizer import DistributedDataParallel
from megatronish.pipeline_parallel import P2PCommunicator, get_forward_backward_func
from megatronish.testing import run_distributed
from megatronish.training.activation_memory import SavedTensorBytes
from megatronish.training.training import forward_step

VOCAB = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--pipeline-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("steps", "layers", "hidden", "seq", "micro_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for pp in args.pipeline_sizes:
        if pp < 2 or args.layers % (2 * pp) != 0:
            p.error(f"--pipeline-sizes {pp}: need PP >= 2 and --layers {args.layers} divisible by 2 x PP "
                    "(the interleaved cases use 2 virtual stages)")
    return args


def _batches(m: int, micro_batch_size: int, seq: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (m, micro_batch_size, seq + 1), generator=generator)
    return [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(micro_batch_size, seq)} for t in tokens]


def _bench_rank(args, pp: int, virtual_pp: int | None):
    """(per m: step seconds, seconds stage 0 waited in transfers) and this stage's peak activation bytes per m."""
    layout = parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp,
                                                      virtual_pipeline_model_parallel_size=virtual_pp)
    config = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                               vocab_size=VOCAB, max_position_embeddings=args.seq, hidden_dropout=0.0,
                               attention_dropout=0.0)
    chunks = [DistributedDataParallel(GPTModel(config, seed=0, vp_stage=c)) for c in range(layout.dims.num_model_chunks)]
    waited = [0.0]
    communicate = P2PCommunicator.communicate

    def timed_communicate(self, *a, **k):
        start = time.perf_counter()
        try:
            return communicate(self, *a, **k)
        finally:
            waited[0] += time.perf_counter() - start

    P2PCommunicator.communicate = timed_communicate
    schedule = get_forward_backward_func(layout)
    rows = []
    try:
        for m in args.micro_batches:
            batches = _batches(m, args.micro_batch_size, args.seq)
            counter = SavedTensorBytes(exclude=[p for chunk in chunks for p in chunk.parameters()])
            step_times, waits = [], []
            for step in range(args.steps + 1):
                for chunk in chunks:
                    chunk.zero_grad_buffer()
                iterators = [iter(batches) for _ in chunks] if virtual_pp else iter(batches)
                torch.distributed.barrier()
                waited[0], start = 0.0, time.perf_counter()
                with counter:
                    schedule(forward_step_func=forward_step, data_iterator=iterators, model=chunks,
                             num_microbatches=m, seq_length=args.seq, micro_batch_size=args.micro_batch_size)
                if step > 0:  # the first step warms up
                    step_times.append(time.perf_counter() - start)
                    waits.append(waited[0])
            per_microbatch = _one_microbatch_bytes(chunks, batches[0])
            rows.append((m, sorted(step_times)[len(step_times) // 2], sorted(waits)[len(waits) // 2],
                         counter.peak, per_microbatch))
    finally:
        P2PCommunicator.communicate = communicate
    return layout.pp_rank, rows


def _one_microbatch_bytes(chunks, batch) -> int:
    """Activation bytes one micro-batch leaves on this stage (its chunks run alone, outside the pipeline)."""
    total = 0
    for chunk in chunks:
        module = chunk.module
        shape = (batch["tokens"].size(1), batch["tokens"].size(0), module.config.hidden_size)
        counter = SavedTensorBytes(exclude=list(module.parameters()))
        module.set_input_tensor(torch.zeros(shape, requires_grad=True))
        with counter:
            output = module(batch["tokens"], labels=batch["labels"])
        total += counter.peak
        del output
    return total


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"GPT {args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro-batch {args.micro_batch_size}; "
          f"{args.steps} timed steps (median); bubble = stage 0's waiting in transfers / step time")
    print(f"{'schedule':<24}{'m':>4}{'step ms':>10}{'bubble':>9}{'theory':>9}{'ratio':>7}   "
          "peak activations per stage (in micro-batches)")
    for pp in args.pipeline_sizes:
        for virtual_pp in (None, 2):
            results = run_distributed(_bench_rank, pp, args=(args, pp, virtual_pp), timeout=1800)
            by_stage = dict(results)
            name = f"PP={pp} " + (f"interleaved v={virtual_pp}" if virtual_pp else "1F1B")
            v = virtual_pp or 1
            for i, m in enumerate(args.micro_batches):
                _, step, waited, _, _ = by_stage[0][i]
                measured, theory = waited / step, (pp - 1) / (v * m + pp - 1)
                peaks = " ".join(f"{by_stage[r][i][3] / 2**20:.1f} MiB ({by_stage[r][i][3] / by_stage[r][i][4]:.1f})"
                                 for r in range(pp))
                print(f"{name:<24}{m:>4}{step * 1e3:>10.1f}{measured:>9.3f}{theory:>9.3f}{measured / theory:>7.2f}   "
                      f"{peaks}")


if __name__ == "__main__":
    main()
