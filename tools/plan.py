"""Layout planner: memory per rank and speed of every TP x PP x DP layout of a training run, before launch.

    python tools/plan.py --accelerator H100 --devices-per-node 8 \\
        --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024 \\
        --micro-batch-size 4 --global-batch-size 512 --bf16 --tokenizer-type GPT2BPETokenizer
    python tools/plan.py --cluster cluster.json --price 2.5 --json ...   # a cluster file, tokens per dollar
    python tools/plan.py --profile --micro-batch-size 4 --global-batch-size 16   # calibrate on this CPU

Every flag that is not the planner's own is a pretrain_gpt.py (Megatron-LM) training flag: the model
shape, sequence, batch, precision, recompute, distributed optimizer, sequence parallelism (without
--data-path, the built-in demo's defaults). The planner tries every layout (TP, PP, virtual stages, DP,
micro-batch, recompute, distributed optimizer, sequence parallelism), rejects those pretrain_gpt.py
would reject (with its message), predicts each one's memory per rank, itemized, and its time per
iteration, and prints them ranked by tokens/s with a one-line recommendation (--json: all of it).

--profile measures the time model's constants with micro-benchmarks (FLOP/s, per-layer overhead, Adam,
all-reduce latency and bandwidth, and, when --max-ranks exceeds the cores, the wait of a blocking
message for a core), runs a few iterations of each TP x PP x DP layout (TP, PP, DP in {1, 2}, at most
--max-ranks ranks) on this machine's CPU, fits the constants to them, prints measured against predicted
ms/iteration before and after calibration, and writes the goodput profile (default
$MEGATRONISH_CACHE/goodput_profile.json) whose constants later plans for this accelerator kind use.
"""

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatronish.planner.calibration import (  # noqa: E402
    calibrate,
    cpu_cluster,
    default_profile_path,
    leave_one_out,
    load_profile,
    predicted_seconds,
)
from megatronish.planner.cluster import GB, PRESETS, Cluster, accelerator_from, load_cluster  # noqa: E402
from megatronish.planner.report import recommendation, table, vocab_size_of  # noqa: E402
from megatronish.planner.search import (  # noqa: E402
    SearchSpace,
    dtype_name,
    fix_global_batch,
    model_parameters,
    plan_layout,
    plan_layouts,
)
from megatronish.training.arguments import ArgumentError, parse_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="All other flags are pretrain_gpt.py's training flags (see its --help).")
    g = p.add_argument_group("cluster (a --cluster JSON file, or these flags)")
    g.add_argument("--cluster", help="JSON: {\"accelerator\": preset name or its fields, \"nodes\", "
                   "\"devices_per_node\", \"price_per_device_hour\", \"cores_per_node\"}")
    g.add_argument("--accelerator", default="H100", help=f"preset: {', '.join(PRESETS)}, cpu (default: H100)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--devices-per-node", type=int, help="default: 8 (cpu: this machine's cores)")
    g.add_argument("--memory-gb", type=float, help="override the accelerator's memory (GB)")
    g.add_argument("--peak-tflops", type=float, help="override its dense matmul peak for the run's dtype")
    g.add_argument("--intra-node-gbps", type=float, help="override the intra-node bandwidth (GB/s per device)")
    g.add_argument("--inter-node-gbps", type=float, help="override the inter-node bandwidth (GB/s per device)")
    g.add_argument("--price", type=float, help="price per device-hour: adds tokens per dollar")
    g = p.add_argument_group("search and output")
    g.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: from the tokenizer flags)")
    for name, kind in (("tp", int), ("pp", int), ("vpp", int), ("micro-batch-sizes", int)):
        g.add_argument(f"--search-{name}", type=kind, nargs="+", help=f"only these values of {name} (default: all)")
    g.add_argument("--search-recompute", nargs="+", choices=("none", "selective", "full"))
    g.add_argument("--search-distributed-optimizer", nargs="+", choices=("on", "off"))
    g.add_argument("--search-sequence-parallel", nargs="+", choices=("on", "off"))
    g.add_argument("--top", type=int, default=20, help="rows of the table (default 20)")
    g.add_argument("--all", action="store_true",
                   help="every layout: those that do not fit and the rejected, with reasons")
    g.add_argument("--json", action="store_true", help="print JSON instead of the table")
    g.add_argument("--goodput-profile", help=f"read calibrated constants from here (default: {default_profile_path()} "
                   "when it exists)")
    g.add_argument("--no-goodput-profile", action="store_true", help="datasheet constants even if a profile exists")
    g = p.add_argument_group("calibration")
    g.add_argument("--profile", action="store_true", help="measure the TP x PP x DP layouts on this CPU and write "
                   "the goodput profile (to --goodput-profile or the default path)")
    g.add_argument("--max-ranks", type=int, default=4)
    g.add_argument("--iterations", type=int, default=3, help="timed iterations per layout and round (after 2 warm-up)")
    g.add_argument("--rounds", type=int, default=3, help="turns each layout takes (its fastest iteration counts)")
    return p


def cluster_from(opts) -> Cluster:
    if opts.cluster:
        cluster = load_cluster(opts.cluster)
    else:
        cpu = opts.accelerator == "cpu"
        devices = opts.devices_per_node or (len(os.sched_getaffinity(0)) if cpu else 8)
        cluster = Cluster(accelerator_from(opts.accelerator, devices), opts.nodes, devices,
                          cores_per_node=len(os.sched_getaffinity(0)) if cpu else None)
    overrides = {}
    if opts.memory_gb:
        overrides["memory_bytes"] = int(opts.memory_gb * GB)
    if opts.intra_node_gbps:
        overrides["intra_node_bandwidth"] = opts.intra_node_gbps * GB
    if opts.inter_node_gbps:
        overrides["inter_node_bandwidth"] = opts.inter_node_gbps * GB
    accelerator = dataclasses.replace(cluster.accelerator, **overrides)
    price = opts.price or cluster.price_per_device_hour
    return dataclasses.replace(cluster, accelerator=accelerator, price_per_device_hour=price)


def search_space(opts) -> SearchSpace:
    def choice(values, on="on"):
        return None if values is None else tuple(v == on for v in values)

    return SearchSpace(
        tp=tuple(opts.search_tp) if opts.search_tp else None, pp=tuple(opts.search_pp) if opts.search_pp else None,
        virtual_pp=tuple(opts.search_vpp) if opts.search_vpp else None,
        micro_batch_size=tuple(opts.search_micro_batch_sizes) if opts.search_micro_batch_sizes else None,
        recompute=tuple(None if r == "none" else r for r in opts.search_recompute) if opts.search_recompute else None,
        distributed_optimizer=choice(opts.search_distributed_optimizer),
        sequence_parallel=choice(opts.search_sequence_parallel))


def main(argv=None) -> None:
    parser = build_parser()
    opts, training_argv = parser.parse_known_args(argv)
    try:
        args = parse_args(training_argv)
        if args.argument_errors:  # bad values, unknown flags: as pretrain_gpt.py would report them
            raise ArgumentError("\n".join(args.argument_errors))
        vocab_size = vocab_size_of(args, opts.vocab_size)
        cluster = cluster_from(opts)
    except (ArgumentError, ValueError) as error:
        parser.error(str(error))
    if opts.profile:
        return run_profile(args, vocab_size, opts)
    constants, source = speed_constants(opts, cluster, args)
    if opts.peak_tflops:
        constants = dataclasses.replace(constants or cluster.speed(dtype_name(args)),
                                        flops_per_s=0.5 * opts.peak_tflops * 1e12)
    plans = plan_layouts(args, cluster, vocab_size, search_space(opts), constants)
    if opts.json:
        print(json.dumps({"cluster": cluster.describe(), "speed_constants": source,
                          "model_parameters": model_parameters(args, vocab_size),
                          "constants": (constants or cluster.speed(dtype_name(args))).to_dict(),
                          "recommendation": recommendation(plans), "plans": [p.to_dict() for p in plans]}, indent=1))
        return
    batch = plans[0].global_batch_size if plans and plans[0].valid else args.global_batch_size
    print(f"model: {model_parameters(args, vocab_size):,} parameters, {args.num_layers} layers, hidden "
          f"{args.hidden_size}, {args.num_attention_heads} heads, sequence {args.seq_length}, vocabulary {vocab_size}, "
          f"{dtype_name(args)}, global batch {batch}")
    print(f"cluster: {cluster.describe()}; speed constants: {source}")
    print(table(plans, None if opts.all else opts.top, show_rejected=opts.all))
    print(recommendation(plans))


def speed_constants(opts, cluster: Cluster, args):
    """(constants, where they come from): the goodput profile's for this accelerator and dtype, else None."""
    if opts.no_goodput_profile:
        return None, "datasheet defaults"
    profile = load_profile(opts.goodput_profile)
    found = profile.speed_constants(cluster.accelerator.name, dtype_name(args)) if profile else None
    if found is None:
        return None, "datasheet defaults"
    return found, f"calibrated ({opts.goodput_profile or default_profile_path()}, {profile.created})"


def run_profile(args, vocab_size: int, opts) -> None:
    print(f"profiling on this CPU: TP, PP, DP in {{1, 2}}, at most {opts.max_ranks} ranks, {opts.rounds} rounds of "
          f"{opts.iterations} timed iterations each (ranks are processes with one thread; this machine has "
          f"{len(os.sched_getaffinity(0))} cores)")
    profile, points, constants = calibrate(args, vocab_size, opts.max_ranks, opts.iterations, rounds=opts.rounds)
    before, micro, after = constants["before"], constants["measured"], constants["after"]
    path = profile.save(opts.goodput_profile)
    fit_args = fix_global_batch(args, opts.max_ranks)
    loo = leave_one_out(fit_args, points, micro, vocab_size)
    print("\nms/iteration: measured (fastest iteration); predicted with the datasheet constants (before), with the "
          "micro-benchmarks' (measured constants), after the fit to all layouts, and after a fit to the other "
          "layouts only (left out); rank 0's memory, measured / predicted")
    print(f"{'layout':<14}{'measured':>10}{'before':>9}{'ratio':>7}{'measured constants':>20}{'ratio':>7}"
          f"{'after':>9}{'ratio':>7}{'left out':>10}{'ratio':>7}{'state bytes':>13}{'activations':>13}")
    for point, held_out in zip(points, loo):
        predicted = [predicted_seconds(fit_args, point.layout, c, vocab_size) for c in (before, micro, after)]
        stage = plan_layout(fit_args, point.layout, cpu_cluster(point.layout.world_size), vocab_size).stages[0]
        measured = point.memory["rank_0"]
        state = (measured["parameters"] + measured["gradients"] + measured["optimizer"]) / (
            stage.parameters + stage.gradients + stage.optimizer)
        columns = "".join(f"{t * 1e3:>{w}.1f}{t / point.seconds:>7.2f}"
                          for t, w in zip(predicted + [held_out], (9, 20, 9, 10)))
        print(f"{_short(point.layout):<14}{point.seconds * 1e3:>10.1f}{columns}"
              f"{state:>13.3f}{measured['activations'] / stage.activations.total:>13.3f}")
    def worst(constants):
        return max(abs(predicted_seconds(fit_args, p.layout, constants, vocab_size) / p.seconds - 1) for p in points)

    print(f"every layout within {worst(before):.0%} of its measured time before calibration, {worst(micro):.0%} with "
          f"the measured constants, {worst(after):.0%} after the fit (goal: 20%), "
          f"{max(abs(h / p.seconds - 1) for p, h in zip(points, loo)):.0%} when left out of the fit")
    for devices in sorted({p.layout.world_size for p in points}):
        group = [p for p in points if p.layout.world_size == devices]
        if len(group) < 2:
            continue
        measured_best = min(group, key=lambda p: p.seconds)
        predicted_best = min(group, key=lambda p: predicted_seconds(fit_args, p.layout, after, vocab_size))
        same = "same" if measured_best is predicted_best else "DIFFERENT"
        print(f"{devices} ranks: measured best {_short(measured_best.layout)}, predicted best "
              f"{_short(predicted_best.layout)} ({same})")
    print("fitted constants: " + ", ".join(f"{k} {v:.3g}" for k, v in after.to_dict().items()))
    print(f"goodput profile written to {path}")


def _short(layout) -> str:
    return f"TP{layout.tp} PP{layout.pp} DP{layout.dp}"


if __name__ == "__main__":
    main()
