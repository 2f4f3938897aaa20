import pytest
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
