"""How items are dealt to ranks: each to exactly one DP group, the same ones to the TP ranks of a
group; sums go over DP only."""

import pytest
import torch

from megatronish import parallel_state
from megatronish.evaluation.scoring import data_parallel_share, sum_over_data_parallel
from megatronish.testing import run_distributed


def _shares(tp, num_items):
    parallel_state.initialize_model_parallel(tp)
    share = list(data_parallel_share(num_items))
    (total,) = sum_over_data_parallel(torch.tensor(float(len(share))))
    return parallel_state.get_tensor_model_parallel_ranks(), share, total


@pytest.mark.parametrize("world_size, tp", [(4, 2), (4, 1)])
@pytest.mark.parametrize("num_items", [0, 1, 7, 8])
def test_every_item_to_one_dp_group(world_size, tp, num_items):
    results = run_distributed(_shares, world_size, args=(tp, num_items))
    seen = []
    for rank, (tp_ranks, share, total) in enumerate(results):
        assert total == num_items  # the DP all-reduce adds each DP group's count once
        for peer in tp_ranks:
            assert results[peer][1] == share, f"TP peers {rank} and {peer} see different items"
        if rank == tp_ranks[0]:
            seen += share
    assert sorted(seen) == list(range(num_items))
