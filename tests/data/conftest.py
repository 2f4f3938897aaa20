import json
from pathlib import Path

import numpy as np
import pytest

from megatronish.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Nothing a test builds lands in the user's ~/.cache."""
    monkeypatch.setenv("MEGATRONISH_CACHE", str(tmp_path / "megatronish-cache"))


@pytest.fixture(scope="session")
def expected():
    with open(FIXTURES / "expected.json") as f:
        return json.load(f)


def gpt2_files() -> dict:
    return {"vocab_file": str(FIXTURES / "vocab.json"), "merge_file": str(FIXTURES / "merges.txt")}


def random_documents(rng, num_documents: int, max_length: int, vocab: int, empty_every: int = 0):
    """Documents of random token ids; every `empty_every`-th one is empty."""
    docs = []
    for i in range(num_documents):
        length = 0 if empty_every and i % empty_every == empty_every - 1 else int(rng.integers(1, max_length + 1))
        docs.append(rng.integers(0, vocab, size=length))
    return docs


def write_dataset(prefix, docs, dtype=np.uint16) -> IndexedDataset:
    builder = IndexedDatasetBuilder(str(prefix), dtype)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize()
    return IndexedDataset(str(prefix))
