import os

import numpy as np
import pytest
import torch

from megatronish import parallel_state
from megatronish.data import gpt_dataset
from megatronish.data.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from megatronish.data.samplers import PretrainingSampler, build_pretraining_data_loader, micro_batches_of_rank
from megatronish.testing import run_distributed

from .conftest import random_documents, write_dataset


class Numbered(torch.utils.data.Dataset):
    """Sample i is {"tokens": [i, i]}: batches show which samples they hold."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": torch.tensor([i, i])}


def micro_batches(dataset, consumed, mbs, rank, dp, workers=0):
    return [
        b["tokens"][:, 0].tolist() for b in build_pretraining_data_loader(dataset, consumed, mbs, rank, dp, workers)
    ]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_data_parallel_ranks_are_disjoint_and_cover_each_global_batch(dp):
    mbs, accumulation, total = 3, 2, 101
    global_batch = mbs * dp * accumulation
    per_rank = [micro_batches(Numbered(total), 0, mbs, r, dp) for r in range(dp)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
    iterations = len(per_rank[0]) // accumulation
    assert iterations == total // global_batch
    for it in range(iterations):
        seen = [i for r in range(dp) for b in per_rank[r][it * accumulation : (it + 1) * accumulation] for i in b]
        assert sorted(seen) == list(range(it * global_batch, (it + 1) * global_batch))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_micro_batches_of_a_global_batch_do_not_depend_on_dp(dp):
    """The samples of a global batch and their micro-batches are the same at every DP size (an elastic job that
    changes DP stays on its trajectory); a live-replica count that does not divide them (fault-tolerant DP)
    still covers each micro-batch once."""
    mbs, global_batch, consumed = 2, 16, 32
    by_rank = [micro_batches(Numbered(100), consumed, mbs, r, dp)[: global_batch // (mbs * dp)] for r in range(dp)]
    assert sorted(map(tuple, (b for batches in by_rank for b in batches))) == [
        tuple(range(start, start + mbs)) for start in range(consumed, consumed + global_batch, mbs)]
    for rank in range(dp):
        assert micro_batches_of_rank(consumed, global_batch, mbs, rank, dp) == by_rank[rank]
    uneven = [micro_batches_of_rank(consumed, global_batch, mbs, rank, 3) for rank in range(3)]
    assert [len(b) for b in uneven] == [3, 3, 2]
    assert sorted(i for batches in uneven for b in batches for i in b) == list(range(consumed, consumed + global_batch))


def test_resume_serves_what_an_uninterrupted_run_serves(tmp_path):
    docs = random_documents(np.random.default_rng(0), 40, 60, 50000)
    indexed = write_dataset(tmp_path / "docs", docs)
    dataset = build_gpt_datasets([indexed.prefix], GPTDatasetConfig(1, 8, "1", path_to_cache=str(tmp_path / "c")), (120, 0, 0))[0]
    mbs, dp, accumulation = 2, 2, 3
    global_batch = mbs * dp * accumulation
    for rank in range(dp):
        full = list(build_pretraining_data_loader(dataset, 0, mbs, rank, dp))
        for k in (1, 4):
            resumed = list(build_pretraining_data_loader(dataset, k * global_batch, mbs, rank, dp))
            tail = full[k * accumulation :]
            assert len(resumed) == len(tail)
            for got, want in zip(resumed, tail):
                assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in got)
        with_workers = list(build_pretraining_data_loader(dataset, 0, mbs, rank, dp, num_workers=2))
        assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(with_workers, full))
        assert full[0]["tokens"].shape == (mbs, 8) and full[0]["loss_mask"].dtype == torch.float32


def test_sampler_arguments_are_checked():
    for args, match in [
        ((10, 10, 1, 0, 1), "consumed_samples"),
        ((10, 0, 1, 2, 2), "data_parallel_rank"),
        ((10, 0, 0, 0, 1), "micro_batch_size"),
        ((0, 0, 1, 0, 1), "empty"),
    ]:
        with pytest.raises(ValueError, match=match):
            PretrainingSampler(*args)
    assert build_pretraining_data_loader(None, 0, 1, 0, 1) is None


def _distributed_batches(prefix, cache_dir, tp):
    """Runs in each rank: count index builds, then read the first micro-batches of this DP rank."""
    parallel_state.initialize_model_parallel(tp)
    builds = []
    original = gpt_dataset.build_gpt_indices

    def counting(*args):
        builds.append(1)
        return original(*args)

    gpt_dataset.build_gpt_indices = counting
    try:
        train, valid, _ = build_gpt_datasets([prefix], GPTDatasetConfig(3, 8, "80,20,0", path_to_cache=cache_dir), (64, 16, 0))
    finally:
        gpt_dataset.build_gpt_indices = original
    loader = build_pretraining_data_loader(
        train, 8, 2, parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    )
    batches = [b["tokens"].tolist() for _, b in zip(range(3), loader)]
    return {"builds": len(builds), "dp_rank": parallel_state.get_data_parallel_rank(), "batches": batches}


def test_distributed_build_once_per_node_and_loader(tmp_path):
    indexed = write_dataset(tmp_path / "docs", random_documents(np.random.default_rng(1), 30, 40, 50000))
    cache = tmp_path / "cache"
    results = run_distributed(_distributed_batches, world_size=4, args=(indexed.prefix, str(cache), 2))
    assert [r["builds"] for r in results] == [2, 0, 0, 0]  # local rank 0 built train and valid; others loaded
    by_dp = {}
    for r in results:  # the TP ranks of one DP group read identical batches
        assert by_dp.setdefault(r["dp_rank"], r["batches"]) == r["batches"]
    assert len(by_dp) == 2
    samples = [tuple(s) for batches in by_dp.values() for b in batches for s in b]
    assert len(set(samples)) == len(samples) == 2 * 3 * 2  # DP ranks read disjoint samples
    assert not [f for f in os.listdir(cache) if "partial" in f]


def _distributed_build_error(prefix, cache_dir):
    try:
        build_gpt_datasets([prefix], GPTDatasetConfig(3, 8, "1", path_to_cache=cache_dir), (4, 0, 0))
    except ValueError as e:
        return str(e)
    return None


def test_a_failing_build_fails_every_rank_instead_of_hanging(tmp_path):
    indexed = write_dataset(tmp_path / "empty_docs", [[], []])
    errors = run_distributed(_distributed_build_error, world_size=2, args=(indexed.prefix, str(tmp_path)), timeout=60)
    assert all(e is not None and "holds no tokens" in e for e in errors)
