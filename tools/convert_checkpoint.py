"""Convert GPT checkpoints between Hugging Face transformers, megatronish, training and Megatron-LM checkpoints.

    python tools/convert_checkpoint.py --input-format hf --input gpt2-dir \\
        --output-format megatronish --output ckpt-dir --tp 2
    python tools/convert_checkpoint.py --input-format megatronish --input ckpt-dir \\
        --output-format hf --output gpt2-out
    python tools/convert_checkpoint.py --input-format training --input checkpoints/run1 \\
        --output-format hf --output gpt2-out
    python tools/convert_checkpoint.py --input-format megatron --input megatron-ckpt \\
        --output-format training --output checkpoints/from-megatron
    python tools/convert_checkpoint.py --input-format training --input checkpoints/run1 \\
        --output-format megatron --output megatron-ckpt --tp 8

A Hugging Face directory is what GPT2LMHeadModel.save_pretrained writes (config.json and the
weights); the output loads with GPT2LMHeadModel.from_pretrained. A megatronish directory holds
config.json (TransformerConfig) and model.pt (full, unsharded weights without vocabulary
padding), which GPTModel loads at any TP size: --tp checks that the model splits at that size.
A training directory is what pretrain_gpt.py --save writes (latest_checkpointed_iteration.txt
and iter_XXXXXXX/ folders; the newest one is read, or give an iter_XXXXXXX folder itself). Its
format does not depend on the layout it was saved at, so there is nothing to re-shard offline:
written as a training checkpoint (weights only, from any input, a training one included), the
output loads at any --tp with --finetune or --no-load-optim (pretrain_gpt.py) and in the
evaluation tools; --tp checks that the model splits at that size.
A megatron directory is what Megatron-LM's save_checkpoint writes: read in --ckpt-format torch_dist
(megatron-core 0.18 and 0.19 layouts) or the legacy per-rank torch format, written in torch_dist
with Megatron's key names and layouts (common.pt, as megatron-core 0.18 writes it; 0.19 reads it),
its vocabulary padded for --tp, and args saying that it holds weights only (no_save_optim, no_save_rng), so
that Megatron-LM's load_checkpoint loads it as it is and starts the optimizer and RNG fresh; the iteration and
consumed samples of a training or Megatron input are kept (--finetune in Megatron-LM starts at 0). Megatron's
args do not record the real vocabulary size: it is
--vocab-size, else the size of the vocab.json the args name, else the padded size.
Tokenizer files of the input (vocab.json, merges.txt, ...) are copied to the output.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from megatronish import parallel_state
from megatronish.model import GPTModel
from megatronish.model.full_state import load_full_checkpoint, load_full_state_dict, save_full_checkpoint
from megatronish.model.hf_gpt2 import load_hf_gpt2, save_hf_gpt2
from megatronish.training import megatron_checkpoint
from megatronish.training.checkpointing import read_full_model_state, save_model_only

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FORMATS = ("hf", "megatronish", "training", "megatron")
CONSUMED = ("consumed_train_samples", "consumed_valid_samples")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-format", required=True, choices=FORMATS)
    p.add_argument("--input", required=True, type=Path, help="checkpoint directory to read")
    p.add_argument("--output-format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, type=Path, help="directory to write (created if missing)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the model must split into (default 1); "
                   "for --output-format megatron also the size its vocabulary is padded for")
    p.add_argument("--vocab-size", type=int, help="--input-format megatron: the real vocabulary size")
    args = p.parse_args(argv)
    if args.input_format == args.output_format not in ("training", "megatron"):
        p.error(f"--input-format and --output-format are both {args.input_format!r}: nothing to convert")
    if not args.input.is_dir():
        p.error(f"--input {args.input} is not a directory")
    return args


def convert(input_format: str, input_dir: Path, output_format: str, output_dir: Path, tp: int = 1,
            vocab_size: int | None = None) -> None:
    iteration, consumed = 0, {}  # consumed: the samples a training or Megatron input records, for Megatron's args
    if input_format == "hf":
        config, state = load_hf_gpt2(input_dir)
    elif input_format == "megatron":
        checkpoint = megatron_checkpoint.read(str(input_dir))
        vocab_size = vocab_size or megatron_checkpoint.checkpoint_vocab_size(checkpoint.args)
        config = megatron_checkpoint.transformer_config(checkpoint.args, vocab_size)
        state, iteration = megatron_checkpoint.model_state(checkpoint, vocab_size), checkpoint.iteration
        consumed = {name: getattr(checkpoint.args, name) for name in CONSUMED if hasattr(checkpoint.args, name)}
    elif input_format == "training":
        config, state, saved = read_full_model_state(str(input_dir))
        iteration = saved["iteration"]
        consumed = {name: saved["progress"][name] for name in CONSUMED}
    else:
        config, state = load_full_checkpoint(input_dir)
    config.validate(tp)
    if output_format == "hf":
        save_hf_gpt2(output_dir, config, state)
    elif output_format == "training":
        save_training_checkpoint(output_dir, config, state, iteration)
    elif output_format == "megatron":
        args = megatron_checkpoint.megatron_args(config, tp=tp, iteration=iteration, extra=consumed)
        megatron_checkpoint.save_torch_dist(str(output_dir), config, state, iteration=iteration, args=args)
    else:
        save_full_checkpoint(output_dir, config, state)
    for name in TOKENIZER_FILES:
        if (input_dir / name).is_file():
            shutil.copyfile(input_dir / name, output_dir / name)


def save_training_checkpoint(output_dir: Path, config, state: dict, iteration: int) -> None:
    """Weights-only training checkpoint, written by this one process (a world of one, no network)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1)
        model = GPTModel(config)
        load_full_state_dict(model, state)
        save_model_only(str(output_dir), model, iteration)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    convert(args.input_format, args.input, args.output_format, args.output, args.tp, args.vocab_size)
    print(f"wrote {args.output_format} checkpoint to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
