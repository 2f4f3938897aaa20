"""Time of one training iteration of a layout, from FLOPs, bytes and the constants of a machine.

Per pipeline stage r, for its m micro-batches (each of n = s b tokens):
  compute      the training log's model FLOPs (megatronish/training/training_log.py) of the stage's
               layers, and of the output layer on the last stage, / t, at the achievable FLOP/s; selective
               recompute adds the attention core's forward (4 s h per token and layer), which the
               model FLOPs leave out (full recompute's extra forward is in them);
  TP           per layer and micro-batch 2 all-reduces forward and 2 backward of n h values (under
               sequence parallelism 2 all-gathers + 2 reduce-scatters each way, the same bytes in twice
               the messages), 2 more all-reduces when full recompute reruns the forward; the
               embedding's all-reduce (first stage) and the output layer's input gradient (last);
               a ring moves 2 (t - 1) / t of the bytes through each link, plus a latency per message;
  overhead     host-side dispatch per layer and micro-batch (matters on CPU, 0 on GPUs by default).
The slowest stage sets the pace: the schedule runs m + (p - 1) / v of its per-micro-batch times
(Narayanan et al. 2021: the 1F1B bubble (p - 1) / m, interleaved (p - 1) / (v m)), plus the
pipeline transfers on the critical path, 2 (v m + p - 1) messages of n h / (t if SP) values.
After the last backward: the DP gradient reduction of the stage's fp32 buffer (all-reduce; with
the distributed optimizer a reduce-scatter, and an all-gather of the parameters after the step),
of which --overlap-grad-reduce hides up to one micro-batch's backward; the tied embeddings'
all-reduce between the first and the last stage; and the Adam step over this rank's main elements.
TP traffic uses the intra-node link when a TP group fits in a node, DP and pipeline traffic
likewise for their groups (ranks are ordered TP, then DP, then PP, as Megatron). CPU ranks beyond
a node's cores share them: the iteration lasts at least the node's CPU work over its cores (the
schedule's waiting, bubble and communication, lets the other ranks run); and each blocking
message (every collective or transfer the model charges a latency for) then also waits for a
core: the rank sleeps in it, and once its partner's data arrives it is runnable behind the ranks
that hold the cores. That costs `scheduling_wait_s` per message and per extra rank per core
((ranks - cores) / cores: the ranks ahead of it on its core; measured at 2 ranks per core), on
top of the rest: while ranks wait for each other the cores are not all doing work.
"""

import dataclasses
from dataclasses import dataclass

from megatronish.planner.cluster import Cluster, SpeedConstants
from megatronish.planner.parameters import StateBytes
from megatronish.parallel_layout import ParallelDims
from megatronish.training.training_log import flops_per_token


@dataclass(frozen=True)
class StageWork:
    """What one pipeline stage (one of its TP x DP ranks) does in an iteration."""
    layers: int               # transformer layers, all model chunks
    embedding: bool           # holds the input embedding (first stage)
    output_layer: bool        # holds the output layer and the loss (last stage)
    state: StateBytes


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds per iteration, by cause (on the slowest stage)."""
    compute: float
    tensor_parallel: float
    overhead: float
    pipeline_bubble: float
    pipeline_transfers: float
    data_parallel: float       # the exposed part
    optimizer: float
    core_sharing: float = 0.0     # CPU ranks waiting for a core
    scheduling_wait: float = 0.0  # CPU ranks beyond the cores: blocking messages waiting for a core

    @property
    def total(self) -> float:
        return (self.compute + self.tensor_parallel + self.overhead + self.pipeline_bubble + self.pipeline_transfers
                + self.data_parallel + self.optimizer + self.core_sharing + self.scheduling_wait)


def _ring(volume: float, ranks: int, messages: int, bandwidth: float, latency: float) -> float:
    """One collective pattern: `messages` messages whose bytes add up to `volume`, ring over `ranks`."""
    return messages * latency + volume * (ranks - 1) / ranks / bandwidth


def _intra_node(span: int, cluster: Cluster) -> bool:
    """Whether a group whose ranks lie within `span` consecutive global ranks stays in one node."""
    return span <= cluster.devices_per_node


def stage_flops(args, stage: StageWork, tp: int, padded_vocab_size: int) -> float:
    """Model FLOPs of one rank of a stage per iteration: its share of the training log's count. Summed over the
    ranks of every stage it gives num_floating_point_operations(args, padded_vocab_size)."""
    layer_flops, output_flops = flops_per_token(args, padded_vocab_size)
    tokens = args.global_batch_size * args.seq_length / args.data_parallel_size  # this DP replica's
    per_token = stage.layers * layer_flops / args.num_layers + (output_flops if stage.output_layer else 0.0)
    return tokens * per_token / tp


def iteration_time(args, dims: ParallelDims, stages: list[StageWork], cluster: Cluster, constants: SpeedConstants,
                   padded_vocab_size: int, dtype_bytes: int) -> TimeEstimate:
    """The time model above for one layout (`args`: its validated training arguments)."""
    t, p, d, v = dims.tp, dims.pp, dims.dp, dims.num_model_chunks
    m = args.global_batch_size // (args.micro_batch_size * d)
    n = args.seq_length * args.micro_batch_size
    bandwidth = {True: constants.intra_node_bytes_per_s, False: constants.inter_node_bytes_per_s}
    tp_bandwidth = bandwidth[_intra_node(t, cluster)]
    per_stage = []
    for stage in stages:
        flops = stage_flops(args, stage, t, padded_vocab_size)
        if args.recompute_granularity == "selective":  # the attention scores and context once more (not model FLOPs)
            flops += m * n * stage.layers * 4 * args.seq_length * args.hidden_size / t
        compute = flops / constants.flops_per_s
        tp_time, tp_messages = 0.0, 0
        if t > 1:
            activation = n * args.hidden_size * dtype_bytes
            reductions = stage.layers * (6 if args.recompute_granularity == "full" else 4)
            reductions += stage.embedding + stage.output_layer
            messages = reductions * (2 if args.sequence_parallel else 1) + 3 * stage.output_layer  # + the loss's
            tp_time = m * _ring(2 * reductions * activation, t, messages, tp_bandwidth, constants.latency_s)
            tp_messages = m * messages
        overhead = m * stage.layers * constants.overhead_s_per_layer_microbatch
        per_stage.append((compute, tp_time, overhead, tp_messages))
    slowest = max(range(len(stages)), key=lambda i: sum(per_stage[i][:3]))
    compute, tp_time, overhead, messages = per_stage[slowest]
    busy = compute + tp_time + overhead
    bubble = busy * (p - 1) / (v * m)

    transfers = 0.0
    if p > 1:
        rows = n // t if args.sequence_parallel else n
        message = rows * args.hidden_size * dtype_bytes
        pp_bandwidth = bandwidth[_intra_node(t * d * 2, cluster)]
        transfers = 2 * (v * m + p - 1) * (constants.latency_s + message / pp_bandwidth)
        messages += 2 * (v * m + p - 1)

    dp_time, dp_messages = max(_data_parallel_time(args, stage, d, bandwidth[_intra_node(t * d, cluster)], constants,
                                                   busy / m) for stage in stages)
    messages += dp_messages
    if p > 1 and not args.untie_embeddings_and_output_weights:  # tied embeddings: first + last stage sum gradients
        embedding_bytes = padded_vocab_size // t * args.hidden_size * 4
        dp_time += _ring(2 * embedding_bytes, 2, 1, bandwidth[_intra_node(dims.world_size, cluster)],
                         constants.latency_s)
        messages += 1
    optimizer = max(stage.state.main_elements for stage in stages) * constants.optimizer_s_per_element
    optimizer += 2 * constants.latency_s  # the gradient norm's all-reduces
    messages += 2
    estimate = TimeEstimate(compute, tp_time, overhead, bubble, transfers, dp_time, optimizer)
    extra_ranks_per_core = _extra_ranks_per_core(dims, cluster)
    return dataclasses.replace(estimate, core_sharing=_core_sharing(estimate, extra_ranks_per_core),
                               scheduling_wait=messages * extra_ranks_per_core * constants.scheduling_wait_s)


def _extra_ranks_per_core(dims: ParallelDims, cluster: Cluster) -> float:
    """(ranks - cores) / cores of a node of CPU ranks that outnumber its cores; else 0 (GPUs: cores_per_node None)."""
    ranks_per_node = min(cluster.devices_per_node, dims.world_size)
    if not cluster.cores_per_node or ranks_per_node <= cluster.cores_per_node:
        return 0.0
    return ranks_per_node / cluster.cores_per_node - 1


def _core_sharing(estimate: TimeEstimate, extra_ranks_per_core: float) -> float:
    """CPU ranks beyond a node's cores take turns on them: the iteration lasts at least the node's CPU work
    (each rank's compute, overhead and optimizer step) over its cores. Waiting in the schedule (the bubble,
    communication) is no CPU work: another rank runs meanwhile, so what exceeds the schedule's time is added."""
    work = estimate.compute + estimate.overhead + estimate.optimizer
    return max(0.0, work * (1 + extra_ranks_per_core) - estimate.total) if extra_ranks_per_core else 0.0


def _data_parallel_time(args, stage: StageWork, d: int, bandwidth: float, constants: SpeedConstants,
                        microbatch_time: float) -> tuple[float, int]:
    """Exposed seconds of a stage's DP gradient reduction (and the distributed optimizer's all-gather), and the
    number of its collectives."""
    if d == 1:
        return 0.0, 0
    buckets, gradients = stage.state.buckets, stage.state.gradients
    if args.use_distributed_optimizer:
        reduce = _ring(gradients, d, buckets, bandwidth, constants.latency_s)
        gather = _ring(stage.state.parameters, d, buckets, bandwidth, constants.latency_s)
    else:
        reduce, gather = _ring(2 * gradients, d, buckets, bandwidth, constants.latency_s), 0.0
    if args.overlap_grad_reduce:  # hidden behind the last micro-batch's backward (2/3 of its compute, 3/4 recomputing)
        backward = microbatch_time * (0.75 if args.recompute_granularity == "full" else 2 / 3)
        reduce = max(0.0, reduce - backward)
    if args.overlap_param_gather:  # hidden behind the next iteration's first forward (1/3 of its compute, 1/4 recomputing)
        forward = microbatch_time * (0.25 if args.recompute_granularity == "full" else 1 / 3)
        gather = max(0.0, gather - forward)
    return reduce + gather, buckets * (2 if args.use_distributed_optimizer else 1)
