"""Tokenize JSONL or a Hugging Face dataset into Megatron indexed datasets (.bin/.idx).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 8
    # -> data/my_text_document.bin / .idx   (one pair per --json-keys key)

    python tools/preprocess_data.py --hf-dataset path/or/name --hf-split train ...

Same flags and the same output bytes as Megatron-LM's tools/preprocess_data.py.
"""

import argparse
import sys

from megatronish.data.preprocess import MAX_RECORD_BYTES, TokenizerSpec, preprocess_hf_dataset, preprocess_jsonl
from megatronish.data.tokenizers import TOKENIZER_OPTIONS, TOKENIZER_TYPES, add_tokenizer_options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="JSONL file, one JSON object per line")
    source.add_argument(
        "--hf-dataset",
        help="Hugging Face dataset: hub name, save_to_disk folder, or a local "
        ".jsonl/.json/.parquet/.csv/.arrow/.txt file",
    )
    p.add_argument("--hf-split", default="train", help="split of --hf-dataset (default: train)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file", help="vocab.json (GPT2BPETokenizer)")
    p.add_argument("--merge-file", help="merges.txt (GPT2BPETokenizer)")
    p.add_argument("--tokenizer-model", help="SentencePiece .model, HF tokenizer.json or TikTokenizer's .json")
    add_tokenizer_options(p)
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    p.add_argument(
        "--log-interval", type=int, default=1000, help="documents between progress lines when stderr is not a terminal"
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help=f"skip (or, with --strict, stop at) JSONL lines longer than this; bounds the memory one line "
                        f"can take (default: {MAX_RECORD_BYTES})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = {name: getattr(args, name) for name in TOKENIZER_OPTIONS}
    if options["tokenizer_special_tokens"]:
        options["tokenizer_special_tokens"] = tuple(options["tokenizer_special_tokens"])
    tokenizer = TokenizerSpec(**options)
    common = dict(
        output_prefix=args.output_prefix,
        tokenizer=tokenizer,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        strict=args.strict,
        log_interval=args.log_interval,
    )
    if args.input:
        stats = preprocess_jsonl(args.input, max_record_bytes=args.max_record_bytes, **common)
    else:
        stats = preprocess_hf_dataset(args.hf_dataset, args.hf_split, **common)
    seconds = max(stats.seconds, 1e-9)
    print(
        f"wrote {', '.join(p + '.bin/.idx' for p in stats.outputs)}: {stats.documents:,} documents, "
        f"{stats.tokens:,} tokens in {stats.seconds:.1f} s ({stats.documents / seconds:,.0f} docs/s, "
        f"{stats.tokens / seconds:,.0f} tokens/s); {stats.bad_records} bad record(s) skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
