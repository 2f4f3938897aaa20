import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from megatronish.data import gpt_dataset
from megatronish.data.blended_dataset import build_blend_index
from megatronish.data.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    build_gpt_datasets,
    parse_and_normalize_split,
    parse_data_path,
    sequence_range,
    split_matrix,
)
from megatronish.data.indexed_dataset import IndexedDataset

from .conftest import FIXTURES, random_documents, write_dataset

SEQ = 16
MEGATRON = FIXTURES / "megatron_indices"


@pytest.fixture
def dataset(tmp_path):
    """80 documents of random ids from a large vocabulary (so every token window is unique), some empty."""
    docs = random_documents(np.random.default_rng(0), 80, 50, 60000, empty_every=9)
    return write_dataset(tmp_path / "docs", docs), docs


def make(indexed, num_samples, seed=1234, seq=SEQ, eod_id=7, eod_mask_loss=False):
    config = GPTDatasetConfig(seed, seq, "1", eod_id=eod_id, eod_mask_loss=eod_mask_loss,
                              path_to_cache=os.path.join(os.path.dirname(indexed.prefix), "cache"))
    return GPTDataset(indexed, indexed.prefix, (0, len(indexed)), num_samples, "train", config)


def served(ds) -> list[list[int]]:
    return [ds.sample_tokens(i).tolist() for i in range(len(ds))]


def stream_of(ds) -> np.ndarray:
    """The token stream that the dataset's document index defines."""
    return np.concatenate([ds.indexed.get(int(d)) for d in ds.document_index])


# -- Megatron-core's own samples and index files (tests/data/fixtures/megatron_indices) --

@pytest.fixture
def megatron_layout(tmp_path, monkeypatch):
    """The folders as Megatron ran: data in ../megatron-fixture, its caches in data/cache_*; cwd beside them."""
    data = tmp_path / "megatron-fixture"
    data.mkdir()
    for name in os.listdir(FIXTURES):
        if name.startswith("meg_") and name.endswith((".bin", ".idx")):
            os.symlink(FIXTURES / name, data / name)
    run = tmp_path / "run"
    shutil.copytree(MEGATRON, run / "data")
    monkeypatch.chdir(run)
    with open(run / "data" / "samples.json") as f:
        return json.load(f)


def _megatron_build(record, cache):
    argv = record["argv"]
    data_path = argv[argv.index("--data-path") + 1: argv.index("--split")]
    config = GPTDatasetConfig(random_seed=1234, sequence_length=32, split=argv[argv.index("--split") + 1],
                              eod_id=0, path_to_cache=str(cache))
    return build_gpt_datasets(data_path, config, [n or 0 for n in record["train_valid_test_num_samples"]])


def _assert_megatron_samples(record, datasets):
    for name, ours in zip(("train", "valid", "test"), datasets):
        want = record[name]
        if want is None or want["len"] == 0:  # no split, or an empty one (Megatron: len 0; here: none)
            assert ours is None
            continue
        assert len(ours) == want["len"]
        items = [ours[i] for i in range(want["num_samples_stored"])]
        assert [item["tokens"].tolist() for item in items] == want["tokens"]
        assert [item["labels"].tolist() for item in items] == want["labels"]
        assert all(torch.equal(item["position_ids"], torch.arange(32)) and bool((item["loss_mask"] == 1).all())
                   for item in items)
        if "dataset_id" in want:
            n = want["num_samples_stored"]
            assert ours.dataset_index[:n].tolist() == want["dataset_id"]
            assert ours.dataset_sample_index[:n].tolist() == want["dataset_sample_id"]


@pytest.mark.parametrize("tag", ["single", "blend"])
def test_samples_and_index_files_equal_megatrons(megatron_layout, tmp_path, monkeypatch, tag):
    record = megatron_layout[tag]
    megatron_cache = f"data/cache_{tag}"
    # 1. Megatron's cache is read, not rebuilt: building anything would fail.
    def no_building(*args):
        raise AssertionError("the indices should have come from Megatron's cache")
    with monkeypatch.context() as patch:
        patch.setattr(gpt_dataset, "build_gpt_indices", no_building)
        patch.setattr(gpt_dataset, "build_blend_index", no_building, raising=False)
        from megatronish.data import blended_dataset
        patch.setattr(blended_dataset, "build_blend_index", no_building)
        _assert_megatron_samples(record, _megatron_build(record, megatron_cache))
    assert sorted(os.listdir(megatron_cache)) == sorted(record["cache_files"])  # nothing written beside them
    # 2. Built from scratch, the arrays are Megatron's, byte for byte (dtype included), and so are the samples.
    fresh = tmp_path / "fresh"
    _assert_megatron_samples(record, _megatron_build(record, fresh))
    theirs = {f.split("-", 1)[1]: np.load(os.path.join(megatron_cache, f)) for f in os.listdir(megatron_cache)
              if f.endswith(".npy") and "-test-" not in f}  # (single: Megatron's empty test split; here none)
    ours = {}
    for f in os.listdir(fresh):
        if f.endswith(".npy"):
            ours.setdefault(f.split("-", 1)[1], []).append(np.load(fresh / f))
    assert sorted(ours) == sorted(theirs)
    for name, array in theirs.items():  # two blended members share a name: one of ours must equal each
        assert any(a.dtype == array.dtype and np.array_equal(a, array) for a in ours[name]), name


def test_split_is_read_as_megatron_reads_it():
    assert parse_and_normalize_split("949,50,1") == [0.949, 0.05, 0.001]
    assert parse_and_normalize_split("'99,1,0'") == parse_and_normalize_split("99,1,0")  # quotes from a script
    assert parse_and_normalize_split("0.9 0.1") == [0.9, 0.1, 0.0]
    assert split_matrix([0.99, 0.01, 0.0]) == [(0, 0.99), (0.99, 1.0), None]
    matrix = split_matrix(parse_and_normalize_split("949,50,1"))
    assert [sequence_range(b, 399) for b in matrix] == [(0, 379), (379, 399), (399, 399)]
    for bad in ("a,b", "1,2,3,4", "0,0"):
        with pytest.raises(ValueError, match="--split"):
            parse_and_normalize_split(bad)


# -- properties of the stream --

def test_every_token_of_an_epoch_is_in_exactly_one_sample(dataset):
    indexed, docs = dataset
    tokens_per_epoch = sum(len(d) for d in docs)
    ds = make(indexed, 10)  # one epoch holds far more: the dataset holds all of it
    num_samples = (tokens_per_epoch - 1) // SEQ
    assert len(ds) == num_samples
    assert sorted(np.asarray(ds.document_index).tolist()) == list(range(len(indexed)))  # each sequence once
    stream = stream_of(ds)
    windows = {tuple(stream[k * SEQ: (k + 1) * SEQ + 1]): k for k in range(num_samples)}
    assert len(windows) == num_samples  # ids drawn from 60000: windows are distinct
    assert sorted(windows[tuple(s)] for s in served(ds)) == list(range(num_samples))
    assert served(ds) != [list(w) for w in windows]  # shuffled


def test_a_small_last_epoch_is_shuffled_apart(dataset):
    indexed, docs = dataset
    tokens_per_epoch = sum(len(d) for d in docs)
    per_epoch = (tokens_per_epoch - 1) // SEQ
    ds = make(indexed, per_epoch + 5)  # 5 samples of the second epoch are needed: below 80% of it
    n = len(indexed)
    first, second = np.asarray(ds.document_index[:n]), np.asarray(ds.document_index[n:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    before_final = (tokens_per_epoch - 1) // SEQ
    assert sorted(np.asarray(ds.shuffle_index[:before_final]).tolist()) == list(range(before_final))
    mixed = make(indexed, 2 * per_epoch)  # most of the second epoch is needed: the epochs are shuffled together
    assert sorted(np.asarray(mixed.document_index[:n]).tolist()) != list(range(n))


def test_sample_fields(dataset):
    indexed, _ = dataset
    plain = make(indexed, 40)
    eod = int(plain.sample_tokens(0)[3])  # an id that does occur stands in for EOD
    masked = make(indexed, 40, eod_id=eod, eod_mask_loss=True)
    for i in range(40):
        raw = torch.from_numpy(plain.sample_tokens(i).astype(np.int64))
        item, item_masked = plain[i], masked[i]
        assert {k: (v.dtype, tuple(v.shape)) for k, v in item.items()} == {
            "tokens": (torch.int64, (SEQ,)), "labels": (torch.int64, (SEQ,)),
            "loss_mask": (torch.float32, (SEQ,)), "position_ids": (torch.int64, (SEQ,))}
        assert torch.equal(item["tokens"], raw[:-1]) and torch.equal(item["labels"], raw[1:])
        assert torch.equal(item["position_ids"], torch.arange(SEQ))
        assert torch.equal(item["loss_mask"], torch.ones(SEQ))
        assert torch.equal(item_masked["loss_mask"], (raw[:-1] != eod).float())
    assert masked[0]["loss_mask"][3] == 0


def test_pickles_for_spawned_loader_workers_and_reads_without_mmap(dataset):
    indexed, _ = dataset
    ds = make(indexed, 30)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.indexed.tokens is not ds.indexed.tokens  # the .bin is mapped again, not copied
    assert served(copy) == served(ds)
    in_memory = make(IndexedDataset(indexed.prefix, mmap=False), 30)
    assert not isinstance(in_memory.indexed.tokens, np.memmap) and served(in_memory) == served(ds)


def test_seed_decides_the_order(dataset):
    indexed, _ = dataset
    a, b, c = make(indexed, 100, seed=1), make(indexed, 100, seed=1), make(indexed, 100, seed=2)
    assert served(a) == served(b)
    assert served(a) != served(c)


def test_dataset_shorter_than_a_sample(tmp_path):
    indexed = write_dataset(tmp_path / "tiny", [[1, 2, 3], [], [4, 5]])
    ds = make(indexed, 6, seq=8)
    assert len(ds) == 6 and all(len(ds.sample_tokens(i)) == 9 for i in range(6))
    stream = stream_of(ds)
    assert sorted(tuple(s) for s in served(ds)) == sorted(tuple(stream[k * 8: k * 8 + 9]) for k in range(6))


def test_build_datasets_splits_caches_and_skips_empty_splits(dataset, tmp_path, monkeypatch):
    indexed, _ = dataset
    config = GPTDatasetConfig(5, SEQ, "90,10,0", eod_id=7, path_to_cache=str(tmp_path / "cache_b"))
    train, valid, test = build_gpt_datasets([indexed.prefix], config, (50, 20, 10))
    assert test is None and len(train) >= 50 and len(valid) >= 20
    assert train.sequence_range == (0, 65) and valid.sequence_range == (65, 72)  # 72 sequences (8 docs empty)
    assert set(np.asarray(valid.document_index)) <= set(range(65, 72))
    files = sorted(os.listdir(config.path_to_cache))
    assert len(files) == 8 and not [f for f in files if "partial" in f]  # description + 3 arrays per split

    def no_building(*args):
        raise AssertionError("indices should have come from the cache")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", no_building)
    again = build_gpt_datasets([indexed.prefix], config, (50, 20, 0))[0]
    assert served(again) == served(train)
    with pytest.raises(AssertionError, match="cache"):  # any input that matters selects another entry
        build_gpt_datasets([indexed.prefix], GPTDatasetConfig(6, SEQ, "90,10,0", path_to_cache=config.path_to_cache),
                           (50, 0, 0))
    empty_test = GPTDatasetConfig(5, SEQ, "949,50,1", path_to_cache=config.path_to_cache)
    monkeypatch.undo()
    assert build_gpt_datasets([indexed.prefix], empty_test, (50, 20, 20))[2] is None  # Megatron would hang here


def test_per_split_data_paths(dataset, tmp_path):
    indexed, docs = dataset
    other = write_dataset(tmp_path / "other", random_documents(np.random.default_rng(5), 20, 50, 60000))
    config = GPTDatasetConfig(5, SEQ, "90,10,0", path_to_cache=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(None, config, (30, 10, 10),
                                            data_path_per_split=([indexed.prefix], [other.prefix], None))
    assert test is None
    assert train.sequence_range == (0, len(indexed)) and valid.sequence_range == (0, len(other))
    assert valid.indexed.prefix == other.prefix


def test_a_corrupt_cache_file_is_named_and_rebuilt(dataset, tmp_path, capsys):
    indexed, _ = dataset
    config = GPTDatasetConfig(5, SEQ, "90,10,0", eod_id=7, path_to_cache=str(tmp_path / "cache_c"))
    first = served(build_gpt_datasets([indexed.prefix], config, (50, 0, 0))[0])
    cache = tmp_path / "cache_c"
    sample_file = next(cache / name for name in os.listdir(cache) if name.endswith("-sample_index.npy"))
    for damage in (b"\x93NUMPY garbage", b""):  # a foreign header, then an empty file
        sample_file.write_bytes(damage)
        again = build_gpt_datasets([indexed.prefix], config, (50, 0, 0))[0]
        assert f"warning: the sample-index cache file {sample_file} is corrupt" in capsys.readouterr().out
        assert served(again) == first


def test_blending_proportions(tmp_path):
    rng = np.random.default_rng(3)
    a = write_dataset(tmp_path / "a", random_documents(rng, 50, 40, 30000))
    b = write_dataset(tmp_path / "b", [d + 30000 for d in random_documents(rng, 50, 40, 30000)])  # ids tell a from b
    n = 5000
    config = GPTDatasetConfig(9, SEQ, "1", path_to_cache=str(tmp_path / "cache"))
    blend, _, _ = build_gpt_datasets(["0.3", a.prefix, "0.7", b.prefix], config, (n, 0, 0))
    assert len(blend) == n
    from_b = np.array([blend[i]["tokens"][0].item() >= 30000 for i in range(n)])
    for prefix in (100, 1000, n):
        assert abs(from_b[:prefix].mean() - 0.7) <= 0.01, prefix
    first_a = [i for i in range(n) if not from_b[i]][:5]  # members are served in their own order
    assert [blend[i]["tokens"].tolist() for i in first_a] == [blend.datasets[0][k]["tokens"].tolist() for k in range(5)]
    index, sample_index = build_blend_index([0.1, 0.2, 0.7], 6)  # worked by hand: largest w * max(i, 1) - count
    assert index.tolist() == [2, 1, 2, 0, 2, 2] and sample_index.tolist() == [0, 0, 1, 0, 2, 3]
    # no weights: in proportion to the members' sample counts, at most the size asked for
    unweighted = build_gpt_datasets([a.prefix, b.prefix], config, (2000, 0, 0))[0]
    sizes = np.array([len(d) for d in unweighted.datasets])
    assert len(unweighted) == min(2000, sizes.sum())
    assert abs(np.mean(unweighted.dataset_index) - sizes[1] / sizes.sum()) <= 0.01


def test_data_path_forms():
    assert parse_data_path(["p"]) == (["p"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    for bad in ([], ["0.3", "a", "-1", "b"], ["0.3", "a", "b"], ["a", "0.5"]):
        with pytest.raises(ValueError, match="--data-path"):
            parse_data_path(bad)
