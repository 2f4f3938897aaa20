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


def _pipeline_view(tp, pp, virtual_pp):
    layout = ps.initialize_model_parallel(tp, pp, virtual_pp)
    view = dict(
        tp_rank=ps.get_tensor_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        tp_ranks=ps.get_tensor_model_parallel_ranks(), dp_ranks=ps.get_data_parallel_ranks(),
        pp_ranks=ps.get_pipeline_model_parallel_ranks(), first=ps.is_pipeline_first_stage(),
        last=ps.is_pipeline_last_stage(), last_ignoring_virtual=ps.is_pipeline_last_stage(ignore_virtual=True),
        next=ps.get_pipeline_model_parallel_next_rank(), prev=ps.get_pipeline_model_parallel_prev_rank(),
        virtual=(ps.get_virtual_pipeline_model_parallel_rank(), ps.get_virtual_pipeline_model_parallel_world_size()),
        model_parallel_size=ps.get_model_parallel_group().size(), embedding=ps.get_embedding_group() is not None,
    )
    assert layout is ps.get_layout() and layout.describe() == f"TP {tp} x PP {pp} (2 virtual stages each) x DP 2"
    return view


def test_pipeline_layout_follows_megatrons_rank_order():
    # 8 ranks, TP 2 x PP 2 x DP 2: rank = tp_rank + 2 (dp_rank + 2 pp_rank); TP adjacent, then DP, then PP.
    for rank, view in enumerate(run_distributed(_pipeline_view, 8, args=(2, 2, 2))):
        tp_rank, dp_rank, pp_rank = rank % 2, (rank // 2) % 2, rank // 4
        assert (view["tp_rank"], view["dp_rank"], view["pp_rank"], view["pp_size"]) == (tp_rank, dp_rank, pp_rank, 2)
        assert view["tp_ranks"] == [rank - tp_rank, rank - tp_rank + 1]
        assert view["dp_ranks"] == [tp_rank + 4 * pp_rank, tp_rank + 2 + 4 * pp_rank]
        assert view["pp_ranks"] == [tp_rank + 2 * dp_rank, tp_rank + 2 * dp_rank + 4]
        other_stage = view["pp_ranks"][1 - pp_rank]
        assert view["next"] == view["prev"] == other_stage  # two stages: the ring's neighbours coincide
        # Virtual chunk 0 runs first: the first stage is "first", no stage is "last" until the last chunk runs.
        assert (view["first"], view["last"], view["last_ignoring_virtual"]) == (pp_rank == 0, False, pp_rank == 1)
        assert view["virtual"] == (0, 2)
        assert view["model_parallel_size"] == 4 and view["embedding"]


def test_pipeline_size_not_dividing_the_world_names_both_sizes():
    with pytest.raises(RankFailed, match=r"world size 2 is not divisible by tensor-model-parallel size 1 x "
                                         r"pipeline-model-parallel size 4 = 4"):
        run_distributed(ps.initialize_model_parallel, 2, args=(1, 4))


def test_parallel_dims_reject_virtual_stages_without_a_pipeline():
    from megatronish.parallel_layout import ParallelDims

    assert ParallelDims.for_world(12, tp=2, pp=3) == ParallelDims(2, 3, 2)
    with pytest.raises(ValueError, match="virtual pipeline size 2 needs pipeline parallelism"):
        ParallelDims(tp=2, pp=1, dp=1, virtual_pp=2)
    with pytest.raises(ValueError, match="tp size must be a positive integer, got 0"):
        ParallelDims(tp=0)


def test_a_single_process_needs_no_port(tmp_path):
    """Tools run as plain `python` (a world of one) start even when torchrun's default port is taken."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    code = ("from megatronish import parallel_state as ps; ps.initialize_distributed(); "
            "ps.initialize_model_parallel(1); print('world', ps.get_data_parallel_world_size())")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT", "MASTER_ADDR")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", 29500))
            taken.listen()
        except OSError:
            pass  # already taken by someone else: the point holds all the more
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world 1" in proc.stdout
