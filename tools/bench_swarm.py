"""SWARM on this machine: throughput against the synchronous pipeline, with a slow peer, with peers
killed, and the bytes it sends per sample (a benchmark, not a test: it prints numbers and ratios).

    python tools/bench_swarm.py                 # every section (about 15 minutes on 2 busy cores)
    python tools/bench_swarm.py --sections pipeline swarm --steps 20

Sections (the demo GPT, 2 stages; samples/s after --warmup steps):
    pipeline    pretrain_gpt.py --pp 2 under torchrun: the synchronous 1F1B pipeline of the same stages
    swarm       SWARM with 1 and 2 peers per stage, homogeneous; and with --compression blockwise8
    throttled   one peer 3x slower (--throttle 3): a static pipeline (1 peer per stage, the slow one on
                stage 1) against SWARM with 2 peers per stage and rebalancing
    goodput     SWARM with 2 peers per stage, one peer SIGKILLed every --kill-every seconds and a new one
                started in its place: samples of committed steps per second of the whole run
Bytes per sample: what the trainer's calls carried both ways (activations and their gradients), and
what the peers' calls to each other carried (gradient parts, tied-embedding parts, state copies).
"""

import argparse
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatronish.swarm.local import REPO, LocalSwarm, environment, step_lines

MODEL = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "8", "--seq-length", "128",
         "--micro-batch-size", "8", "--global-batch-size", "32", "--eval-iters", "0", "--log-interval", "10"]
SWARM = ["--pp", "2", "--call-timeout", "10", "--update-period", "1"]
ITERATION_LINE = re.compile(r"iteration +(\d+)/ +\d+ \| .*elapsed time per iteration \(ms\): ([\d.]+)")
PEER_TRAFFIC = re.compile(r"applied step \d+: .*\| calls to peers sent (\d+) B, received (\d+) B")
GLOBAL_BATCH = 32


def pipeline(folder: Path, steps: int, warmup: int) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "pretrain_gpt.py"), *MODEL,
               "--pp", "2", "--train-iters", str(warmup + steps), "--log-interval", "1", "--sample-tokens", "0",
               "--save-interval", "100000", "--save", str(folder / "pipeline")]
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(environment(folder), OMP_NUM_THREADS="1"),
                          cwd=folder, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    ms = [float(t) for i, t in ITERATION_LINE.findall(proc.stdout) if int(i) > warmup]
    return {"samples_per_s": GLOBAL_BATCH / (statistics.median(ms) / 1000), "ms_per_step": statistics.median(ms)}


def swarm_run(folder: Path, name: str, stages: list, steps: int, warmup: int, peer_flags=None, trainer_flags=(),
              kill_every: float | None = None) -> dict:
    """A swarm with one peer per entry of `stages` (its stage); `peer_flags[i]` extra flags of peer i."""
    local = LocalSwarm(folder / name, MODEL + SWARM)
    (folder / name).mkdir(parents=True)
    try:
        local.start_dht()
        peers = [local.peer(f"peer{i}", "--stage", str(stage), *(peer_flags or {}).get(i, []))
                 for i, stage in enumerate(stages)]
        trainer = local.trainer("trainer", "--train-iters", str(warmup + steps), *trainer_flags)
        kills = 0
        if kill_every:
            next_kill = None
            while trainer.proc.poll() is None:
                if next_kill is None and step_lines(trainer.text()):
                    next_kill = time.monotonic() + kill_every  # the clock starts with training
                if next_kill is not None and time.monotonic() > next_kill:
                    victim = random.choice([p for p in peers if p.proc.poll() is None])
                    local.signal(victim, signal.SIGKILL)
                    peers.append(local.peer(f"peer{len(peers)}", "--stage", "auto"))
                    kills, next_kill = kills + 1, next_kill + kill_every
                time.sleep(0.5)
        steps_logged = step_lines(local.finish(trainer, timeout=3600))
        peer_bytes = sum(sum(map(int, m[-1])) if (m := PEER_TRAFFIC.findall(p.text())) else 0 for p in peers)
    finally:
        local.close()
    first, last = steps_logged[warmup - 1], steps_logged[max(steps_logged)]
    samples = GLOBAL_BATCH * (max(steps_logged) - warmup + 1)
    return {"samples_per_s": samples / (last.at - first.at),
            "goodput_samples_per_s": GLOBAL_BATCH * len(steps_logged) / last.at,
            "trainer_bytes_per_sample": (last.sent + last.received) / (GLOBAL_BATCH * len(steps_logged)),
            "peer_bytes_per_sample": peer_bytes / (GLOBAL_BATCH * len(steps_logged)),
            "reroutes": sum(s.reroutes for s in steps_logged.values()),
            "replays": sum(s.replays for s in steps_logged.values()), "kills": kills}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="*", default=["pipeline", "swarm", "throttled", "goodput"])
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the measurement starts")
    parser.add_argument("--kill-every", type=float, default=60.0)
    parser.add_argument("--goodput-steps", type=int, default=150, help="steps of the run with kills")
    args = parser.parse_args(argv)
    results = {}
    folder = Path(tempfile.mkdtemp(prefix="bench_swarm_"))

    def record(name, value):
        results[name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)

    steps, warmup = args.steps, args.warmup
    if "pipeline" in args.sections:
        record("pipeline (pretrain_gpt.py --pp 2, torchrun)", pipeline(folder, steps, warmup))
    if "swarm" in args.sections:
        record("swarm 2 stages x 1 peer", swarm_run(folder, "s1", [0, 1], steps, warmup))
        record("swarm 2 stages x 2 peers", swarm_run(folder, "s2", [0, 0, 1, 1], steps, warmup))
        record("swarm 2 stages x 2 peers, --compression blockwise8",
               swarm_run(folder, "s2c", [0, 0, 1, 1], steps, warmup, trainer_flags=["--compression", "blockwise8"]))
    if "throttled" in args.sections:
        record("static pipeline (1 peer per stage), stage 1's peer 3x slower",
               swarm_run(folder, "t1", [0, 1], steps, warmup, peer_flags={1: ["--throttle", "3"]}))
        rebalance = ["--rebalance-period", "5"]
        record("swarm 2 stages x 2 peers, one peer 3x slower, rebalancing",
               swarm_run(folder, "t2", [0, 0, 1, 1], steps, warmup,
                         peer_flags={i: rebalance + (["--throttle", "3"] if i == 3 else []) for i in range(4)}))
    if "goodput" in args.sections:
        record(f"swarm 2 stages x 2 peers, a peer killed every {args.kill_every:.0f} s",
               swarm_run(folder, "g", [0, 0, 1, 1], args.goodput_steps, warmup, kill_every=args.kill_every))
    print("\nratios:")
    for label, numerator, denominator, key in [
            ("swarm 2x1 / pipeline", "swarm 2 stages x 1 peer", "pipeline (pretrain_gpt.py --pp 2, torchrun)",
             "samples_per_s"),
            ("swarm 2x2 / pipeline", "swarm 2 stages x 2 peers", "pipeline (pretrain_gpt.py --pp 2, torchrun)",
             "samples_per_s"),
            ("static, slow stage / swarm 2x1 homogeneous",
             "static pipeline (1 peer per stage), stage 1's peer 3x slower",
             "swarm 2 stages x 1 peer", "samples_per_s"),
            ("swarm 2x2 with a slow peer / homogeneous (goal >= 0.8)",
             "swarm 2 stages x 2 peers, one peer 3x slower, rebalancing", "swarm 2 stages x 2 peers", "samples_per_s"),
            ("goodput with kills / swarm 2x2 homogeneous", f"swarm 2 stages x 2 peers, a peer killed every "
             f"{args.kill_every:.0f} s", "swarm 2 stages x 2 peers", None)]:
        if numerator in results and denominator in results:
            top = results[numerator]["goodput_samples_per_s" if key is None else key]
            bottom = results[denominator]["goodput_samples_per_s" if key is None else key]
            print(f"  {label}: {top / bottom:.2f}")


if __name__ == "__main__":
    main()
