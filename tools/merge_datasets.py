"""Merge indexed datasets (.bin/.idx) into one, documents in the order given.

    python tools/merge_datasets.py --input data/part0_text_document data/part1_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input-dir data/parts --output-prefix data/all_text_document

All inputs must share one token dtype. --input-dir takes every prefix in the folder, sorted by name.
"""

import argparse
import os
import sys

from megatronish.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="dataset prefixes (without .bin/.idx)")
    source.add_argument("--input-dir", help="merge every <prefix>.idx/.bin pair found in this folder")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    return p.parse_args(argv)


def prefixes_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input-dir {folder} is not a folder")
    prefixes = sorted(os.path.join(folder, n[:-4]) for n in os.listdir(folder) if n.endswith(".idx"))
    if not prefixes:
        raise ValueError(f"--input-dir {folder} holds no .idx files")
    return prefixes


def merge(prefixes: list[str], output_prefix: str) -> None:
    datasets = [IndexedDataset(p) for p in prefixes]  # checks every input before writing anything
    builder = IndexedDatasetBuilder(output_prefix, datasets[0].dtype)
    del datasets
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize()
    except BaseException:
        builder.abort()
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    prefixes = args.input or prefixes_in(args.input_dir)
    merge(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} dataset(s) into {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
