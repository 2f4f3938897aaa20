"""The planner's output: a ranked table for people, JSON for programs, a one-line recommendation,
and the plan of one command line (`pretrain_gpt.py --dry-run`)."""

import dataclasses
import os
import re

import torch

from megatronish.planner.cluster import PRESETS, Accelerator, Cluster, GiB, MiB
from megatronish.planner.search import LayoutPlan, SearchSpace, model_parameters, plan_given_layout, plan_layouts

GPT2_VOCAB_SIZE = 50257


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def describe(plan: LayoutPlan) -> str:
    """A short name of the layout: 'TP2 PP2x2v DP2 mb4 selective DO SP'."""
    lay = plan.layout
    pp = f"PP{lay.pp}" + (f"x{lay.virtual_pp}v" if lay.virtual_pp else "")
    parts = [f"TP{lay.tp}", pp, f"DP{lay.dp}", f"mb{lay.micro_batch_size}", lay.recompute or "-"]
    parts += ["DO" if lay.distributed_optimizer else "-", "SP" if lay.sequence_parallel else "-"]
    return " ".join(parts)


def table(plans: list[LayoutPlan], top: int | None = 20, show_rejected: bool = False) -> str:
    """The ranked layouts (the first `top` that fit, then a count of the rest)."""
    fitting = [p for p in plans if p.fits]
    too_big = [p for p in plans if p.valid and not p.fits]
    rejected = [p for p in plans if not p.valid]
    dollars = any(p.tokens_per_dollar is not None for p in fitting)
    header = (f"{'#':>3} {'layout (TP PP DP micro-batch recompute dist-opt SP)':<40} {'memory/rank':>11} "
              f"{'params':>10} {'grads':>10} {'optim':>10} {'activ':>10} {'in-fl':>5} {'ms/iter':>9} {'bubble':>6} "
              f"{'tokens/s':>10} {'tok/s/dev':>9}" + (f" {'tokens/$':>10}" if dollars else ""))
    lines = [header, "-" * len(header)]
    shown = fitting if top is None else fitting[:top]
    for i, plan in enumerate(shown + (too_big if top is None else []), 1):
        lines.append(_row(i, plan, dollars))
    lines.append(f"{len(fitting)} layouts fit, {len(too_big)} valid ones do not fit in "
                 f"{format_bytes(plans[0].memory_limit) if plans and plans[0].valid else '?'} per rank, "
                 f"{len(rejected)} rejected by pretrain_gpt.py's checks")
    if too_big and not fitting:
        smallest = min(too_big, key=lambda p: p.peak_memory)
        lines.append(f"smallest: {describe(smallest)} needs {format_bytes(smallest.peak_memory)} per rank")
    if show_rejected:
        lines += [f"  rejected {describe(p)}: {p.rejected.replace(chr(10), '; ')}" for p in rejected]
    elif rejected or too_big:
        lines.append("  (--all lists them too, the rejected with pretrain_gpt.py's reason)")
    return "\n".join(lines)


def _row(i: int, plan: LayoutPlan, dollars: bool) -> str:
    worst = max(plan.stages, key=lambda s: s.total)
    t = plan.time
    bubble = t.pipeline_bubble / t.total
    fit = "" if plan.fits else " (does not fit)"
    row = (f"{i:>3} {describe(plan):<40} {format_bytes(worst.total):>11} {format_bytes(worst.parameters):>10} "
           f"{format_bytes(worst.gradients):>10} {format_bytes(worst.optimizer):>10} "
           f"{format_bytes(worst.activations.total):>10} {worst.activations.in_flight:>5} {t.total * 1e3:>9.1f} "
           f"{bubble:>6.1%} {plan.tokens_per_s:>10,.0f} {plan.tokens_per_s / plan.world_size:>9,.0f}")
    if dollars:
        row += f" {plan.tokens_per_dollar:>10,.0f}"
    return row + fit


def recommended(plans: list[LayoutPlan]) -> LayoutPlan | None:
    """Among the layouts that fit and are within 1% of the fastest (the model cannot tell them apart), the one
    with the most headroom; None if none fits. `plans` ranked as plan_layouts ranks them."""
    fitting = [p for p in plans if p.fits]
    if not fitting:
        return None
    return min((p for p in fitting if p.tokens_per_s >= 0.99 * fitting[0].tokens_per_s), key=lambda p: p.peak_memory)


def recommendation(plans: list[LayoutPlan]) -> str:
    best = recommended(plans)
    if best is None:
        valid = [p for p in plans if p.valid]
        if not valid:
            return "no layout is valid for these arguments: see the reasons with --all"
        smallest = min(valid, key=lambda p: p.peak_memory)
        return (f"no layout fits: the smallest, {describe(smallest)}, needs {format_bytes(smallest.peak_memory)} per "
                f"rank of {format_bytes(smallest.memory_limit)}; use more devices, a smaller micro-batch or model")
    return (f"recommended: {' '.join(best.layout.flags())}  ->  {best.tokens_per_s:,.0f} tokens/s "
            f"({best.tokens_per_s / best.world_size:,.0f} per device), {format_bytes(best.peak_memory)} of "
            f"{format_bytes(best.memory_limit)} per rank")


def plan_details(plan: LayoutPlan) -> str:
    """Every stage's memory, itemized, and the time by cause: the plan of one layout."""
    if not plan.valid:
        return f"layout {describe(plan)} is rejected: {plan.rejected}"
    lines = [f"layout {describe(plan)}: {plan.world_size} ranks, global batch {plan.global_batch_size} x "
             f"{plan.seq_length} tokens"]
    for s in plan.stages:
        lines.append(f"  stage {s.pp_rank}: parameters {format_bytes(s.parameters)} + gradients "
                     f"{format_bytes(s.gradients)}"
                     f" + optimizer {format_bytes(s.optimizer)} + activations {format_bytes(s.activations.layers)} "
                     f"(layers) + {format_bytes(s.activations.extras)} (embedding/output; {s.activations.in_flight} "
                     f"micro-batches in flight) + allowance {format_bytes(s.allowance)} = {format_bytes(s.total)}")
    verdict = "fits in" if plan.fits else "does NOT fit in"
    lines.append(f"  peak {format_bytes(plan.peak_memory)} per rank {verdict} {format_bytes(plan.memory_limit)}")
    parts = ", ".join(f"{name.replace('_', ' ')} {seconds * 1e3:.1f}" for name, seconds in vars(plan.time).items())
    lines.append(f"  time per iteration {plan.time.total * 1e3:.1f} ms ({parts}); {plan.tokens_per_s:,.0f} tokens/s, "
                 f"{plan.tokens_per_s / plan.world_size:,.0f} per device, "
                 f"{plan.flops_per_iteration / plan.time.total / plan.world_size / 1e12:.3g} model TFLOP/s per device")
    return "\n".join(lines)


def vocab_size_of(args, override: int | None = None) -> int:
    """The tokenizer's vocabulary without reading a dataset: --vocab-size, else the tokenizer files if present,
    else the known size of the tokenizer type (byte tokens; GPT-2 BPE; TikTokenizer's default)."""
    if override:
        return override
    from megatronish.data.tokenizers import TIKTOKEN_VOCAB_SIZE, tokenizer_from_args

    if args.tokenizer_type == "NullTokenizer" and getattr(args, "vocab_size", None):
        return args.vocab_size
    if args.tokenizer_type == "TikTokenizer":  # --vocab-size is its size, whatever the file holds beyond it
        return getattr(args, "vocab_size", None) or TIKTOKEN_VOCAB_SIZE
    files = [f for f in (args.vocab_file, args.merge_file, args.tokenizer_model) if f]
    if args.tokenizer_type == "ByteTokenizer" or (files and all(os.path.exists(f) for f in files)):
        return tokenizer_from_args(args).vocab_size
    if args.tokenizer_type == "GPT2BPETokenizer":
        return GPT2_VOCAB_SIZE
    raise ValueError(f"cannot tell the vocabulary size of --tokenizer-type {args.tokenizer_type} without its files: "
                     "give --vocab-size")


def gpu_preset(name: str, memory_bytes: int) -> Accelerator:
    """The preset of a CUDA device by its name; an unknown GPU gets its own memory and the A100-40GB's speeds."""
    if re.search(r"\bA100\b", name):
        return PRESETS["A100-80GB" if memory_bytes > 50 * GiB else "A100-40GB"]
    for key in ("H200", "H100", "L4", "T4"):
        if re.search(rf"\b{key}\b", name):
            return PRESETS[key]
    return dataclasses.replace(PRESETS["A100-40GB"], name=f"{name} (A100-40GB speeds assumed)",
                               memory_bytes=memory_bytes)


def local_cluster(world_size: int) -> Cluster:
    """This machine as the cluster of a run: its GPU kind or its CPU, `world_size` ranks on one node."""
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return Cluster(gpu_preset(properties.name, properties.total_memory), 1, world_size)
    from megatronish.planner.calibration import cpu_cluster

    return cpu_cluster(world_size)


def choose_layout(args, world_size: int, space: SearchSpace | None = None,
                  profile_path: str | None = None) -> LayoutPlan | None:
    """The planner's recommended layout for `world_size` ranks of this machine (`--layout auto` of an elastic
    run), with the goodput profile's constants when it has them; None when no layout fits. By default only TP
    and PP vary (one chunk per stage); micro-batch, recompute, distributed optimizer and SP stay as given."""
    from megatronish.planner.calibration import constants_for

    cluster = local_cluster(world_size)
    space = space or SearchSpace(virtual_pp=(None,), micro_batch_size=(args.micro_batch_size,),
                                 recompute=(args.recompute_granularity,),
                                 distributed_optimizer=(args.use_distributed_optimizer,),
                                 sequence_parallel=(args.sequence_parallel,))
    return recommended(plan_layouts(args, cluster, vocab_size_of(args), space,
                                    constants_for(cluster, args, profile_path)))


def dry_run(args, world_size: int) -> str:
    """pretrain_gpt.py --dry-run: the plan of the given arguments on this machine (nothing is built)."""
    from megatronish.planner.calibration import constants_for

    cluster = local_cluster(world_size)
    vocab_size = vocab_size_of(args)
    constants = constants_for(cluster, args)
    plan = plan_given_layout(args, cluster, vocab_size, constants)
    source = "from the goodput profile" if constants is not None else "datasheet defaults"
    return (f"plan on {cluster.describe()} (speed constants: {source}); model "
            f"{model_parameters(args, vocab_size):,} parameters\n" + plan_details(plan))
