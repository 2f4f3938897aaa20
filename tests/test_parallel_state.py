import pytest
import torch
import torch.distributed as dist

from megatronish import parallel_state as ps
from megatronish.testing import RankFailed, run_distributed


def _layout(tp_sizes):
    """For each TP size: this rank's (tp rank, tp ranks, dp rank, dp ranks, sizes)."""
    rows = []
    for tp in tp_sizes:
        ps.initialize_model_parallel(tp)
        rows.append((
            ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_ranks(),
            ps.get_data_parallel_rank(), ps.get_data_parallel_ranks(),
            ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(),
            ps.get_tensor_model_parallel_src_rank(), ps.model_parallel_is_initialized(),
        ))
        ps.destroy_model_parallel()
        assert not ps.model_parallel_is_initialized()
    return rows


def test_tp_groups_are_adjacent_and_dp_groups_strided():
    world, tp_sizes = 8, [1, 2, 4, 8]
    results = run_distributed(_layout, world, args=(tp_sizes,))
    for rank, rows in enumerate(results):
        for tp, (tp_rank, tp_ranks, dp_rank, dp_ranks, tp_size, dp_size, src, initialized) in zip(tp_sizes, rows):
            first = rank - rank % tp
            assert tp_ranks == list(range(first, first + tp))
            assert dp_ranks == list(range(rank % tp, world, tp))
            assert (tp_rank, dp_rank, tp_size, dp_size, src) == (rank % tp, rank // tp, tp, world // tp, first)
            assert initialized


def _init(tp):
    ps.initialize_model_parallel(tp)


def test_world_size_not_divisible_by_tp_names_both_values():
    with pytest.raises(RankFailed, match=r"world size 3 is not divisible by tensor-model-parallel size 2"):
        run_distributed(_init, 3, args=(2,))


def _getter_before_init():
    ps.get_tensor_model_parallel_world_size()


def test_getters_before_initialize_say_what_to_call():
    with pytest.raises(RankFailed, match=r"model parallel is not initialized: call .*initialize_model_parallel"):
        run_distributed(_getter_before_init, 1)


def test_initialize_model_parallel_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        ps.initialize_model_parallel(1)


def test_default_backend_and_device_without_gpu():
    # This machine (and CI) has no GPU: the automatic choice must be gloo on the CPU.
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU choice")
    assert ps.default_backend() == "gloo"
    assert ps.default_device("gloo").type == "cpu"
    with pytest.raises(RuntimeError, match="use --distributed-backend gloo"):
        ps.initialize_distributed("nccl")


def _all_reduce_in_groups(tp):
    """Sum and max of rank-dependent values over the TP group, the DP group and the world; count gloo calls."""
    ps.initialize_model_parallel(tp)
    calls = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or real_all_reduce(*args, **kwargs)
    try:
        rank = float(dist.get_rank())
        out = []
        for group in (ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(), None):
            total, largest = torch.tensor([rank]), torch.tensor([rank])
            ps.all_reduce_in_group(total, group)
            ps.all_reduce_in_group(largest, group, op=dist.ReduceOp.MAX)
            out.append((total.item(), largest.item()))
    finally:
        dist.all_reduce = real_all_reduce
    return out, len(calls)


def test_all_reduce_in_group_reduces_and_skips_groups_of_one_rank():
    # 2 ranks, TP 2: the TP group and the world hold both ranks, each DP group one rank.
    for rank, (results, gloo_calls) in enumerate(run_distributed(_all_reduce_in_groups, 2, args=(2,))):
        assert results == [(1.0, 1.0), (float(rank), float(rank)), (1.0, 1.0)]
        assert gloo_calls == 4  # TP and world, sum and max; none for the one-rank DP group
