import os
import pickle

import numpy as np
import pytest
import torch

from megatronish.data import gpt_dataset
from megatronish.data.blended_dataset import build_blend_index
from megatronish.data.gpt_dataset import GPTDataset, build_gpt_datasets, parse_data_path, split_document_ranges

from .conftest import random_documents, write_dataset

SEQ = 16


@pytest.fixture
def dataset(tmp_path):
    """80 documents of random ids from a large vocabulary (so every token window is unique), some empty."""
    docs = random_documents(np.random.default_rng(0), 80, 50, 60000, empty_every=9)
    return write_dataset(tmp_path / "docs", docs), docs


def make(indexed, num_samples, seed=1234, seq=SEQ, cache=None, document_range=None, eod_id=7, **kwargs):
    return GPTDataset(
        indexed,
        document_range or (0, indexed.num_documents),
        num_samples,
        seq,
        seed,
        eod_id=eod_id,
        cache_dir=cache or os.path.join(os.path.dirname(indexed.prefix), "cache"),
        **kwargs,
    )


def served(ds) -> list[list[int]]:
    return [ds.sample_tokens(i).tolist() for i in range(len(ds))]


def stream_of(ds, epochs: slice) -> np.ndarray:
    """The token stream that the dataset's document order defines, over the given epochs."""
    first, stop = ds.document_range
    per_epoch = stop - first
    order = ds.document_index[epochs.start * per_epoch : epochs.stop * per_epoch]
    return np.concatenate(
        [ds.indexed.tokens[ds.indexed.document_offsets[d] :][: ds.indexed.document_lengths[d]] for d in order]
    )


def test_every_token_of_an_epoch_is_in_exactly_one_sample(dataset):
    indexed, docs = dataset
    tokens_per_epoch = sum(len(d) for d in docs)
    num_samples = (tokens_per_epoch - 1) // SEQ  # as many as one epoch holds
    ds = make(indexed, num_samples)
    # the first epoch visits every document once
    assert sorted(ds.document_index[:80].tolist()) == list(range(80))
    stream = stream_of(ds, slice(0, 1))
    windows = {tuple(stream[k * SEQ : (k + 1) * SEQ + 1]): k for k in range(num_samples)}
    assert len(windows) == num_samples  # ids drawn from 60000: windows are distinct
    hits = sorted(windows[tuple(s)] for s in served(ds))
    assert hits == list(range(num_samples))  # each window served once: each token once, boundary tokens twice
    assert served(ds) != [stream[k * SEQ : (k + 1) * SEQ + 1].tolist() for k in range(num_samples)]  # shuffled


def test_epochs_are_whole_and_served_in_turn(dataset):
    indexed, docs = dataset
    tokens_per_epoch = sum(len(d) for d in docs)
    num_samples = int(2.5 * tokens_per_epoch) // SEQ
    ds = make(indexed, num_samples)
    epochs = len(ds.document_index) // 80
    assert epochs == 3 and len(ds.document_index) == 3 * 80
    for e in range(epochs):
        assert sorted(ds.document_index[80 * e : 80 * (e + 1)].tolist()) == list(range(80))
    # samples that start in epoch 0 are all served before any sample of epoch 1
    starts = np.asarray(ds.shuffle_index) * SEQ // tokens_per_epoch
    assert (np.diff(starts) >= 0).all()
    stream = stream_of(ds, slice(0, 3))
    assert [stream[k * SEQ : (k + 1) * SEQ + 1].tolist() for k in ds.shuffle_index[:50]] == served(ds)[:50]


def test_sample_fields(dataset):
    indexed, _ = dataset
    plain = make(indexed, 40)
    eod = int(plain.sample_tokens(0)[3])  # an id that does occur stands in for EOD
    masked = make(indexed, 40, eod_id=eod, eod_mask_loss=True)
    for i in range(40):
        raw = torch.from_numpy(plain.sample_tokens(i).astype(np.int64))
        item, item_masked = plain[i], masked[i]
        assert {k: (v.dtype, tuple(v.shape)) for k, v in item.items()} == {
            "tokens": (torch.int64, (SEQ,)),
            "labels": (torch.int64, (SEQ,)),
            "loss_mask": (torch.float32, (SEQ,)),
            "position_ids": (torch.int64, (SEQ,)),
        }
        assert torch.equal(item["tokens"], raw[:-1]) and torch.equal(item["labels"], raw[1:])
        assert torch.equal(item["position_ids"], torch.arange(SEQ))
        assert torch.equal(item["loss_mask"], torch.ones(SEQ))
        assert torch.equal(item_masked["loss_mask"], (raw[:-1] != eod).float())
    assert masked[0]["loss_mask"][3] == 0


def test_pickles_for_spawned_loader_workers(dataset):
    indexed, _ = dataset
    ds = make(indexed, 30)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.indexed.tokens is not ds.indexed.tokens  # the .bin is mapped again, not copied
    assert served(copy) == served(ds)


def test_seed_decides_the_order(dataset):
    indexed, _ = dataset
    a, b, c = make(indexed, 100, seed=1), make(indexed, 100, seed=1), make(indexed, 100, seed=2)
    assert served(a) == served(b)
    assert served(a) != served(c)


def test_dataset_shorter_than_a_sample(tmp_path):
    indexed = write_dataset(tmp_path / "tiny", [[1, 2, 3], [], [4, 5]])
    ds = make(indexed, 6, seq=8)
    assert all(len(ds.sample_tokens(i)) == 9 for i in range(6))
    stream = stream_of(ds, slice(0, len(ds.document_index) // 3))
    assert sorted(tuple(s) for s in served(ds)) == sorted(tuple(stream[k * 8 : k * 8 + 9]) for k in range(6))


def test_split_ranges_follow_megatron():
    assert split_document_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    assert split_document_ranges("949,50,1", 400) == [(0, 380), (380, 400), (400, 400)]
    assert split_document_ranges("0.9, 0.1", 10) == [(0, 9), (9, 10), (10, 10)]
    assert split_document_ranges("1/1/1", 10) == [(0, 4), (4, 7), (7, 10)]  # rounding shortfall shifts every bound
    assert split_document_ranges("100", 7) == [(0, 7), (7, 7), (7, 7)]
    for bad in ("a,b", "1,2,3,4", "-1,2", "0,0"):
        with pytest.raises(ValueError, match="--split"):
            split_document_ranges(bad, 10)


def test_build_datasets_splits_and_caches(dataset, tmp_path, monkeypatch):
    indexed, _ = dataset
    cache = tmp_path / "cache_b"
    train, valid, test = build_gpt_datasets(
        [indexed.prefix], "90,10,0", SEQ, 5, (50, 20, 10), eod_id=7, cache_dir=cache
    )
    assert test is None and (len(train), len(valid)) == (50, 20)
    assert train.document_range == (0, 72) and valid.document_range == (72, 80)
    assert set(np.asarray(valid.document_index)) <= set(range(72, 80))
    assert build_gpt_datasets([indexed.prefix], "90,10,0", SEQ, 5, (50, 0, 0), 7, cache_dir=cache)[1] is None
    files = sorted(os.listdir(cache))
    assert len(files) == 6 and not [f for f in files if "partial" in f]

    def no_building(*args):
        raise AssertionError("indices should have come from the cache")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", no_building)
    again = build_gpt_datasets([indexed.prefix], "90,10,0", SEQ, 5, (50, 20, 0), eod_id=7, cache_dir=cache)[0]
    assert served(again) == served(train)
    with pytest.raises(AssertionError, match="cache"):  # any input that matters changes the key
        build_gpt_datasets([indexed.prefix], "90,10,0", SEQ, 6, (50, 0, 0), eod_id=7, cache_dir=cache)


def test_a_corrupt_cache_file_is_named_and_rebuilt(dataset, tmp_path, capsys):
    indexed, _ = dataset
    cache = tmp_path / "cache_c"
    first = served(build_gpt_datasets([indexed.prefix], "90,10,0", SEQ, 5, (50, 0, 0), eod_id=7, cache_dir=cache)[0])
    sample_file = next(cache / name for name in os.listdir(cache) if name.endswith("-sample.npy"))
    for damage in (b"\x93NUMPY garbage", b""):  # a foreign header, then an empty file
        sample_file.write_bytes(damage)
        again = build_gpt_datasets([indexed.prefix], "90,10,0", SEQ, 5, (50, 0, 0), eod_id=7, cache_dir=cache)[0]
        assert f"warning: the sample-index cache file {sample_file} is corrupt" in capsys.readouterr().out
        assert served(again) == first


def test_blending_proportions(tmp_path):
    rng = np.random.default_rng(3)
    a = write_dataset(tmp_path / "a", random_documents(rng, 50, 40, 30000))
    b = write_dataset(tmp_path / "b", [d + 30000 for d in random_documents(rng, 50, 40, 30000)])  # ids tell a from b
    n = 10_000
    blend, _, _ = build_gpt_datasets(
        ["0.3", a.prefix, "0.7", b.prefix], "1", SEQ, 9, (n, 0, 0), eod_id=7, cache_dir=tmp_path / "cache"
    )
    from_b = np.array([blend.datasets[0] is None or blend[i]["tokens"][0].item() >= 30000 for i in range(n)])
    for prefix in (100, 1000, n):
        assert abs(from_b[:prefix].mean() - 0.7) <= 0.01, prefix
    # members are served in their own order, each sample once
    first_a = [i for i in range(n) if not from_b[i]][:5]
    assert [blend[i]["tokens"].tolist() for i in first_a] == [blend.datasets[0][k]["tokens"].tolist() for k in range(5)]

    counts = np.bincount(build_blend_index([1.0, 2.0, 7.0], n)[0])
    assert np.abs(counts / n - [0.1, 0.2, 0.7]).max() <= 0.01
    # no weights: proportional to the token counts
    tokens = np.array([a.num_tokens, b.num_tokens])
    unweighted = build_gpt_datasets([a.prefix, b.prefix], "1", SEQ, 9, (2000, 0, 0), 7, cache_dir=tmp_path / "cache")[0]
    assert abs(np.mean(unweighted.dataset_index) - tokens[1] / tokens.sum()) <= 0.01


def test_data_path_forms():
    assert parse_data_path(["p"]) == (["p"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    for bad in ([], ["0.3", "a", "-1", "b"], ["0.3", "a", "b"], ["a", "0.5"]):
        with pytest.raises(ValueError, match="--data-path"):
            parse_data_path(bad)
