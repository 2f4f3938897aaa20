"""RNG streams per TP rank, and activation recompute that replays dropout exactly."""

import pytest
import torch
import torch.nn.functional as F

import megatronish.tensor_parallel as tp
from megatronish import parallel_state as ps
from megatronish.testing import run_distributed


def _streams(tp_size):
    ps.initialize_model_parallel(tp_size)
    tp.model_parallel_manual_seed(123)
    tracker = tp.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream did not move
    outside = torch.rand(4)
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork():
        again = torch.rand(4)
    assert torch.equal(first, again)  # restored states replay the same draws
    return inside, outside


def test_tp_stream_differs_per_rank_and_default_stream_is_shared():
    results = run_distributed(_streams, 2, args=(2,))
    (inside0, outside0), (inside1, outside1) = results
    assert torch.equal(outside0, outside1)
    assert not torch.equal(inside0, inside1)


def _block(x, col, row, p):
    """Dropout on partitioned activations (TP stream) and on replicated ones (default stream)."""
    h, _ = col(x)
    with tp.get_cuda_rng_tracker().fork():
        h = F.dropout(F.gelu(h), p=p, training=True)
    y, _ = row(h)
    return F.dropout(y, p=p, training=True), y.sum()  # a second output, non-random


def _recompute_equals_plain(tp_size):
    ps.initialize_model_parallel(tp_size)
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        col = tp.ColumnParallelLinear(8, 16, params_dtype=torch.float64)
        row = tp.RowParallelLinear(16, 8, input_is_parallel=True, params_dtype=torch.float64)
        tp.model_parallel_manual_seed(42)
        x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
        if recompute:
            out, total = tp.checkpoint(_block, False, x, col, row, 0.3)
        else:
            out, total = _block(x, col, row, 0.3)
        (out.square().sum() + total).backward()
        next_draw = torch.rand(3)  # the stream continues where an un-recomputed run would be
        with tp.get_cuda_rng_tracker().fork():
            next_tp_draw = torch.rand(3)
        results.append([out.detach(), x.grad, col.weight.grad, col.bias.grad, row.weight.grad, row.bias.grad,
                        next_draw, next_tp_draw])
    plain, recomputed = results
    assert (plain[0] == 0).any()  # dropout really dropped something
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)  # bitwise: the same masks and the same arithmetic
    return True


@pytest.mark.parametrize("tp_size", [1, 2])
def test_recompute_gives_identical_outputs_and_gradients_with_dropout(tp_size):
    assert all(run_distributed(_recompute_equals_plain, tp_size, args=(tp_size,)))


def test_fork_before_seeding_says_what_to_call():
    tracker = tp.RNGStatesTracker()
    with pytest.raises(KeyError, match="model_parallel_manual_seed"):
        with tracker.fork():
            pass


def _reuse_seed():
    ps.initialize_model_parallel(1)
    tracker = tp.RNGStatesTracker()
    tracker.add("a", 5)
    tracker.add("b", 5)


def test_a_seed_used_twice_is_rejected():
    from megatronish.testing import RankFailed

    with pytest.raises(RankFailed, match="seed 5 is already used"):
        run_distributed(_reuse_seed, 1)
