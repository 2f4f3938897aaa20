"""Overlapping evaluation windows over one long token stream (Megatron's --overlapping-eval).

A text of T tokens has T - 1 targets (token k is predicted from tokens 0..k-1). A model sees at
most `seq_length` tokens at once, so the stream is cut into windows of `seq_length + 1` tokens
(inputs = the first seq_length, labels = the last seq_length) that start every `stride` tokens:

    window i holds tokens [i * stride, i * stride + seq_length + 1), padded with EOD at the end
    window 0 scores all its targets; window i > 0 scores only its last `stride` targets

so every target is scored exactly once, and every target after the first window has at least
seq_length - stride tokens of context. Padding is never scored. The number of windows is
Megatron's, max(ceil(max(T - 1 - stride, 0) / stride) + 1, 1); when stride < seq_length the
last few of them may hold nothing but padding in their scored part, and score nothing.
"""

import math

import torch


def check_window_options(seq_length: int, stride: int) -> None:
    if seq_length < 1:
        raise ValueError(f"--seq-length must be >= 1, got {seq_length}")
    if not 1 <= stride <= seq_length:
        raise ValueError(f"--overlapping-eval {stride} must be between 1 and --seq-length {seq_length}: "
                         "a larger stride would leave targets between windows unscored")


def num_windows(num_tokens: int, stride: int) -> int:
    targets_after_first = max(num_tokens - 1 - stride, 0)
    return max(math.ceil(targets_after_first / stride) + 1, 1)


def window_start(index: int, stride: int) -> int:
    """The position in the stream of window `index`'s first token."""
    return index * stride


def make_window(tokens: torch.Tensor, index: int, seq_length: int, stride: int,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(window tokens [seq_length + 1], loss mask [seq_length]) of window `index` of a 1-D stream.

    Target j of the window (label = window[j + 1]) is the stream's target start + j + 1; the mask
    is True where that target is scored by this window.
    """
    start = window_start(index, stride)
    window = tokens[start:start + seq_length + 1]
    real = window.numel()  # tokens before the EOD padding
    if real < seq_length + 1:
        window = torch.cat([window, window.new_full((seq_length + 1 - real,), pad_id)])
    mask = torch.zeros(seq_length, dtype=torch.bool)
    first_scored = 0 if index == 0 else seq_length - stride
    mask[first_scored:max(real - 1, 0)] = True  # label j is real iff j + 1 < real
    return window, mask
