"""The embedded default corpus: Python's own standard library, read from the running interpreter.

Every machine that runs megatronish has it, offline, and the repository ships none of its text.
The .py files under the interpreter's stdlib folder (site-packages and test folders left out)
are taken in sorted path order, up to `max_bytes`, one document per file with EOD appended,
tokenized with the file-free ByteTokenizer (token = byte, so the file bytes are the token ids).
The dataset is built once into the cache (`$MEGATRONISH_CACHE` or ~/.cache/megatronish) under
a name that hashes the file list, so another interpreter gets its own copy. Concurrent callers
(several ranks of a node) serialize on a file lock; the files are published by atomic rename.
"""

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from megatronish.cache import cache_root, file_lock
from megatronish.data.indexed_dataset import IndexedDatasetBuilder, dataset_exists, optimal_dtype
from megatronish.data.tokenizers import ByteTokenizer

DEFAULT_MAX_BYTES = 20 << 20
TOKENIZER_TYPE = "ByteTokenizer"
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FORMAT_VERSION = 1


def stdlib_source_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """The standard library's .py files in sorted order, as many as fit in `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED_FOLDERS]  # prune: site-packages is huge
        files += [Path(folder, n) for n in names if n.endswith(".py") and os.path.isfile(os.path.join(folder, n))]
    files.sort()
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    if not chosen:
        raise RuntimeError(f"found no standard-library .py files under {root} for the default corpus")
    return chosen


def default_corpus_prefix(cache_dir=None, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Build the default corpus once (cached) and return its indexed-dataset prefix.

    Train on it with tokenizer type "ByteTokenizer" (vocab_size 258, eod 256).
    """
    files = stdlib_source_files(max_bytes)
    listing = "\n".join(f"{p}\t{p.stat().st_size}" for p in files)
    key = hashlib.sha256(f"{_FORMAT_VERSION}\n{listing}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir else cache_root() / "default-corpus"
    prefix = str(folder / f"stdlib-{key}_text_document")
    if dataset_exists(prefix):
        return prefix
    with file_lock(prefix + ".lock"):
        if not dataset_exists(prefix):  # another process may have built it while we waited
            _build(prefix, files)
    return prefix


def _build(prefix: str, files: list[Path]) -> None:
    eod = ByteTokenizer().eod
    builder = IndexedDatasetBuilder(prefix, optimal_dtype(ByteTokenizer().vocab_size))
    try:
        for path in files:
            data = path.read_bytes()
            if data:
                builder.add_document(np.append(np.frombuffer(data, dtype=np.uint8).astype(np.uint16), eod))
            else:
                builder.add_document([])
        builder.finalize()
    except BaseException:
        builder.abort()
        raise
