"""Megatron's own TikTokenizer on given texts: ids, sizes, special ids and detokenized text, as one JSON line.

    MEGATRON_PYTHON tests/data/megatron_tiktoken_ids.py TEXTS.json --tokenizer-type TikTokenizer \\
        --tokenizer-model vocab.json [--tiktoken-pattern v1|v2] [--vocab-size N] [--tiktoken-num-special-tokens N] \\
        [--tokenizer-special-tokens TOKEN ...]

Run by a Python with megatron-core 0.19.2 and tiktoken (tests/data/test_tiktokenizer.py compares the line with
megatronish's TikTokenizer built from the same flags). The flags are read by Megatron-LM's own tokenizer
argument group and the tokenizer is built by megatron-core's build_tokenizer, as pretrain_gpt.py and
tools/preprocess_data.py build it.
"""

import argparse
import json
import sys


def main(argv: list[str]) -> None:
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import _add_tokenizer_args

    with open(argv[0], encoding="utf-8") as f:
        texts = json.load(f)
    parser = argparse.ArgumentParser()
    _add_tokenizer_args(parser)
    args = parser.parse_args(argv[1:])
    args.pad_vocab_size = False  # only the tokenizer: no model to pad the vocabulary for
    tokenizer = build_tokenizer(args)
    ids = [[int(i) for i in tokenizer.tokenize(text)] for text in texts]
    print(json.dumps({"ids": ids, "detokenized": [tokenizer.detokenize(seq) for seq in ids],
                      "vocab_size": tokenizer.vocab_size, "bos": tokenizer.bos, "eod": tokenizer.eod,
                      "pad": tokenizer.pad}))


if __name__ == "__main__":
    main(sys.argv[1:])
