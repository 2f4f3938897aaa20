"""Sequoia's tree dynamic program against a brute-force search over every tree, the hardware-aware
choice of the tree size, the forward-time measurement, and TokenTree's checks."""

import itertools
import random

import pytest
import torch

from megatronish import parallel_state
from megatronish.inference import TokenTree
from megatronish.inference.sequoia import best_tree, measure_forward_seconds, plan_tree, step_seconds, tree_values
from megatronish.model import GPTModel, TransformerConfig
from megatronish.testing import run_distributed


def _compositions(total: int, max_parts: int):
    """Ordered ways to write total as a sum of 1..max_parts positive parts (none for total 0)."""
    if total == 0:
        yield ()
        return
    for parts in range(1, max_parts + 1):
        for cuts in itertools.combinations(range(1, total), parts - 1):
            bounds = (0, *cuts, total)
            yield tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _brute_force_best(acceptance, size: int, depth: int) -> float:
    """The most expected tokens over every tree of `size` nodes and depth <= depth, by enumeration."""
    if size == 1:
        return 1.0
    if depth == 0:
        return float("-inf")
    best = float("-inf")
    for sizes in _compositions(size - 1, len(acceptance)):
        value = 1.0 + sum(a * _brute_force_best(acceptance, m, depth - 1) for a, m in zip(acceptance, sizes))
        best = max(best, value)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_program_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    acceptance = [rng.random() * 0.8 for _ in range(rng.choice([1, 2, 3]))]
    if seed % 2 == 0:  # measured rates usually fall with the rank; the DP must not rely on it
        acceptance.sort(reverse=True)
    max_size, max_depth = 8, 4
    value, _ = tree_values(acceptance, max_size, max_depth)
    for depth in range(max_depth + 1):
        for size in range(1, max_size + 1):
            expected = _brute_force_best(acceptance, size, depth)
            assert value[depth, size] == pytest.approx(expected, rel=1e-12, abs=0), (acceptance, size, depth)
            if expected > float("-inf") and (size == 1 or depth > 0):
                tree = best_tree(acceptance, size, depth)
                assert tree.size == size and tree.depth <= depth
                assert tree.expected_tokens(acceptance) == pytest.approx(expected, rel=1e-12)


def test_plan_prefers_big_trees_when_verification_is_free_and_small_ones_when_it_is_not():
    acceptance = [0.6, 0.2, 0.1]
    flat = [1.0] * 16  # a GPU-like target: 16 tokens cost what 1 does
    draft = [0.05] * 16
    big = plan_tree(acceptance, flat, draft, max_depth=6)
    assert big.tree.size >= 12
    linear = [float(n) for n in range(1, 17)]  # every token costs a full forward: speculation cannot pay
    small = plan_tree(acceptance, linear, draft, max_depth=6)
    assert small.tree.size <= 2
    # The plan is the best of the DP's trees by predicted tokens per second.
    for plan, target in ((big, flat), (small, linear)):
        for size in range(1, 17):
            for depth in range(1, 7):
                try:
                    tree = best_tree(acceptance, size, depth)
                except ValueError:
                    continue
                rate = tree.expected_tokens(acceptance) / step_seconds(tree, target, draft)
                assert rate <= plan.tokens_per_second * (1 + 1e-12)


def test_best_tree_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="no tree has 3 nodes and depth at most 0"):
        best_tree([0.5], 3, 0)
    with pytest.raises(ValueError, match="no tree of 5 nodes fits depth 2 with 1 candidates per node"):
        best_tree([0.5], 5, 2)


def test_token_tree_structure_and_checks():
    tree = TokenTree((-1, 0, 0, 1, 1, 2))
    assert tree.children[0] == (1, 2) and tree.depths == (0, 1, 1, 2, 2, 2) and tree.rank(4) == 1
    assert tree.levels() == [[0], [1, 2], [3, 4, 5]] and tree.path(4) == [0, 1, 4]
    mask = tree.ancestor_mask()
    assert mask[4].tolist() == [True, True, False, False, True, False]
    assert TokenTree.chain(3).parents == (-1, 0, 1, 2)
    assert TokenTree.chain(2).expected_tokens([0.5]) == pytest.approx(1 + 0.5 + 0.25)
    for parents in ((0, 0), (-1, 1), (-1, 0, 1, 0)):
        with pytest.raises(ValueError, match="parent"):
            TokenTree(parents)


def _timings():
    parallel_state.initialize_model_parallel(1)
    model = GPTModel(TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=20,
                                       max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0))
    return measure_forward_seconds(model, max_tokens=4, context_length=8, repeats=2)


def test_forward_times_are_measured_for_each_size():
    seconds = run_distributed(_timings, 1)[0]
    assert len(seconds) == 4 and all(0 < s < 10 for s in seconds)
