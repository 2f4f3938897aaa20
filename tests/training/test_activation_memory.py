"""SavedTensorBytes counts the activations autograd keeps for backward: once per storage, not parameters."""

import torch

from megatronish.training.activation_memory import SavedTensorBytes


def test_counts_saved_activations_once_per_storage_and_releases_them():
    x = torch.randn(64, 32, requires_grad=True)
    w1, w2 = torch.randn(32, 48, requires_grad=True), torch.randn(48, 16, requires_grad=True)
    counter = SavedTensorBytes(exclude=[w1, w2])
    with counter:
        hidden = torch.relu(x @ w1)      # saves x (for w1's gradient) and relu's output
        loss = (hidden @ w2).sum()       # saves hidden again (same storage: not counted twice) and w2 (excluded)
    expected = x.numel() * 4 + hidden.numel() * 4
    assert counter.live == counter.peak == expected
    loss.backward()
    del loss, hidden  # the graph is gone: nothing is held any more
    assert counter.live == 0 and counter.peak == expected
