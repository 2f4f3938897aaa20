"""What tools/generate.py and tools/serve.py set up: the process group, the models and the tokenizer.

Models load from the sources the evaluation tools read (a training checkpoint saved at any
layout, a tools/convert_checkpoint.py directory, or a Hugging Face GPT-2 directory), at this
run's TP size, without sequence parallelism (KV-cached decoding does not split sequences).

The tokenizer, first found wins: the flags given; the tokenizer the checkpoint was trained with
(its saved arguments; a file path that no longer exists is looked up beside the checkpoint);
vocab.json + merges.txt (GPT-2 BPE) or tokenizer.json (Hugging Face) beside the checkpoint.
"""

import argparse
import os

import torch.distributed as dist

from megatronish import ops, parallel_state
from megatronish.data.tokenizers import (TOKENIZER_OPTIONS, TOKENIZER_TYPES, Tokenizer, add_tokenizer_options,
                                         build_tokenizer)
from megatronish.evaluation.model_loading import load_model, read_model_config, tokenizer_files_beside
from megatronish.inference.generation import without_sequence_parallel
from megatronish.training.checkpointing import COMMON_FILENAME, TRACKER_FILENAME, read_checkpoint_args


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--load/--hf-model, the draft's, the tokenizer's and --tp: the flags both tools share."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--load", help="megatronish checkpoint directory (training or tools/convert_checkpoint.py)")
    model.add_argument("--hf-model", help="Hugging Face GPT2LMHeadModel directory (save_pretrained)")
    draft = parser.add_mutually_exclusive_group()
    draft.add_argument("--draft-load", help="draft model for speculative decoding (same tokenizer)")
    draft.add_argument("--draft-hf-model", help="draft model as a Hugging Face GPT-2 directory")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                        help="default: the checkpoint's own, else the files beside it")
    parser.add_argument("--vocab-file")
    parser.add_argument("--merge-file")
    parser.add_argument("--tokenizer-model", help="SentencePiece model, tokenizer.json or TikTokenizer's .json")
    add_tokenizer_options(parser)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (launch with torchrun, "
                        "--nproc_per_node = --tp; default 1)")
    parser.add_argument("--distributed-backend", choices=("nccl", "gloo"), help="default: nccl with a GPU, else gloo")


def setup(args) -> tuple:
    """Check the options, start the process group, load -> (model, draft or None, tokenizer). Every rank calls it."""
    config = read_model_config(args.load, args.hf_model)
    config.validate(args.tp)
    if args.draft_load or args.draft_hf_model:
        draft_config = read_model_config(args.draft_load, args.draft_hf_model)
        draft_config.validate(args.tp)
        if draft_config.vocab_size != config.vocab_size:
            raise ValueError(f"the draft's vocabulary has {draft_config.vocab_size} tokens, the model's "
                             f"{config.vocab_size}: the draft must use the model's tokenizer")
    tokenizer = load_tokenizer(args.load, args.hf_model, {flag: getattr(args, flag) for flag in TOKENIZER_OPTIONS})
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"the model's vocabulary has {config.vocab_size} tokens, the tokenizer's "
                         f"{tokenizer.vocab_size}: pass the tokenizer it was trained with (--tokenizer-type ...)")
    if not dist.is_initialized():  # a caller that set torch.distributed up (a test harness) keeps its setup
        parallel_state.initialize_distributed(args.distributed_backend)
    if dist.get_world_size() != args.tp:
        raise ValueError(f"{dist.get_world_size()} ranks for --tp {args.tp}: launch --tp ranks "
                         f"(torchrun --nproc_per_node {args.tp}), one model replica")
    parallel_state.initialize_model_parallel(args.tp)
    ops.initialize_kernels()  # every rank on the same op path
    model = without_sequence_parallel(load_model(args.load, args.hf_model))
    draft = None
    if args.draft_load or args.draft_hf_model:
        draft = without_sequence_parallel(load_model(args.draft_load, args.draft_hf_model))
    return model, draft, tokenizer


def load_tokenizer(load: str | None, hf_model: str | None, given: dict) -> Tokenizer:
    given = {flag: value for flag, value in given.items() if value is not None}
    options = given if "tokenizer_type" in given else {**(_saved_tokenizer_options(load) if load else {}), **given}
    if "tokenizer_type" not in options:
        options = {**_tokenizer_beside(load, hf_model), **given}
    if "tokenizer_type" not in options:
        raise ValueError(f"found no tokenizer for {hf_model or load}: the checkpoint saved none and no vocab.json + "
                         "merges.txt or tokenizer.json lies beside it; pass --tokenizer-type (and its files)")
    if options["tokenizer_type"] == "GPT2BPETokenizer":  # files not given: the ones beside the checkpoint
        options = {**tokenizer_files_beside(load, hf_model), **options}
    return build_tokenizer(**options)


def _tokenizer_beside(load: str | None, hf_model: str | None) -> dict:
    files = tokenizer_files_beside(load, hf_model)
    if len(files) == 2:
        return {"tokenizer_type": "GPT2BPETokenizer", **files}
    tokenizer_json = os.path.join(hf_model or load, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tokenizer_json}
    return {}


def _saved_tokenizer_options(load: str) -> dict:
    """The tokenizer flags of a training checkpoint's saved arguments, paths made to exist if they can."""
    if not any(os.path.isfile(os.path.join(load, name)) for name in (TRACKER_FILENAME, COMMON_FILENAME)):
        return {}
    saved = read_checkpoint_args(load)
    options = {flag: saved.get(flag) for flag in TOKENIZER_OPTIONS if saved.get(flag) is not None}
    if options.get("tokenizer_type") == "GPTSentencePieceTokenizer":  # Megatron's name for the same tokenizer
        options["tokenizer_type"] = "SentencePieceTokenizer"
    for flag in ("vocab_file", "merge_file", "tokenizer_model"):
        path = options.get(flag)
        if path and not os.path.exists(path):
            beside = os.path.join(load, os.path.basename(path))
            if not os.path.exists(beside):
                raise ValueError(f"the checkpoint was trained with --{flag.replace('_', '-')} {path}, which does not "
                                 f"exist here nor beside the checkpoint: pass --{flag.replace('_', '-')} PATH")
            options[flag] = beside
    return options
