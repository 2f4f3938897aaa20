"""The largest token id of a dataset, read in bounded chunks and cached (what training checks
against the tokenizer's vocabulary: tests/training/test_training.py)."""

import numpy as np

from megatronish.data import token_range
from megatronish.data.indexed_dataset import IndexedDatasetBuilder


def write_dataset_with_largest_id(tmp_path, largest: int) -> str:
    prefix = str(tmp_path / f"max{largest}_text_document")
    builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(40):
        builder.add_document(np.append(rng.integers(0, 200, size=30), 256))
    builder.add_document(np.array([5, largest, 256]))
    builder.finalize()
    return prefix


def test_the_largest_id_is_found_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRONISH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(token_range, "CHUNK_TOKENS", 64)  # several chunks
    prefix = write_dataset_with_largest_id(tmp_path, 50256)
    assert token_range.max_token_id(prefix) == 50256
    monkeypatch.setattr(token_range, "IndexedDataset", None)  # a second call must not read the data
    assert token_range.max_token_id(prefix) == 50256
