"""Pretrain a GPT with tensor, pipeline and data parallelism: Megatron-LM's pretrain_gpt.py flags.

    torchrun --nproc_per_node 2 pretrain_gpt.py --tp 2          # the demo: default corpus, small model
    torchrun --nproc_per_node 8 pretrain_gpt.py --tp 8 --data-path ... (Megatron flags, see --help)
    python pretrain_gpt.py ... --dry-run                         # check the command line, print the configuration

Bad arguments exit with status 2 and one line per problem saying what to change, before any work starts;
--dry-run prints the resolved configuration and the layout's plan (memory per rank, time per iteration)
and exits. Under an elastic torchrun (--nnodes MIN:MAX, megatronish/training/elastic.py) a world that no
layout fits exits with status 3 after --wait-for-nodes-minutes, and a worker stopped only because other
nodes are leaving exits with status 4, so that its agent restarts it in the new membership.
"""

import os
import sys

import torch.distributed as dist

from megatronish.planner import dry_run
from megatronish.training.arguments import (
    ArgumentError,
    describe_configuration,
    dry_run_world_size,
    parse_args,
    validate_args,
)
from megatronish.training.elastic import EXIT_PEERS_LEFT, resolve_layout_or_wait, restart_expected
from megatronish.training.training import TrainingResult, pretrain


def main(argv=None) -> TrainingResult | None:
    try:
        args = parse_args(argv)
        world_size = dry_run_world_size(args) if args.dry_run else int(os.environ.get("WORLD_SIZE", 1))
        resolve_layout_or_wait(args, world_size)  # elastic launches: this world's layout, or wait for nodes
        warnings = validate_args(args, world_size)
    except ArgumentError as error:
        if int(os.environ.get("RANK", 0)) == 0:
            for line in str(error).splitlines():
                print(f"pretrain_gpt.py: error: {line}", file=sys.stderr)
        sys.exit(2)
    if args.dry_run:
        if int(os.environ.get("RANK", 0)) == 0:
            print(describe_configuration(args, warnings))
            try:
                print(dry_run(args, world_size))
            except (ValueError, OSError) as error:  # the command line is fine; only the plan needs more
                print(f"no plan: {error}")
        return None
    ours = not dist.is_initialized()  # a caller that set torch.distributed up (a test harness) keeps it
    try:
        result = pretrain(args)
    finally:
        if ours and dist.is_initialized():
            dist.destroy_process_group()
    if result.stopped_by_peers and restart_expected():
        print(f"rank {os.environ.get('RANK')}: stopped because other nodes are leaving ({result.exit_reason}); exiting "
              f"with status {EXIT_PEERS_LEFT} so that torchrun restarts this worker in the new membership", flush=True)
        sys.exit(EXIT_PEERS_LEFT)
    return result


if __name__ == "__main__":
    main()
