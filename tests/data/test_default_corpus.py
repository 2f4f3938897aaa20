import multiprocessing as mp
import os

import numpy as np

from megatronish.data.default_corpus import TOKENIZER_TYPE, default_corpus_prefix, stdlib_source_files
from megatronish.data.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from megatronish.data.indexed_dataset import IndexedDataset
from megatronish.data.tokenizers import build_tokenizer

MAX_BYTES = 1 << 20  # a small slice keeps the test quick; the default takes up to 20 MB


def test_built_from_the_interpreters_own_sources(tmp_path):
    prefix = default_corpus_prefix(cache_dir=tmp_path, max_bytes=MAX_BYTES)
    files = stdlib_source_files(MAX_BYTES)
    assert files == sorted(files) and "site-packages" not in str(files)
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    ds, tok = IndexedDataset(prefix), build_tokenizer(TOKENIZER_TYPE)
    assert ds.num_documents == len(files) and ds.dtype == np.uint16
    for d in (0, len(files) // 2, len(files) - 1):
        doc = ds.tokens[ds.document_offsets[d] :][: ds.document_lengths[d]]
        assert doc[-1] == tok.eod
        assert bytes(doc[:-1].astype(np.uint8)) == files[d].read_bytes()
    stamp = os.stat(prefix + ".idx").st_mtime_ns
    assert default_corpus_prefix(cache_dir=tmp_path, max_bytes=MAX_BYTES) == prefix  # cached, not rebuilt
    assert os.stat(prefix + ".idx").st_mtime_ns == stamp
    train, _, _ = build_gpt_datasets([prefix], GPTDatasetConfig(0, 32, "1", eod_id=tok.eod, path_to_cache=str(tmp_path / "idx")), (4, 0, 0))
    assert train[3]["tokens"].max() < tok.vocab_size


def _build_in_child(cache_dir):
    return default_corpus_prefix(cache_dir=cache_dir, max_bytes=MAX_BYTES)


def test_concurrent_callers_share_one_build(tmp_path):
    with mp.get_context("fork").Pool(3) as pool:
        prefixes = pool.map(_build_in_child, [str(tmp_path)] * 3)
    assert len(set(prefixes)) == 1
    assert IndexedDataset(prefixes[0]).num_documents == len(stdlib_source_files(MAX_BYTES))
    assert not [f for f in os.listdir(tmp_path) if "partial" in f]


def test_default_location_is_the_cache(tmp_path):
    prefix = default_corpus_prefix(max_bytes=MAX_BYTES // 4)
    assert prefix.startswith(os.environ["MEGATRONISH_CACHE"])
