"""Elastic training on CPU: recovery from a lost node, and the cost of local checkpoints.

    python tools/bench_elastic.py                        # a 100M-parameter GPT (12 x 832), both parts
    python tools/bench_elastic.py --layers 2 --hidden 128 --skip-stall

Recovery: an elastic job of two torchrun agents (nodes of --nproc ranks each, DP over them, local
checkpoints every --local-interval iterations) loses one node (its agent and workers SIGKILLed by
PID) after --kill-after iterations. Printed: the time from the kill to the end of the first step at
the new layout, its parts from the job's restart report (failure detection + rendezvous + restart,
start-up, checkpoint load, first step), and the iterations redone.

Stall: two forked ranks posing as two nodes train the same model with local checkpoints every K
iterations (K = 1, 10, 50; a buddy copy each time) and without; printed: seconds per iteration in
the steady state (from the step of iteration K, when the first save starts, to the last step: a save
every K iterations; the run's final save, which waits for its write before exiting, is left out), the
extra time per iteration against the run without, as a share of its step time, and the time the
training loop itself spends staging each save.
"""

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "training"))  # the tests' helpers for jobs of torchrun agents

from elastic_testing import ElasticJob  # noqa: E402

from megatronish import parallel_state  # noqa: E402
from megatronish.testing import run_distributed  # noqa: E402
from megatronish.training import training  # noqa: E402
from megatronish.training.arguments import parse_args  # noqa: E402

REPORT = re.compile(r"^elastic restart: layout (?P<old>[^;]+) -> (?P<new>[^;]+); resumed from iteration (?P<resumed>\d+)"
                    r".*work lost: (?P<redone>\d+) iteration.*: (?P<detection>[\d.]+) s failure detection, rendezvous "
                    r"and restart, (?P<startup>[\d.]+) s start-up, (?P<load>[\d.]+) s load, (?P<first>[\d.]+) s first "
                    r"step", flags=re.M)


def model_argv(args, iters: int) -> list[str]:
    """The demo corpus (byte tokens), no evaluation, no sample: only training steps."""
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads",
            str(args.heads), "--seq-length", str(args.seq), "--micro-batch-size", "1", "--global-batch-size",
            str(args.global_batch), "--train-iters", str(iters), "--log-interval", "1000000", "--eval-iters", "0",
            "--sample-tokens", "0", "--save", ""]  # no durable checkpoints (the demo's default folder)


def recovery(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    argv = [str(REPO / "pretrain_gpt.py"), *model_argv(args, 1000)]
    job = ElasticJob(root, argv, nproc=args.nproc, max_nodes=2)
    local = ["--local-checkpoint-interval", str(args.local_interval), "--local-checkpoint-dir"]
    nodes = [job.start_node(*local, str(root / f"local{i}")) for i in range(2)]
    try:
        job.wait_for_step(f"TP 1 x PP 1 x DP {2 * args.nproc}", args.kill_after, timeout=args.timeout)
        killed_at = time.time()
        job.kill_node(nodes[1])
        report = REPORT.search(job.wait_for(r"^elastic restart: .*", timeout=args.timeout).group(0))
        total = time.time() - killed_at  # the report line follows the first step at the new layout at once
    finally:
        for node in nodes:
            job.kill_node(node)
        job.finish(timeout=0)
    parts = {name: float(report[name]) for name in ("detection", "startup", "load", "first")}
    print(f"recovery from a lost node ({args.layers} x {args.hidden}, {args.nproc} rank(s) per node, local "
          f"checkpoints every {args.local_interval}): {report['old']} -> {report['new']}")
    print(f"  kill -> first step at the new layout: {total:.1f} s (goal: < 30 s)")
    print(f"  parts (restart report, from the old layout's last step): failure detection + rendezvous + restart "
          f"{parts['detection']:.1f} s, start-up {parts['startup']:.1f} s, checkpoint load/reshard {parts['load']:.1f} s, "
          f"first step {parts['first']:.1f} s")
    print(f"  resumed from iteration {report['resumed']}; iterations redone: {report['redone']}")
    print(f"  logs: {root}")


def _timed_training(argv: list[str], root: str, interval: int | None) -> dict:
    """In a forked rank posing as node RANK: seconds per iteration in the steady state, from the end of the
    step of iteration K (the first save launched) to the end of the last step: one save every K iterations,
    without the last iteration's save, which waits for its write before the run exits (without local
    checkpoints, from the end of the first step)."""
    rank = int(os.environ["RANK"])
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if interval:
        argv = argv + ["--local-checkpoint-dir", f"{root}/node{rank}"]
    run = training.setup(parse_args(argv))
    stalls, step_ends = [], {}
    if run.local:
        real_save = run.local.save

        def save(*save_args):
            real_save(*save_args)
            stalls.append(run.local.stall_seconds)
        run.local.save = save
    real_step_done = run.report.step_done

    def step_done(iteration, *rest):  # right after each training step, before evaluation and saving
        step_ends[iteration] = time.perf_counter()
        real_step_done(iteration, *rest)
    run.report.step_done = step_done
    training.train(run, training.TrainingResult())
    if run.local:
        run.local.wait()
    parallel_state.destroy_model_parallel()
    first, last = interval or 1, max(step_ends)
    return {"per_iteration": (step_ends[last] - step_ends[first]) / (last - first),
            "stall": sum(stalls) / max(len(stalls), 1)}


def stall(args) -> None:
    root = tempfile.mkdtemp(prefix="bench-local-ckpt-")
    print(f"local checkpoint stall ({args.layers} x {args.hidden}, 2 ranks as 2 nodes, DP 2, buddy copies):")
    baseline = None
    for interval in (None, *args.intervals):
        iters = max(args.stall_iters, 3 * (interval or 0))  # at least two saves in the measured window
        argv = model_argv(args, iters) + (["--local-checkpoint-interval", str(interval)] if interval else [])
        result = run_distributed(_timed_training, 2, args=(argv, f"{root}/K{interval}", interval), timeout=7200)[0]
        if interval is None:
            baseline = result["per_iteration"]
            print(f"  no local checkpoints: {baseline:.3f} s per iteration ({iters} iterations)")
            continue
        extra = result["per_iteration"] - baseline
        print(f"  K = {interval:>2}: {result['per_iteration']:.3f} s per iteration ({iters} iterations); stall "
              f"{extra:+.3f} s per iteration = {extra / baseline:+.1%} of the step (goal at K = 10: < 5%); staging "
              f"{result['stall']:.3f} s per save")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=832)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1, help="ranks per node in the recovery part")
    parser.add_argument("--local-interval", type=int, default=1, help="local checkpoints in the recovery part")
    parser.add_argument("--kill-after", type=int, default=3, help="iterations before the node is lost")
    parser.add_argument("--intervals", type=int, nargs="*", default=[1, 10, 50])
    parser.add_argument("--stall-iters", type=int, default=20, help="iterations per run (at least 3 K)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--skip-stall", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.skip_recovery:
        recovery(args)
    if not args.skip_stall:
        stall(args)


if __name__ == "__main__":
    main()
