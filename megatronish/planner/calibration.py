"""Calibration on this machine and the goodput profile it writes.

    profile = calibrate(args, max_ranks=4)     # a few timed iterations of each TP x PP x DP layout that fits
    profile.save()                             # $MEGATRONISH_CACHE/goodput_profile.json (default_profile_path)
    load_profile()                             # what the planner (and `--layout auto`) read, None when absent

First micro-benchmarks measure the constants of the time model (megatronish/planner/speed.py):
FLOP/s and the fixed cost per layer and micro-batch from one rank's CPU time for two micro-batch
sizes, Adam's time per element, all-reduce latency and bandwidth between two ranks, and, when the
profile's ranks outnumber the cores, the time a blocking message waits for a core
(`measure_constants`). Then each layout with TP, PP, DP in {1, 2} and at most `max_ranks` ranks
trains a few iterations of the given model on CPU ranks (gloo, one thread each:
megatronish.testing.run_distributed), the layouts taking turns over a few rounds; its fastest
iteration is its measured point (other processes on a shared machine only ever slow an iteration
down). The constants are then fitted to all points at once (least squares on the log of the times,
Levenberg-Marquardt), pulled toward the measured ones. The profile (JSON) records:
  - "constants": {accelerator: {dtype: SpeedConstants}}, the fitted constants;
  - "points": tokens/s per accelerator kind, device count and layout: the measured ones
    ("measured": true, with the measured time and the predicted ones: with the datasheet constants,
    the micro-benchmarks' and the fitted ones) and
    the planner's predictions with the fitted constants for the other layouts of 1, 2 and 4 devices.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
import torch.distributed as dist

from megatronish.cache import cache_root, partial_path
from megatronish.planner.cluster import Cluster, SpeedConstants, cpu_accelerator
from megatronish.planner.search import (
    Layout,
    SearchSpace,
    dtype_name,
    fix_global_batch,
    layout_args,
    plan_layout,
    plan_layouts,
)
from megatronish.training.training_log import flops_per_token

PROFILE_FORMAT = "megatronish goodput profile"
PROFILE_VERSION = 1
FITTED = ("flops_per_s", "intra_node_bytes_per_s", "latency_s", "optimizer_s_per_element",
          "overhead_s_per_layer_microbatch", "scheduling_wait_s")
# Per unit of log(constant / measured constant): a constant the micro-benchmarks measured moves by a factor e
# only when that removes as much as a 30% error at one layout.
PRIOR_WEIGHT = 0.3


def default_profile_path() -> str:
    return str(cache_root() / "goodput_profile.json")


def cpu_cluster(ranks: int) -> Cluster:
    """`ranks` CPU ranks of this machine on one node, sharing its cores."""
    return Cluster(cpu_accelerator(ranks), nodes=1, devices_per_node=ranks, cores_per_node=len(os.sched_getaffinity(0)))


@dataclass
class MeasuredPoint:
    layout: Layout
    seconds: float                        # the fastest measured iteration
    memory: dict                          # rank 0's and the last rank's measured memory (bytes)


@dataclass
class GoodputProfile:
    constants: dict = field(default_factory=dict)      # accelerator -> dtype -> SpeedConstants fields
    points: list = field(default_factory=list)
    model: dict = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "created": self.created, "model": self.model,
                "constants": self.constants, "points": self.points}

    def save(self, path: str | None = None) -> str:
        """Write atomically (a reader never sees half a profile)."""
        path = path or default_profile_path()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = partial_path(path)
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)
        return path

    def speed_constants(self, accelerator: str, dtype: str) -> SpeedConstants | None:
        values = self.constants.get(accelerator, {}).get(dtype)
        return SpeedConstants(**values) if values else None

    def best_point(self, accelerator: str, devices: int) -> dict | None:
        """The point with the most tokens/s for this accelerator kind and device count (measured ones win ties)."""
        points = [p for p in self.points if p["accelerator"] == accelerator and p["devices"] == devices]
        return max(points, key=lambda p: (p["tokens_per_s"], p["measured"]), default=None)


def load_profile(path: str | None = None) -> GoodputProfile | None:
    """The goodput profile at `path` (default: default_profile_path()), or None when there is none."""
    path = path or default_profile_path()
    if not os.path.exists(path):
        return None
    with open(path) as f:
        values = json.load(f)
    if values.get("format") != PROFILE_FORMAT or values.get("version") != PROFILE_VERSION:
        raise ValueError(f"{path} is not a megatronish goodput profile of version {PROFILE_VERSION}: "
                         "run tools/plan.py --profile again to rewrite it")
    return GoodputProfile(values["constants"], values["points"], values.get("model", {}), values.get("created", ""))


def constants_for(cluster: Cluster, args, path: str | None = None) -> SpeedConstants | None:
    """The calibrated constants of the cluster's accelerator kind and the run's dtype, if a profile has them."""
    profile = load_profile(path)
    return profile.speed_constants(cluster.accelerator.name, dtype_name(args)) if profile else None


# -- measuring --

def profile_layouts(max_ranks: int) -> list[tuple[int, int, int]]:
    return [(tp, pp, dp) for tp in (1, 2) for pp in (1, 2) for dp in (1, 2) if tp * pp * dp <= max_ranks]


def measure_layout(args, layout: Layout, iterations: int, warmup: int) -> tuple[list[float], dict]:
    """Train `iterations` timed iterations (after `warmup`) of the layout on CPU ranks: rank 0's iteration
    times, and the measured memory of rank 0 and of the last rank."""
    from megatronish.testing import run_distributed

    results = run_distributed(_timed_rank, layout.world_size, args=(layout_args(args, layout), iterations, warmup),
                              timeout=1800)
    return results[0][0], {"rank_0": results[0][1], "last_rank": results[-1][1]}


def _timed_rank(args, iterations: int, warmup: int):
    from megatronish import parallel_state
    from megatronish.training.memory_report import MemoryMonitor
    from megatronish.training.training import setup, train_step

    with contextlib.redirect_stdout(io.StringIO()):  # setup's report lines: the tool prints its own
        run = setup(args)
    generator = torch.Generator().manual_seed(run.layout.dp_rank)
    monitor = MemoryMonitor(run.model, run.ddp_model, run.optimizer)
    times, measured = [], None
    try:
        for step in range(max(1, warmup) + iterations):
            batches = _random_batches(run, generator)
            dist.barrier()
            start = time.perf_counter()
            with monitor.watch():  # counts the warm-up steps' activations only: the hooks cost time
                train_step(batches, run.ddp_model, run.optimizer)
            if measured is not None:
                times.append(time.perf_counter() - start)
            elif step == max(1, warmup) - 1:
                with contextlib.redirect_stdout(io.StringIO()):
                    measured = monitor.report(step + 1, run.layout)
    finally:
        parallel_state.destroy_model_parallel()
    return times, dataclasses.asdict(measured)


def _random_batches(run, generator) -> list[dict]:
    """An iteration's micro-batches of random tokens (their values do not change the time)."""
    args, batches = run.args, []
    for _ in range(run.num_microbatches):
        tokens = torch.randint(0, run.config.vocab_size, (args.micro_batch_size, args.seq_length + 1),
                               generator=generator)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                        "loss_mask": torch.ones(args.micro_batch_size, args.seq_length)})
    return batches


def measure_constants(args, vocab_size: int, start: SpeedConstants, ranks: int, cores: int,
                      repeats: int = 8) -> SpeedConstants:
    """The time model's constants measured directly, each by the fastest of `repeats` tries:
    - compute: one rank trains one micro-batch of two sizes; its CPU time (not wall time, which other
      processes' load inflates) minus the Adam step's, against the training log's FLOPs of that micro-batch,
      gives the FLOP/s and the fixed cost per layer and micro-batch (what does not grow with the batch);
    - Adam: the optimizer step's CPU time per element;
    - collectives: two ranks all-reduce 64 KiB and 4 MiB over gloo (wall time; each takes a few ms, short
      enough for the fastest try to miss other processes' time slices): latency and bandwidth;
    - when `ranks` (the most a profile layout has) outnumber the `cores`: the scheduling wait of a blocking
      message (measure_scheduling_wait); else it cannot occur in the profile and stays as `start` has it.
    The inter-node bandwidth cannot be measured on one machine and stays as `start` has it."""
    from megatronish.testing import run_distributed

    sizes = (1, max(2, args.micro_batch_size))
    (small, large), optimizer = run_distributed(_compute_rank, 1, args=(args, vocab_size, sizes, repeats),
                                                timeout=1800)[0]
    flop_diff, time_diff = large[0] - small[0], large[1] - small[1]
    if flop_diff > 0 and time_diff > 0 and small[1] > small[0] * time_diff / flop_diff:
        flops_per_s = flop_diff / time_diff
        overhead = (small[1] - small[0] / flops_per_s) / args.num_layers
    else:  # too noisy to separate: all of it is compute
        flops_per_s, overhead = large[0] / large[1], 0.0
    message_bytes = (64 << 10, 4 << 20)
    (t_small, t_large) = run_distributed(_collective_rank, 2, args=(message_bytes, repeats * 4), timeout=600)[0]
    bandwidth = (message_bytes[1] - message_bytes[0]) / max(t_large - t_small, 1e-9)
    latency = max(t_small - message_bytes[0] / bandwidth, 1e-6)
    measured = dataclasses.replace(start, flops_per_s=flops_per_s, overhead_s_per_layer_microbatch=overhead,
                                   optimizer_s_per_element=optimizer, intra_node_bytes_per_s=bandwidth,
                                   latency_s=latency)
    if ranks <= cores:
        return measured
    return dataclasses.replace(measured, scheduling_wait_s=measure_scheduling_wait(args, vocab_size, measured, ranks,
                                                                                   cores, repeats))


def measure_scheduling_wait(args, vocab_size: int, constants: SpeedConstants, ranks: int, cores: int,
                            repeats: int = 8, iterations: int = 40) -> float:
    """Seconds a blocking message waits for a core, per extra rank per core, when `ranks` CPU ranks share `cores`.

    The ranks, in pairs, run what a TP 2 layout of this model runs: the compute between two of its
    collectives (a quarter of a layer's forward and backward for one micro-batch, as matmuls of the
    micro-batch's activations), then an all-reduce of the activations within the pair (an odd last rank
    only computes). The time model (speed.py) has an iteration of CPU work c last
    max(c + L, c ranks / cores) + wait (ranks / cores - 1), L the all-reduce's time with `constants`'
    latency and bandwidth; the wait is what the fastest try of `iterations` iterations (about as many
    messages as one training iteration sends) takes beyond that."""
    from megatronish.testing import run_distributed

    h, rows = args.hidden_size, args.seq_length * args.micro_batch_size
    layer_flops = flops_per_token(args, vocab_size)[0] / args.num_layers
    matmuls = max(1, round(layer_flops / (2 * 4) / (2 * h * h)))  # per token: TP 2 halves it, 4 collectives
    message_bytes = rows * h * (2 if args.bf16 or args.fp16 else 4)
    tries = run_distributed(_paired_rank, ranks, args=(matmuls, rows, h, message_bytes // 4, iterations, repeats),
                            timeout=600)[0]
    message = constants.latency_s + message_bytes / constants.intra_node_bytes_per_s  # a 2-rank ring's time
    wait = min(wall - max(cpu + message, cpu * ranks / cores) for wall, cpu in tries)
    return max(wait / (ranks / cores - 1), 1e-6)


def _paired_rank(matmuls: int, rows: int, hidden: int, message_elements: int, iterations: int, repeats: int):
    """Rank 0's (wall seconds, compute CPU seconds) per iteration of measure_scheduling_wait's loop, each try."""
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
    group = pairs[rank // 2] if rank // 2 < len(pairs) else None
    x, weight, message = torch.randn(rows, hidden), torch.randn(hidden, hidden), torch.zeros(message_elements)
    tries = []
    for _ in range(repeats):
        dist.barrier()
        wall, cpu = time.perf_counter(), 0.0
        for _ in range(iterations):
            start = time.process_time()
            for _ in range(matmuls):
                x @ weight
            cpu += time.process_time() - start
            if group is not None:
                dist.all_reduce(message, group=group)
        tries.append(((time.perf_counter() - wall) / iterations, cpu / iterations))
    return tries


def _compute_rank(args, vocab_size: int, sizes: tuple, repeats: int):
    """(model FLOPs, CPU seconds of forward + backward) of one micro-batch of each size; Adam's seconds/element."""
    from megatronish import parallel_state
    from megatronish.training.training import setup, train_step
    from megatronish.training.training_log import num_floating_point_operations

    results, optimizer = [], []
    for size in sizes:
        run_args = layout_args(args, Layout(1, 1, 1, None, size, args.recompute_granularity, False, False))
        run_args.global_batch_size = size  # one micro-batch per step
        with contextlib.redirect_stdout(io.StringIO()):
            run = setup(run_args)
        try:
            batches = _random_batches(run, torch.Generator().manual_seed(0))
            steps, updates = [], []
            for _ in range(repeats + 1):  # the first is a warm-up
                start = time.process_time()
                train_step(batches, run.ddp_model, run.optimizer)
                steps.append(time.process_time() - start)
                start = time.process_time()
                run.optimizer.step()
                updates.append(time.process_time() - start)
            elements = sum(e.main.numel() for e in run.optimizer.main_params)
            flops = num_floating_point_operations(run.args, run.config.padded_vocab_size(1))
            results.append((flops, min(steps[1:]) - min(updates[1:])))
            optimizer.append(min(updates[1:]) / elements)
        finally:
            parallel_state.destroy_model_parallel()
    return results, min(optimizer)


def _collective_rank(message_bytes: tuple, repeats: int) -> list[float]:
    """The fastest all-reduce of each size over the world's gloo group."""
    fastest = []
    for size in message_bytes:
        tensor = torch.zeros(size // 4)
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        fastest.append(min(times))
    return fastest


# -- fitting --

def predicted_seconds(args, layout: Layout, constants: SpeedConstants, vocab_size: int) -> float:
    plan = plan_layout(args, layout, cpu_cluster(layout.world_size), vocab_size, constants)
    return plan.time.total


def fit_constants(args, points: list[MeasuredPoint], start: SpeedConstants, vocab_size: int,
                  iterations: int = 50, prior_weight: float = PRIOR_WEIGHT) -> SpeedConstants:
    """The constants (FITTED of them) whose predictions best match the measured times, in log space, pulled
    toward `start` by `prior_weight` per unit of log(constant / start). A constant that is 0 in `start` (a cost
    this machine does not have) stays 0."""
    names = [name for name in FITTED if getattr(start, name) > 0]
    x0 = np.log([getattr(start, name) for name in names])
    measured = np.log([p.seconds for p in points])

    def constants(x):
        return dataclasses.replace(start, **{name: float(math.exp(v)) for name, v in zip(names, x)})

    def residuals(x):
        predicted = np.log([predicted_seconds(args, p.layout, constants(x), vocab_size) for p in points])
        return np.concatenate([predicted - measured, prior_weight * (x - x0)])

    x, damping = x0.copy(), 1e-2
    r = residuals(x)
    for _ in range(iterations):
        jacobian = np.stack([(residuals(x + step) - r) / 1e-4 for step in np.eye(len(x)) * 1e-4], axis=1)
        normal = jacobian.T @ jacobian
        gradient = jacobian.T @ r
        step = -np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-12), gradient)
        step = np.clip(step, -2.0, 2.0)  # at most a factor e^2 per step: the model is far from linear beyond
        candidate = residuals(x + step)
        if candidate @ candidate < r @ r:
            converged = r @ r - candidate @ candidate < 1e-9 * (r @ r) + 1e-15
            x, r, damping = x + step, candidate, damping / 3
            if converged:
                break
        else:
            damping *= 4
    return constants(x)


def leave_one_out(args, points: list[MeasuredPoint], start: SpeedConstants, vocab_size: int) -> list[float]:
    """Each point's predicted seconds with the constants fitted to the other points (a check of the fit)."""
    return [predicted_seconds(args, point.layout, fit_constants(args, points[:i] + points[i + 1:], start, vocab_size),
                              vocab_size) for i, point in enumerate(points)]


def calibrate(args, vocab_size: int, max_ranks: int = 4, iterations: int = 3, warmup: int = 2, rounds: int = 3,
              start: SpeedConstants | None = None, log=print) -> tuple[GoodputProfile, list[MeasuredPoint], dict]:
    """Measure the profile layouts, fit the constants, and build the goodput profile.

    The layouts take turns, `rounds` times; a layout's time is its fastest iteration: on a shared
    machine other processes' load only ever slows an iteration down, by however much they happen to take.
    Returns (profile, measured points, {"before": datasheet, "measured": micro-benchmarks, "after": fitted})."""
    args = fix_global_batch(args, max_ranks)
    dtype = dtype_name(args)
    before = start or cpu_cluster(1).speed(dtype)
    cores = cpu_cluster(max_ranks).cores_per_node
    measured_constants = measure_constants(args, vocab_size, before, max_ranks, cores)
    log("  measured: " + ", ".join(f"{k} {v:.3g}" for k, v in measured_constants.to_dict().items()))
    layouts = []
    for tp, pp, dp in profile_layouts(max_ranks):
        layout = _profile_layout(args, tp, pp, dp)
        plan = plan_layout(args, layout, cpu_cluster(tp * pp * dp), vocab_size, before)
        if plan.valid:
            layouts.append(layout)
        else:
            log(f"  TP{tp} PP{pp} DP{dp}: skipped ({plan.rejected})")
    if not layouts:
        raise ValueError("no profile layout is valid for these arguments (see the reasons above)")
    times, memory = {layout: [] for layout in layouts}, {}
    for round_ in range(rounds):
        for layout in layouts:
            measured, memory[layout] = measure_layout(args, layout, iterations, warmup)
            times[layout] += measured
            log(f"  round {round_ + 1}/{rounds} TP{layout.tp} PP{layout.pp} DP{layout.dp}: "
                + " ".join(f"{t * 1e3:.0f}" for t in measured) + f" ms (load average {os.getloadavg()[0]:.1f})")
    points = [MeasuredPoint(layout, min(times[layout]), memory[layout]) for layout in layouts]
    after = fit_constants(args, points, measured_constants, vocab_size)
    profile = GoodputProfile(constants={"cpu": {dtype: after.to_dict()}},
                             model=_model_record(args, vocab_size),
                             created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for point in points:
        predicted = {name: predicted_seconds(args, point.layout, constants, vocab_size) * 1e3
                     for name, constants in (("before", before), ("measured", measured_constants), ("after", after))}
        profile.points.append(_point(args, point.layout, point.seconds, measured=True,
                                     predicted_before_ms=predicted["before"],
                                     predicted_from_measured_constants_ms=predicted["measured"],
                                     predicted_ms=predicted["after"], memory=point.memory))
    measured_layouts = {p.layout for p in points}
    for devices in (1, 2, 4):
        for plan in plan_layouts(args, cpu_cluster(devices), vocab_size, _search_space(args), after):
            if plan.fits and plan.layout not in measured_layouts:
                profile.points.append(_point(args, plan.layout, plan.time.total, measured=False))
    return profile, points, {"before": before, "measured": measured_constants, "after": after}


def _profile_layout(args, tp: int, pp: int, dp: int) -> Layout:
    return Layout(tp, pp, dp, None, args.micro_batch_size, args.recompute_granularity,
                  args.use_distributed_optimizer and dp > 1, args.sequence_parallel and tp > 1)


def _search_space(args) -> SearchSpace:
    """The predicted points vary TP, PP, DP and the micro-batch; the other choices stay as given."""
    return SearchSpace(virtual_pp=(None,), recompute=(args.recompute_granularity,),
                       distributed_optimizer=(False, True) if args.use_distributed_optimizer else (False,),
                       sequence_parallel=(False, True) if args.sequence_parallel else (False,))


def _point(args, layout: Layout, seconds: float, measured: bool, **extra) -> dict:
    point = {"accelerator": "cpu", "devices": layout.world_size, "layout": layout.to_dict(),
             "flags": " ".join(layout.flags()), "measured": measured, "ms_per_iteration": seconds * 1e3,
             "tokens_per_s": args.global_batch_size * args.seq_length / seconds}
    point.update(extra)
    return point


def _model_record(args, vocab_size: int) -> dict:
    return {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "num_attention_heads": args.num_attention_heads, "ffn_hidden_size": args.ffn_hidden_size,
            "seq_length": args.seq_length, "vocab_size": vocab_size, "global_batch_size": args.global_batch_size,
            "dtype": dtype_name(args)}
