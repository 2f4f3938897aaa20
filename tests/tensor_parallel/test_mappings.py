"""Forward and backward of each communication op against what a single process computes.

Every rank draws its tensors from a generator seeded by its rank, so each rank can
rebuild what the others hold and compute the expected result locally. Values are float64
and the ops only move or add them: tolerance 1e-12.
"""

import pytest
import torch

import megatronish.tensor_parallel as tp
from megatronish import parallel_state as ps
from megatronish.testing import run_distributed

TOL = dict(rtol=1e-12, atol=1e-12)
SHAPE = (8, 3, 16)  # [s, b, h]: divisible by every TP size tested


def _tensor(kind, rank, shape=SHAPE):
    g = torch.Generator().manual_seed(hash((kind, rank)) % (2 ** 31))
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _run_op(op, x, grad):
    x = x.clone().requires_grad_(True)
    y = op(x)
    y.backward(grad)
    return y.detach(), x.grad


def _check_all_ops(tp_size):
    ps.initialize_model_parallel(tp_size)
    rank, n = ps.get_tensor_model_parallel_rank(), tp_size
    group_base = ps.get_tensor_model_parallel_src_rank()
    xs = [_tensor("x", group_base + r) for r in range(n)]  # every rank's input
    gs = [_tensor("g", group_base + r) for r in range(n)]  # every rank's upstream gradient
    x, g = xs[rank], gs[rank]
    sum_x, sum_g = sum(xs), sum(gs)

    def chunk(t, dim):
        return t.chunk(n, dim=dim)[rank]

    y, dx = _run_op(tp.copy_to_tensor_model_parallel_region, x, g)
    torch.testing.assert_close(y, x, **TOL)
    torch.testing.assert_close(dx, sum_g, **TOL)

    y, dx = _run_op(tp.reduce_from_tensor_model_parallel_region, x, g)
    torch.testing.assert_close(y, sum_x, **TOL)
    torch.testing.assert_close(dx, g, **TOL)

    y, dx = _run_op(tp.scatter_to_tensor_model_parallel_region, x, chunk(g, -1))
    torch.testing.assert_close(y, chunk(x, -1), **TOL)
    torch.testing.assert_close(dx, torch.cat([gs[r].chunk(n, -1)[r] for r in range(n)], -1), **TOL)

    y, dx = _run_op(tp.gather_from_tensor_model_parallel_region, x, torch.cat(gs, -1))
    torch.testing.assert_close(y, torch.cat(xs, -1), **TOL)
    torch.testing.assert_close(dx, chunk(torch.cat(gs, -1), -1), **TOL)

    y, dx = _run_op(tp.scatter_to_sequence_parallel_region, x, chunk(g, 0))
    torch.testing.assert_close(y, chunk(x, 0), **TOL)
    torch.testing.assert_close(dx, torch.cat([gs[r].chunk(n, 0)[r] for r in range(n)], 0), **TOL)

    # all-gather along the sequence; each rank's output gradient is a partial sum -> reduce-scatter
    y, dx = _run_op(tp.gather_from_sequence_parallel_region, x, torch.cat([g] * n, 0))
    torch.testing.assert_close(y, torch.cat(xs, 0), **TOL)
    torch.testing.assert_close(dx, sum_g, **TOL)

    # ... or, when the gathered tensor fed replicated work, just this rank's slice
    full_g = torch.cat(gs, 0)
    y, dx = _run_op(lambda t: tp.gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=False), x, full_g)
    torch.testing.assert_close(dx, gs[rank], **TOL)

    y, dx = _run_op(tp.reduce_scatter_to_sequence_parallel_region, x, chunk(g, 0))
    torch.testing.assert_close(y, chunk(sum_x, 0), **TOL)
    torch.testing.assert_close(dx, torch.cat([gs[r].chunk(n, 0)[r] for r in range(n)], 0), **TOL)
    return True


@pytest.mark.parametrize("world,tp_size", [(1, 1), (2, 2), (4, 4), (8, 8), (8, 2)])
def test_communication_ops_forward_and_backward(world, tp_size):
    assert all(run_distributed(_check_all_ops, world, args=(tp_size,)))


def _broadcast(tp_size):
    ps.initialize_model_parallel(tp_size)
    src = ps.get_tensor_model_parallel_src_rank()
    expected = {"tokens": (torch.arange(12).view(3, 4) + src), "labels": torch.arange(5) * src}
    data = expected if ps.get_tensor_model_parallel_rank() == 0 else None
    got = tp.broadcast_data(["tokens", "labels"], data, torch.int64)
    return all(torch.equal(got[k], expected[k]) for k in expected)


def test_broadcast_data_sends_tp_rank_zeros_batch_to_its_group():
    assert all(run_distributed(_broadcast, 4, args=(2,)))
