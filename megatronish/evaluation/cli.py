"""What tools/eval_wikitext103.py and tools/eval_lambada.py run: flags, setup, evaluation, report.

Every rank runs `run_wikitext(argv)` / `run_lambada(argv)` (under torchrun for TP or DP > 1) and
gets the result; rank 0 prints the one-line summary and writes --output. Bad options and inputs
raise before the model is loaded.
"""

import argparse
import json
import sys

import torch.distributed as dist

from megatronish import ops, parallel_state
from megatronish.data.tokenizers import TOKENIZER_TYPES, add_tokenizer_options, tokenizer_from_args
from megatronish.evaluation.inputs import read_text_rows
from megatronish.evaluation.lambada import evaluate_lambada
from megatronish.evaluation.model_loading import load_model, read_model_config, tokenizer_files_beside
from megatronish.evaluation.wikitext import evaluate_wikitext, wikitext_from_rows
from megatronish.evaluation.windows import check_window_options


def build_parser(description: str, default_hf_config: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--load", help="megatronish checkpoint directory (any TP size it was saved at)")
    model.add_argument("--hf-model", help="Hugging Face GPT2LMHeadModel directory (save_pretrained)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="local input: text / JSON-lines / parquet file, or a save_to_disk folder")
    data.add_argument("--hf-dataset", help="dataset name (or local folder) for datasets.load_dataset")
    p.add_argument("--hf-dataset-config", default=default_hf_config,
                   help=f"configuration of --hf-dataset (default {default_hf_config})")
    p.add_argument("--split", default="test", help="split of a dataset (default test)")
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file", help="default: vocab.json beside the checkpoint")
    p.add_argument("--merge-file", help="default: merges.txt beside the checkpoint")
    p.add_argument("--tokenizer-model", help="SentencePiece model, tokenizer.json or TikTokenizer's .json")
    add_tokenizer_options(p)
    p.add_argument("--seq-length", type=int, help="tokens per window (default: the model's max positions)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--distributed-backend", choices=("nccl", "gloo"), help="default: nccl with a GPU, else gloo")
    p.add_argument("--output", help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _build_tokenizer(args):
    beside = tokenizer_files_beside(args.load, args.hf_model)
    return tokenizer_from_args(args, vocab_file=args.vocab_file or beside.get("vocab_file"),
                               merge_file=args.merge_file or beside.get("merge_file"))


def _check_model_fits(config, tokenizer, seq_length: int, tp: int) -> None:
    if config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the checkpoint's vocabulary has {config.vocab_size} tokens, the tokenizer's "
                         f"{tokenizer.vocab_size}: pass the tokenizer the model was trained with "
                         "(--tokenizer-type, --vocab-file/--merge-file or --tokenizer-model)")
    if seq_length > config.max_position_embeddings:
        raise ValueError(f"--seq-length {seq_length} is larger than the model's max_position_embeddings "
                         f"{config.max_position_embeddings}: use --seq-length {config.max_position_embeddings} "
                         "or less")
    config.validate_sequence_length(seq_length, tp)
    config.validate(tp)


def _setup(args, rows_jsonl: bool, check_seq_length=None):
    """Inputs, tokenizer and model, every check first; returns (rows, tokenizer, model, seq_length)."""
    if args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    rows = read_text_rows(args.data, args.hf_dataset, args.hf_dataset_config, args.split, jsonl=rows_jsonl)
    tokenizer = _build_tokenizer(args)
    config = read_model_config(args.load, args.hf_model)
    seq_length = args.seq_length or config.max_position_embeddings
    if check_seq_length is not None:
        check_seq_length(seq_length)
    _check_model_fits(config, tokenizer, seq_length, args.tp)
    if not dist.is_initialized():  # a caller that set torch.distributed up (a test harness) keeps its setup
        parallel_state.initialize_distributed(args.distributed_backend)
    parallel_state.initialize_model_parallel(args.tp)
    ops.initialize_kernels()  # every rank on the same op path
    return rows, tokenizer, load_model(args.load, args.hf_model), seq_length


def _report(result, output: str | None) -> None:
    if dist.get_rank() != 0:
        return
    print(result.summary(), flush=True)
    if output:
        with open(output, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
            f.write("\n")


def run_wikitext(argv=None, description: str = "WikiText-103 perplexity"):
    p = build_parser(description, default_hf_config="wikitext-103-raw-v1")
    p.add_argument("--overlapping-eval", type=int, default=32,
                   help="stride between windows, in tokens; each later window scores its last stride targets")
    args = p.parse_args(argv)
    rows, tokenizer, model, seq_length = _setup(
        args, rows_jsonl=False, check_seq_length=lambda length: check_window_options(length, args.overlapping_eval))
    result = evaluate_wikitext(model, tokenizer, wikitext_from_rows(rows), seq_length, args.overlapping_eval,
                               args.micro_batch_size, show_progress=not args.no_progress)
    _report(result, args.output)
    return result


def run_lambada(argv=None, description: str = "LAMBADA last-word accuracy"):
    args = build_parser(description, default_hf_config=None).parse_args(argv)
    rows, tokenizer, model, seq_length = _setup(args, rows_jsonl=True)
    result = evaluate_lambada(model, tokenizer, rows, seq_length, args.micro_batch_size,
                              show_progress=not args.no_progress)
    _report(result, args.output)
    return result


def tool_main(run, argv, prog: str, description: str) -> int:
    """A tool's main(): run it, turn bad input into one `error:` line and exit status 2.

    A process group that the caller started (a test harness) is left alone; one that the run
    started is destroyed at the end.
    """
    started_here = not dist.is_initialized()
    try:
        run(argv, description=description)
    except (ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()
    return 0
