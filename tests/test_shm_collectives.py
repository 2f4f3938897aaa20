"""Shared-memory collectives of CPU TP groups against gloo on the same inputs.

Each rank draws its own random tensors. Max, gathers and integer sums must equal gloo's exactly;
float sums must equal the float64 sum of every rank's tensor within the dtype's rounding (the two
sum in different orders, gloo in the tensor's dtype). Every rank of the group must get bitwise
the same result.
"""

import mmap
import os
import subprocess
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megatronish import parallel_state as ps
from megatronish.shm_collectives import ENV_SLOT_MB, SharedMemoryCollectives
from megatronish.tensor_parallel.mappings import (
    all_reduce_in_tensor_model_parallel_group,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatronish.testing import run_distributed

DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.int64)
SUM_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float64: 1e-12, torch.int64: 0}


def _random(shape, dtype, generator):
    if dtype == torch.int64:
        return torch.randint(-1000, 1000, shape, generator=generator)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def _compare_with_gloo(tp):
    ps.initialize_model_parallel(tp)
    shared_memory = ps.get_tensor_model_parallel_shared_memory()
    assert shared_memory is not None  # gloo ranks on one host get it
    group = ps.get_tensor_model_parallel_group()
    generator = torch.Generator().manual_seed(100 + dist.get_rank())
    results = []
    for step in range(40):  # many in a row: the two slot sets alternate
        dtype = DTYPES[step % len(DTYPES)]
        x = _random((tp * (1 + step % 5), 3, 7), dtype, generator)
        if dist.get_rank() == step % tp:
            time.sleep(0.002)  # a late rank: the others must wait for it
        gathered, reference = torch.empty((tp * x.size(0), 3, 7), dtype=dtype), torch.empty((tp * x.size(0), 3, 7), dtype=dtype)
        shared_memory.all_gather_into_tensor(gathered, x)
        dist.all_gather_into_tensor(reference, x, group=group)
        assert torch.equal(gathered, reference)
        exact_sum = reference.double().view(tp, *x.shape).sum(dim=0)
        tolerance = dict(rtol=SUM_TOLERANCE[dtype], atol=SUM_TOLERANCE[dtype])

        summed = x.clone()
        shared_memory.all_reduce(summed, dist.ReduceOp.SUM)
        torch.testing.assert_close(summed.double(), exact_sum, **tolerance)
        strided, before = x.transpose(1, 2), x.clone()  # out of place, from a non-contiguous view
        out = shared_memory.all_reduce(strided, out=torch.empty(strided.shape, dtype=dtype))
        torch.testing.assert_close(out.double(), exact_sum.transpose(1, 2), **tolerance)
        assert torch.equal(x, before)

        chunk = x.size(0) // tp  # reduce-scatter: this rank gets the sum of every rank's chunk `rank`
        scattered = torch.empty((chunk, 3, 7), dtype=dtype)
        shared_memory.reduce_scatter_tensor(scattered, x)
        own = exact_sum[ps.get_tensor_model_parallel_rank() * chunk:][:chunk]
        torch.testing.assert_close(scattered.double(), own, **tolerance)

        maximum = x.clone()
        shared_memory.all_reduce(maximum, dist.ReduceOp.MAX)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        assert torch.equal(maximum, x)
        results += [summed, maximum, gathered]  # (each rank scatters a different chunk)
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_shared_memory_collectives_match_gloo_and_agree_across_ranks(tp):
    per_rank = run_distributed(_compare_with_gloo, tp, args=(tp,))
    for results in per_rank[1:]:
        for ours, first in zip(results, per_rank[0]):
            assert torch.equal(ours, first)  # bitwise the same on every rank


def _sequence_parallel_ops(tp, slot_mb):
    os.environ[ENV_SLOT_MB] = str(slot_mb)
    ps.initialize_model_parallel(tp)
    generator = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(4 * tp, 2, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    out = reduce_scatter_to_sequence_parallel_region(x)
    gathered = gather_from_sequence_parallel_region(out)
    gathered.backward(torch.ones_like(gathered))
    total = all_reduce_in_tensor_model_parallel_group(torch.tensor([float(dist.get_rank() + 1)]), "max")
    return ps.get_tensor_model_parallel_shared_memory() is not None, gathered.detach(), x.grad, total


def test_mappings_give_the_same_results_with_and_without_shared_memory():
    on = run_distributed(_sequence_parallel_ops, 2, args=(2, 16))
    off = run_distributed(_sequence_parallel_ops, 2, args=(2, 0))  # 0 MiB: off, gloo only
    for (used_on, *values_on), (used_off, *values_off) in zip(on, off):
        assert used_on and not used_off
        for a, b in zip(values_on, values_off):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert values_on[-1].item() == 2.0  # the max over ranks


def _larger_than_a_slot():
    os.environ[ENV_SLOT_MB] = "1"
    ps.initialize_model_parallel(2)
    shared_memory = ps.get_tensor_model_parallel_shared_memory()
    x = torch.full((300_000,), float(dist.get_rank() + 1))  # 1.2 MB > 1 MiB slot
    assert not shared_memory.fits(x) and shared_memory.fits(x[:1000])
    return all_reduce_in_tensor_model_parallel_group(x)  # falls back to gloo


def test_a_tensor_larger_than_a_slot_goes_through_gloo():
    for x in run_distributed(_larger_than_a_slot, 2):
        assert torch.equal(x, torch.full((300_000,), 3.0))


def _group_of_two_seen_by_rank_0(peer_pid: int, timeout_s: float) -> SharedMemoryCollectives:
    """Rank 0 of a two-rank group whose rank 1 never joins (its process id is `peer_pid`)."""
    capacity = 4096
    mapping = mmap.mmap(-1, 2 * 64 + 2 * 2 * capacity)
    shared_memory = SharedMemoryCollectives(mapping, 0, 2, capacity, timedelta(seconds=timeout_s))
    shared_memory._pids[1] = peer_pid
    return shared_memory


def test_a_rank_that_never_joins_times_out_with_its_name():
    shared_memory = _group_of_two_seen_by_rank_0(os.getpid(), timeout_s=0.5)  # a live peer that hangs
    with pytest.raises(RuntimeError, match=r"timed out after \d+ s in shared-memory collective #1: group rank 0 "
                                           r"waited for group rank\(s\) \[1\]"):
        shared_memory.all_reduce(torch.ones(4))


def test_a_rank_that_exited_is_reported_at_once():
    peer = subprocess.Popen(["true"])
    peer.wait()
    shared_memory = _group_of_two_seen_by_rank_0(peer.pid, timeout_s=300)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"peer exited: group rank\(s\) \[1\] \(pid \[{peer.pid}\]\) ended "
                                           r"before joining shared-memory collective #1"):
        shared_memory.all_reduce(torch.ones(4))
    assert time.monotonic() - start < 5  # not the 300 s timeout


def test_a_bad_slot_size_is_named(monkeypatch):
    monkeypatch.setenv(ENV_SLOT_MB, "16MB")
    with pytest.raises(ValueError, match=r"MEGATRONISH_SHM_SLOT_MB='16MB': give the size .* whole number of MiB"):
        SharedMemoryCollectives.create(None, [0, 1], timedelta(seconds=1))
