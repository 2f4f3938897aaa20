"""Pretrain a GPT with tensor and data parallelism: Megatron-LM's pretrain_gpt.py flags.

    torchrun --nproc_per_node 2 pretrain_gpt.py --tp 2          # the demo: default corpus, small model
    torchrun --nproc_per_node 8 pretrain_gpt.py --tp 8 --data-path ... (Megatron flags, see --help)

Bad arguments exit with status 2 and one line saying what to change, before any work starts;
--dry-run prints the layout's plan (memory per rank, time per iteration) and exits.
"""

import os
import sys

import torch.distributed as dist

from megatronish.planner import dry_run
from megatronish.training.arguments import ArgumentError, parse_args, validate_args
from megatronish.training.training import pretrain


def main(argv=None) -> None:
    try:
        args = parse_args(argv)
        validate_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    except ArgumentError as error:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"pretrain_gpt.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if args.dry_run:
        if int(os.environ.get("RANK", 0)) == 0:
            print(dry_run(args, int(os.environ.get("WORLD_SIZE", 1))))
        return
    try:
        pretrain(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
