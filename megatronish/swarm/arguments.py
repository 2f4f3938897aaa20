"""Command-line arguments of the SWARM tools: pretrain_gpt.py's flags plus a "SWARM" group.

Peers and trainers take the model, optimizer, schedule and data flags of pretrain_gpt.py, with
their meaning there (--pipeline-model-parallel-size is the number of stages), so a run moves
between the two entry points through a checkpoint with the same command-line flags.
"""

import argparse

from megatronish.training.arguments import ArgumentError, parse_args, validate_args

COMPRESSIONS = ("none", "blockwise8")
ROLES = ("peer", "trainer")


def add_swarm_args(parser: argparse.ArgumentParser, role: str) -> argparse.ArgumentParser:
    if role not in ROLES:
        raise ValueError(f"unknown SWARM role {role!r}: use one of {ROLES}")
    parser.prog = f"swarm_{role}.py"
    g = parser.add_argument_group("SWARM")
    g.add_argument("--initial-peers", nargs="*", default=[],
                   help="multiaddrs of any live member of the swarm (tools/swarm_dht.py prints one); "
                        "none: wait to be found")
    g.add_argument("--run-id", default="megatronish-swarm", help="names this run's records in the DHT")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=0, help="TCP port to listen on (default: any free one)")
    g.add_argument("--announce-host", help="the address other machines reach this one at (default: --host)")
    g.add_argument("--call-timeout", type=float, default=30.0,
                   help="seconds any call to another peer may take before it is given up and rerouted")
    g.add_argument("--update-period", type=float, default=1.0,
                   help="seconds between announcements in the DHT and refreshes of the peer table")
    if role == "peer":
        g.add_argument("--stage", default="auto",
                       help="the pipeline stage to serve, or 'auto': the one with the least throughput")
        g.add_argument("--throttle", type=float, default=1.0,
                       help="run this many times slower (sleeps after each computation; tests and benchmarks)")
        g.add_argument("--keep-forwards", type=int, default=4,
                       help="autograd graphs of the newest forwards kept, so that their backward on this peer skips "
                            "recomputing them (0: always recompute)")
        g.add_argument("--rebalance-period", type=float, default=30.0,
                       help="seconds between checks whether this peer should move to a slower stage (0: never)")
        g.add_argument("--rebalance-gain", type=float, default=0.2,
                       help="move only when the slowest stage's throughput would grow by more than this fraction")
    else:
        g.add_argument("--num-trainers", type=int, default=1, help="trainers in the run (each takes its share of "
                       "the training steps: step t belongs to trainer t mod N)")
        g.add_argument("--trainer-index", type=int, default=0, help="this trainer's index in 0..N-1")
        g.add_argument("--max-inflight", type=int, help="micro-batches in flight at once (default: 2 x stages)")
        g.add_argument("--max-staleness", type=int, default=1,
                       help="steps this trainer may start before the previous ones are applied by every stage")
        g.add_argument("--compression", choices=COMPRESSIONS, default="none",
                       help="8-bit blockwise quantization (int8, one scale per 4096 values) of the activations "
                            "and gradients this trainer's micro-batches send between stages, and of the gradient "
                            "parts the peers of a stage exchange to commit its steps")
        g.add_argument("--ban-time", type=float, default=30.0,
                       help="seconds a peer that failed a call is left out of the wiring")
    return parser


def parse_swarm_args(role: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check a SWARM tool's arguments; raises ArgumentError with one line."""
    args = parse_args(argv, extra_args_provider=lambda parser: add_swarm_args(parser, role))
    args.swarm_role = role
    validate_swarm_args(args)
    return args


def validate_swarm_args(args: argparse.Namespace) -> None:
    def fail(message):
        raise ArgumentError(message)

    if args.tensor_model_parallel_size != 1:
        fail(f"--tensor-model-parallel-size {args.tensor_model_parallel_size}: a SWARM peer holds its stage in one "
             "process; use --tp 1 (and more peers per stage)")
    if args.virtual_pipeline_model_parallel_size or args.num_layers_per_virtual_pipeline_stage:
        fail("virtual pipeline stages do not apply to SWARM (each peer serves one stage): drop "
             "--virtual-pipeline-model-parallel-size / --num-layers-per-virtual-pipeline-stage")
    if args.fp16:
        fail("--fp16 needs a loss scale that every stage agrees on; SWARM runs fp32 or --bf16")
    validate_args(args, world_size=args.pipeline_model_parallel_size)
    if args.call_timeout <= 0 or args.update_period <= 0:
        fail(f"--call-timeout ({args.call_timeout}) and --update-period ({args.update_period}) must be positive")
    if args.swarm_role == "peer":
        if args.stage != "auto" and not (args.stage.isdigit() and int(args.stage) < args.pipeline_model_parallel_size):
            fail(f"--stage {args.stage!r} must be 'auto' or a stage in 0..{args.pipeline_model_parallel_size - 1} "
                 "(--pipeline-model-parallel-size is the number of stages)")
        if args.throttle < 1 or args.rebalance_period < 0:
            fail(f"--throttle ({args.throttle}) must be >= 1 and --rebalance-period ({args.rebalance_period}) >= 0")
    else:
        if not 0 <= args.trainer_index < args.num_trainers:
            fail(f"--trainer-index {args.trainer_index} must be in 0..{args.num_trainers - 1} (--num-trainers "
                 f"{args.num_trainers})")
        if args.max_inflight is None:
            args.max_inflight = 2 * args.pipeline_model_parallel_size
        if args.max_inflight < 1 or args.max_staleness < 0:
            fail(f"--max-inflight ({args.max_inflight}) must be >= 1 and --max-staleness ({args.max_staleness}) >= 0")
