"""The planner's memory per rank against what training measures (MemoryMonitor, item 3 of the planner issue).

Each valid layout the planner lists for a tiny GPT on 4 CPU ranks (and a few more configurations
on 1, 2 and 3 ranks: bf16, selective recompute, dropout, SwiGLU/RMSNorm/untied, the explicit
attention backend, grouped-query attention with its own head dim, DP 3 whose buckets need padding) trains two iterations through pretrain(); on
every rank the parameter, gradient and optimizer bytes equal the prediction exactly, and the peak
bytes saved for backward are within 10% of the predicted activation bytes. So every layout the
planner calls valid also starts.
"""

import pytest

from megatronish.parallel_layout import ParallelDims
from megatronish.planner.activations import chunk_activation_bytes, peak_activations
from megatronish.planner.calibration import cpu_cluster
from megatronish.planner.parameters import state_bytes
from megatronish.planner.search import SearchSpace, plan_layouts
from megatronish.testing import run_distributed
from megatronish.training.arguments import parse_args, transformer_config_from_args, validate_layout_args

VOCAB = 258  # the demo's byte tokenizer
ACTIVATION_TOLERANCE = 0.10

# GPT-2 shapes scaled down: "small" (heads of 16 dims, 4h MLP), "medium" (more heads, longer sequence).
SMALL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
MEDIUM = ["--num-layers", "4", "--hidden-size", "96", "--num-attention-heads", "8", "--seq-length", "64"]
COMMON = ["--global-batch-size", "8", "--micro-batch-size", "2", "--train-iters", "2", "--log-interval", "1",
          "--eval-iters", "0", "--sample-tokens", "0", "--lr-warmup-iters", "0", "--lr-warmup-fraction", "0"]


def _argv(shape, *extra):
    return [*shape, *COMMON, *extra]


def _train(argvs):
    """Train each command line for two iterations here (every rank); this rank's memory measured in the first."""
    from megatronish import parallel_state
    from megatronish.training.training import pretrain

    measured = []
    for argv in argvs:
        args = parse_args(argv)
        args.save = None  # nothing to keep
        try:
            measured.append(pretrain(args).memory)
        finally:
            parallel_state.destroy_model_parallel()
    return measured


def _predicted(argv, world_size, rank):
    """(parameters, gradients, optimizer, activations) bytes the planner predicts for this rank."""
    args = parse_args(argv)
    validate_layout_args(args, world_size)
    config = transformer_config_from_args(args, VOCAB)
    dims = ParallelDims(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size,
                        args.virtual_pipeline_model_parallel_size)
    tp_rank, dp_rank, pp_rank = dims.coordinates(rank)
    state = state_bytes(config, dims, pp_rank, dp_rank, args.use_distributed_optimizer)
    chunks = [chunk_activation_bytes(config, dims, pp_rank, c, args.seq_length, args.micro_batch_size, "cpu", tp_rank)
              for c in range(dims.num_model_chunks)]
    m = args.global_batch_size // (args.micro_batch_size * dims.dp)
    return state.parameters, state.gradients, state.optimizer, peak_activations(chunks, dims.pp, pp_rank, m).total


def _check(argvs, world_size):
    results = run_distributed(_train, world_size, args=(argvs,), timeout=900)
    worst = 0.0
    for rank, measured_runs in enumerate(results):
        for argv, measured in zip(argvs, measured_runs):
            parameters, gradients, optimizer, activations = _predicted(argv, world_size, rank)
            what = f"rank {rank} of {world_size}: {' '.join(argv)}"
            state = (measured.parameters, measured.gradients, measured.optimizer)
            assert state == (parameters, gradients, optimizer), what
            error = activations / measured.activations - 1
            assert abs(error) <= ACTIVATION_TOLERANCE, (
                f"{what}: predicted {activations}, measured {measured.activations}")
            worst = max(worst, abs(error))
    return worst


def test_every_valid_layout_of_four_ranks_starts_and_its_memory_is_predicted():
    args = parse_args(_argv(SMALL, "--hidden-dropout", "0.1"))
    space = SearchSpace(micro_batch_size=(2,), recompute=(None, "full"), sequence_parallel=(True,))
    plans = [p for p in plan_layouts(args, cpu_cluster(4), VOCAB, space) if p.valid]
    assert len(plans) >= 12  # TP 1/2/4 x PP 1/2/4, interleaved, DP with and without the distributed optimizer
    argvs = [_argv(SMALL, "--hidden-dropout", "0.1", *plan.layout.flags()) for plan in plans]
    _check(argvs, 4)


@pytest.mark.parametrize("world_size,configurations", [
    (1, [("bf16, selective recompute", _argv(SMALL, "--bf16", "--recompute-granularity", "selective")),
         ("attention dropout (CPU math path), SwiGLU, RMSNorm, untied", _argv(
             MEDIUM, "--attention-dropout", "0.1", "--swiglu", "--normalization", "RMSNorm",
             "--untie-embeddings-and-output-weights"))]),
    (2, [("TP 2, SP, bf16", _argv(MEDIUM, "--tp", "2", "--sequence-parallel", "--bf16")),
         ("PP 2 interleaved, explicit attention with dropout, rope", _argv(
             SMALL, "--pp", "2", "--virtual-pipeline-model-parallel-size", "2", "--attention-backend", "explicit",
             "--attention-dropout", "0.1", "--position-embedding-type", "rope")),
         ("TP 2, grouped-query attention (4 heads, 2 groups), head dim 24 != h/heads", _argv(
             SMALL, "--tp", "2", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24")),
         ("TP 2, SP, grouped-query attention, head dim 8, rope", _argv(
             SMALL, "--tp", "2", "--sequence-parallel", "--group-query-attention", "--num-query-groups", "2",
             "--kv-channels", "8", "--position-embedding-type", "rope"))]),
    (3, [("DP 3 (buckets padded), distributed optimizer, bf16, full recompute", _argv(
        SMALL, "--use-distributed-optimizer", "--bf16", "--recompute-granularity", "full", "--global-batch-size", "6")),
         ("DP 3, plain optimizer", _argv(MEDIUM, "--global-batch-size", "6"))]),
])
def test_memory_of_other_configurations_is_predicted(world_size, configurations):
    _check([argv for _, argv in configurations], world_size)
