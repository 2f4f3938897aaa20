"""Every TP x PP x DP layout of a training run, checked and predicted: memory per rank and time per iteration.

    args = parse_args([...Megatron flags...])
    plans = plan_layouts(args, cluster, vocab_size)           # every candidate, ranked
    plan = plan_given_layout(args, cluster, vocab_size)       # only the layout the arguments ask for

A candidate is the arguments with other values of --tp, --pp, virtual stages, --micro-batch-size,
--recompute-granularity, --use-distributed-optimizer and --sequence-parallel (DP follows from the
world size). Each is checked by megatronish.training.arguments.validate_layout_args, the same rules
pretrain_gpt.py applies, so a rejected candidate carries the message pretrain_gpt.py would print.
"""

import argparse
import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from megatronish.parallel_layout import ParallelDims
from megatronish.planner.activations import PeakActivations, chunk_activation_bytes, peak_activations
from megatronish.planner.cluster import GiB, Cluster, SpeedConstants
from megatronish.planner.parameters import state_bytes, total_parameters
from megatronish.planner.speed import StageWork, TimeEstimate, iteration_time, stage_flops
from megatronish.model.pipeline_split import stage_layers
from megatronish.training.arguments import ArgumentError, transformer_config_from_args, validate_layout_args
from megatronish.training.training_log import num_floating_point_operations

RECOMPUTE_CHOICES = (None, "selective", "full")

# What the counted bytes leave out (the allocator's caching and fragmentation, the logits' gradient and other
# temporaries of backward, communication buffers) is allowed for as a fraction of them plus a fixed part per rank:
# on CUDA the context, cuBLAS workspaces and NCCL buffers (~1 GiB); on CPU the rank's Python + torch process.
ALLOWANCE_FRACTION = 0.10
ALLOWANCE_FIXED = {"cuda": 1 * GiB, "cpu": GiB // 2}


@dataclass(frozen=True)
class Layout:
    """One way to run the job: the choices the planner varies."""
    tp: int
    pp: int
    dp: int
    virtual_pp: int | None
    micro_batch_size: int
    recompute: str | None
    distributed_optimizer: bool
    sequence_parallel: bool

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(self.tp, self.pp, self.dp, self.virtual_pp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def flags(self) -> list[str]:
        """The pretrain_gpt.py flags that select this layout."""
        flags = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp)]
        if self.virtual_pp:
            flags += ["--virtual-pipeline-model-parallel-size", str(self.virtual_pp)]
        flags += ["--micro-batch-size", str(self.micro_batch_size)]
        if self.recompute:
            flags += ["--recompute-granularity", self.recompute]
        if self.distributed_optimizer:
            flags.append("--use-distributed-optimizer")
        if self.sequence_parallel:
            flags.append("--sequence-parallel")
        return flags

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of pipeline stage `pp_rank` (its first DP and TP rank: the most loaded)."""
    pp_rank: int
    parameters: int
    gradients: int
    optimizer: int
    activations: PeakActivations
    allowance: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations.total + self.allowance

    def to_dict(self) -> dict:
        return {"pp_rank": self.pp_rank, "parameters": self.parameters, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations_layers": self.activations.layers,
                "activations_embedding_output": self.activations.extras,
                "micro_batches_in_flight": self.activations.in_flight, "allowance": self.allowance,
                "total": self.total}


@dataclass
class LayoutPlan:
    layout: Layout
    rejected: str | None = None                 # why pretrain_gpt.py refuses it (then nothing else is set)
    stages: list[StageMemory] = field(default_factory=list)
    memory_limit: int = 0
    time: TimeEstimate | None = None
    global_batch_size: int = 0
    seq_length: int = 0
    world_size: int = 0
    flops_per_iteration: float = 0.0            # the training log's model FLOPs of an iteration
    stage_flops: list = field(default_factory=list)  # those of one rank of each stage
    price_per_device_hour: float | None = None

    @property
    def valid(self) -> bool:
        return self.rejected is None

    @property
    def peak_memory(self) -> int:
        return max(stage.total for stage in self.stages)

    @property
    def fits(self) -> bool:
        return self.valid and self.peak_memory <= self.memory_limit

    @property
    def tokens_per_s(self) -> float:
        return self.global_batch_size * self.seq_length / self.time.total

    @property
    def tokens_per_dollar(self) -> float | None:
        if not self.price_per_device_hour:
            return None
        return self.tokens_per_s * 3600 / (self.price_per_device_hour * self.world_size)

    def to_dict(self) -> dict:
        out = {"layout": self.layout.to_dict(), "flags": " ".join(self.layout.flags()), "valid": self.valid}
        if not self.valid:
            out["rejected"] = self.rejected
            return out
        out.update(fits=self.fits, memory_per_rank=self.peak_memory, memory_limit=self.memory_limit,
                   stages=[s.to_dict() for s in self.stages], ms_per_iteration=self.time.total * 1e3,
                   time_breakdown_ms={k: v * 1e3 for k, v in vars(self.time).items()},
                   tokens_per_s=self.tokens_per_s, tokens_per_s_per_device=self.tokens_per_s / self.world_size,
                   model_tflops_per_s_per_device=self.flops_per_iteration / self.time.total / self.world_size / 1e12)
        if self.tokens_per_dollar is not None:
            out["tokens_per_dollar"] = self.tokens_per_dollar
        return out


@dataclass(frozen=True)
class SearchSpace:
    """The values tried for each choice; None: all that make sense for the job (see `candidates`)."""
    tp: tuple | None = None
    pp: tuple | None = None
    virtual_pp: tuple | None = None
    micro_batch_size: tuple | None = None
    recompute: tuple | None = RECOMPUTE_CHOICES
    distributed_optimizer: tuple | None = (False, True)
    sequence_parallel: tuple | None = (False, True)


def device_kind(cluster: Cluster) -> str:
    return "cpu" if cluster.accelerator.name == "cpu" else "cuda"


def dtype_name(args) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidates(args: argparse.Namespace, world_size: int, space: SearchSpace = SearchSpace()) -> list[Layout]:
    """TP and PP sizes that divide the world (DP the rest); for PP > 1 one chunk per stage or any virtual size that
    divides its layers; micro-batches that are powers of two (and the given size) dividing the batch of a DP
    rank; each recompute choice; the distributed optimizer only where DP > 1 and sequence parallelism only
    where TP > 1 (elsewhere they change nothing)."""
    layouts = []
    for tp in space.tp or _divisors(world_size):
        for pp in space.pp or (_divisors(world_size // tp) if world_size % tp == 0 else [1]):
            dp = world_size // (tp * pp) if world_size % (tp * pp) == 0 else 0  # 0: rejected by the checks
            for virtual_pp in _virtual_sizes(args, pp, space):
                for micro in _micro_batch_sizes(args, max(dp, 1), space):
                    for recompute in space.recompute or RECOMPUTE_CHOICES:
                        for dist_opt in space.distributed_optimizer or (False, True) if dp > 1 else (False,):
                            for sp in space.sequence_parallel or (False, True) if tp > 1 else (False,):
                                layouts.append(Layout(tp, pp, dp, virtual_pp, micro, recompute, dist_opt, sp))
    return layouts


def _virtual_sizes(args, pp: int, space: SearchSpace) -> list:
    if space.virtual_pp is not None:
        return [v if v and v > 1 else None for v in space.virtual_pp]
    if pp == 1 or args.num_layers % pp:
        return [None]
    return [None] + [v for v in _divisors(args.num_layers // pp) if v > 1]


def _micro_batch_sizes(args, dp: int, space: SearchSpace) -> list[int]:
    if space.micro_batch_size is not None:
        return list(space.micro_batch_size)
    per_rank = (args.global_batch_size or args.micro_batch_size * dp) // dp
    sizes = {1 << k for k in range(per_rank.bit_length()) if per_rank % (1 << k) == 0}
    return sorted(sizes | {args.micro_batch_size})


def layout_args(args: argparse.Namespace, layout: Layout) -> argparse.Namespace:
    """The training arguments with this layout's choices."""
    out = copy.copy(args)
    out.tensor_model_parallel_size, out.pipeline_model_parallel_size = layout.tp, layout.pp
    out.virtual_pipeline_model_parallel_size, out.num_layers_per_virtual_pipeline_stage = layout.virtual_pp, None
    out.micro_batch_size, out.recompute_granularity = layout.micro_batch_size, layout.recompute
    out.use_distributed_optimizer, out.sequence_parallel = layout.distributed_optimizer, layout.sequence_parallel
    return out


def plan_given_layout(args: argparse.Namespace, cluster: Cluster, vocab_size: int,
                      constants: SpeedConstants | None = None) -> LayoutPlan:
    """The plan of the layout the arguments themselves ask for (pretrain_gpt.py --dry-run)."""
    checked = copy.copy(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    try:
        validate_layout_args(checked, cluster.world_size)  # also derives DP and the virtual pipeline size
    except ArgumentError as error:
        return LayoutPlan(Layout(tp, pp, 0, args.virtual_pipeline_model_parallel_size, args.micro_batch_size,
                                 args.recompute_granularity, args.use_distributed_optimizer, args.sequence_parallel),
                          rejected=str(error))
    layout = Layout(tp, pp, checked.data_parallel_size, checked.virtual_pipeline_model_parallel_size,
                    checked.micro_batch_size, checked.recompute_granularity, checked.use_distributed_optimizer,
                    checked.sequence_parallel)
    return plan_layout(checked, layout, cluster, vocab_size, constants)


def plan_layout(args: argparse.Namespace, layout: Layout, cluster: Cluster, vocab_size: int,
                constants: SpeedConstants | None = None) -> LayoutPlan:
    """Check one layout as pretrain_gpt.py would, and predict its memory per rank and its iteration time."""
    run = layout_args(args, layout)
    world_size = cluster.world_size
    try:
        validate_layout_args(run, world_size)
    except ArgumentError as error:
        return LayoutPlan(layout, rejected=str(error))
    config = transformer_config_from_args(run, vocab_size)
    dims, device = layout.dims, device_kind(cluster)
    m = run.global_batch_size // (run.micro_batch_size * dims.dp)
    dtype_bytes = torch.empty((), dtype=config.params_dtype).element_size()
    stages, work = [], []
    for pp_rank in range(dims.pp):
        state = state_bytes(config, dims, pp_rank, dp_rank=0, distributed_optimizer=run.use_distributed_optimizer)
        chunks = [chunk_activation_bytes(config, dims, pp_rank, c, run.seq_length, run.micro_batch_size, device)
                  for c in range(dims.num_model_chunks)]
        activations = peak_activations(chunks, dims.pp, pp_rank, m)
        counted = state.parameters + state.gradients + state.optimizer + activations.total
        allowance = int(ALLOWANCE_FRACTION * counted) + ALLOWANCE_FIXED[device]
        stages.append(StageMemory(pp_rank, state.parameters, state.gradients, state.optimizer, activations, allowance))
        layers = sum(len(stage_layers(config, dims.pp, pp_rank, dims.virtual_pp, c))
                     for c in range(dims.num_model_chunks))
        work.append(StageWork(layers, pp_rank == 0, pp_rank == dims.pp - 1, state))
    padded_vocab = config.padded_vocab_size(dims.tp)
    time = iteration_time(run, dims, work, cluster, constants or cluster.speed(dtype_name(run)), padded_vocab,
                          dtype_bytes)
    return LayoutPlan(layout, stages=stages, memory_limit=cluster.accelerator.memory_bytes, time=time,
                      global_batch_size=run.global_batch_size, seq_length=run.seq_length, world_size=world_size,
                      flops_per_iteration=num_floating_point_operations(run, padded_vocab),
                      stage_flops=[stage_flops(run, stage, dims.tp, padded_vocab) for stage in work],
                      price_per_device_hour=cluster.price_per_device_hour)


def fix_global_batch(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Megatron's default global batch (micro-batch x DP) differs between layouts; compare them at one batch:
    the given micro-batch on every rank (micro-batch x world size)."""
    if args.global_batch_size is not None:
        return args
    out = copy.copy(args)
    out.global_batch_size = args.micro_batch_size * world_size
    return out


def plan_layouts(args: argparse.Namespace, cluster: Cluster, vocab_size: int, space: SearchSpace = SearchSpace(),
                 constants: SpeedConstants | None = None) -> list[LayoutPlan]:
    """Every candidate layout: those that fit, fastest first; then those that do not fit; then the rejected."""
    args = fix_global_batch(args, cluster.world_size)
    plans = [plan_layout(args, layout, cluster, vocab_size, constants)
             for layout in candidates(args, cluster.world_size, space)]
    return sorted(plans, key=_rank_key)


def _rank_key(plan: LayoutPlan):
    if not plan.valid:
        return (2, 0.0)
    return (0 if plan.fits else 1, -plan.tokens_per_s if plan.fits else plan.peak_memory)


def model_parameters(args: argparse.Namespace, vocab_size: int) -> int:
    """The model's parameter count (padded vocabulary at TP 1), as the training log prints it."""
    return total_parameters(transformer_config_from_args(args, vocab_size), ParallelDims())
