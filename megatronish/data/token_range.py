"""Checking that a dataset's token ids fit the tokenizer before training on it.

Data tokenized with another tokenizer (GPT-2 BPE data with --tokenizer-type ByteTokenizer) has
ids at or above the vocabulary size. At TP=1 the embedding fails with a bare IndexError; at TP>1
the ids land in the vocabulary padding and the run trains on garbage with exit 0. The largest id
of a .bin takes one pass over it, so it is cached per file (keyed by path, size and mtime).
"""

import hashlib
import json
import os

import numpy as np

from megatronish.cache import cache_root, file_lock
from megatronish.data.indexed_dataset import IndexedDataset, bin_path

CHUNK_TOKENS = 1 << 26  # 64 Mi tokens per read: bounded memory on any dataset size


def max_token_id(prefix: str) -> int:
    """The largest token id in `prefix`.bin (-1 when it holds no tokens), cached."""
    stat = os.stat(bin_path(prefix))
    key = hashlib.sha256(f"{os.path.realpath(bin_path(prefix))}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    path = cache_root() / "max-token-id" / f"{key.hexdigest()[:32]}.json"
    with file_lock(str(path) + ".lock"):
        if path.exists():
            return json.loads(path.read_text())["max_token_id"]
        tokens = IndexedDataset(prefix).tokens
        largest = max((int(tokens[i:i + CHUNK_TOKENS].max()) for i in range(0, len(tokens), CHUNK_TOKENS)),
                      default=-1)
        path.write_text(json.dumps({"max_token_id": largest, "bin": bin_path(prefix)}))
    return largest


def check_token_ids(prefixes: list[str], vocab_size: int, tokenizer_name: str) -> None:
    """Raise ValueError naming the dataset, its largest id and the vocabulary size when ids do not fit."""
    for prefix in prefixes:
        largest = max_token_id(prefix)
        if largest >= vocab_size:
            raise ValueError(f"--data-path {prefix} holds token id {largest}, but --tokenizer-type {tokenizer_name} "
                             f"has a vocabulary of {vocab_size} (ids 0-{vocab_size - 1}): the data was tokenized with "
                             "another tokenizer; give the one it was preprocessed with")
