"""Overlapping windows: every target of a token stream is scored exactly once, padding never.

Random streams of several lengths (shorter than one window, exactly one window, many windows)
and several (seq_length, stride) pairs; the check rebuilds each scored target's stream index
from the window and compares the token there.
"""

import math

import pytest
import torch

from megatronish.evaluation.windows import check_window_options, make_window, num_windows

PAD = -1  # not a token id, so that a scored pad would show


def _scored_targets(tokens, seq_length, stride):
    """{stream index of each scored target: times scored}, checking each label against the stream."""
    counts = {}
    for index in range(num_windows(tokens.numel(), stride)):
        window, mask = make_window(tokens, index, seq_length, stride, PAD)
        assert window.shape == (seq_length + 1,) and mask.shape == (seq_length,)
        start = index * stride
        assert torch.equal(window[:min(seq_length + 1, tokens.numel() - start)], tokens[start:start + seq_length + 1])
        for j in mask.nonzero().flatten().tolist():
            target = start + j + 1
            assert window[j + 1] != PAD and window[j + 1] == tokens[target]
            counts[target] = counts.get(target, 0) + 1
    return counts


@pytest.mark.parametrize("seq_length, stride", [(16, 4), (16, 16), (16, 1), (15, 4), (8, 7)])
def test_every_target_scored_exactly_once(seq_length, stride):
    generator = torch.Generator().manual_seed(seq_length * 100 + stride)
    lengths = [1, 2, 3, seq_length, seq_length + 1, seq_length + 2, seq_length + stride + 1, 5 * seq_length + 3]
    lengths += torch.randint(2, 12 * seq_length, (6,), generator=generator).tolist()
    for length in lengths:
        tokens = torch.randint(0, 1000, (length,), generator=generator)
        counts = _scored_targets(tokens, seq_length, stride)
        assert sorted(counts) == list(range(1, length)), f"T={length}"
        assert set(counts.values()) <= {1}, f"T={length}: a target scored twice"


@pytest.mark.parametrize("seq_length, stride", [(16, 4), (16, 16), (12, 5)])
def test_later_windows_keep_the_promised_context(seq_length, stride):
    tokens = torch.arange(7 * seq_length)
    for index in range(1, num_windows(tokens.numel(), stride)):
        _, mask = make_window(tokens, index, seq_length, stride, PAD)
        scored = mask.nonzero().flatten()
        if scored.numel():  # a target at window position j has j + 1 tokens of context
            assert scored.min() + 1 >= seq_length - stride + 1


def test_number_of_windows_is_megatrons():
    for tokens, stride, expected in [(0, 4, 1), (1, 4, 1), (5, 4, 1), (6, 4, 2), (9, 4, 2), (10, 4, 3), (100, 32, 4)]:
        assert num_windows(tokens, stride) == expected
        assert expected == max(math.ceil(max(tokens - 1 - stride, 0) / stride) + 1, 1)


def test_window_zero_scores_all_its_targets_and_padding_is_masked():
    tokens = torch.arange(10, 16)  # 6 tokens, 5 targets, one window of 8
    window, mask = make_window(tokens, 0, 8, 2, PAD)
    assert window.tolist() == [10, 11, 12, 13, 14, 15, PAD, PAD, PAD]
    assert mask.tolist() == [True] * 5 + [False] * 3


@pytest.mark.parametrize("seq_length, stride, match", [(0, 1, "--seq-length must be >= 1"),
                                                       (8, 0, "--overlapping-eval 0 must be between 1"),
                                                       (8, 9, "--overlapping-eval 9 must be between 1 and --seq-length 8")])
def test_bad_options(seq_length, stride, match):
    with pytest.raises(ValueError, match=match):
        check_window_options(seq_length, stride)
