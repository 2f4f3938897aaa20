"""Train a tokenizer on text files (one document or sentence per line works best).

    python tools/train_tokenizer.py --type sentencepiece --input a.txt b.txt --vocab-size 32000 \\
        --output-prefix tok/sp          # -> tok/sp.model   (--tokenizer-type SentencePieceTokenizer)
    python tools/train_tokenizer.py --type byte-level-bpe --input a.txt --vocab-size 32000 \\
        --output-dir tok/bpe            # -> vocab.json, merges.txt (GPT2BPETokenizer), tokenizer.json
"""

import argparse
import sys

from megatronish.data.tokenizer_training import train_byte_level_bpe, train_sentencepiece


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", required=True, choices=["sentencepiece", "byte-level-bpe"])
    p.add_argument("--input", nargs="+", required=True, help="text files to train on")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-prefix", help="sentencepiece: writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--output-dir", help="byte-level-bpe: folder for vocab.json, merges.txt, tokenizer.json")
    args = p.parse_args(argv)
    if args.type == "sentencepiece" and not args.output_prefix:
        p.error("--type sentencepiece needs --output-prefix")
    if args.type == "byte-level-bpe" and not args.output_dir:
        p.error("--type byte-level-bpe needs --output-dir")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.type == "sentencepiece":
        print(f"wrote {train_sentencepiece(args.input, args.output_prefix, args.vocab_size)}")
    else:
        written = train_byte_level_bpe(args.input, args.output_dir, args.vocab_size)
        print("wrote " + ", ".join(written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
