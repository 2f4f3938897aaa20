"""The multi-rank harness itself: results by rank, failures with tracebacks, hangs become timeouts."""

import time

import pytest
import torch
import torch.distributed as dist

from megatronish.testing import RankFailed, run_distributed


def _rank_and_threads():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), torch.get_num_threads(), t.item()


def test_results_come_back_by_rank_with_one_thread_each():
    results = run_distributed(_rank_and_threads, 4)
    assert results == [(r, 4, 1, 6.0) for r in range(4)]


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    dist.barrier()


def test_a_failing_rank_fails_the_call_with_its_traceback():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 failed:.*ValueError: boom from rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=20)


def _hang_on_rank_zero():
    if dist.get_rank() == 0:
        time.sleep(600)  # never reaches the collective the other rank waits in
    dist.barrier()


def test_a_hung_rank_fails_by_timeout_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"timed out|failed"):
        run_distributed(_hang_on_rank_zero, 2, timeout=2)
    assert time.monotonic() - start < 30
