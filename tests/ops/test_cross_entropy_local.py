"""cross_entropy_stats / cross_entropy_backward_ against F.cross_entropy in float64.

The global logits [n, V_padded] are split into TP shards as vocab_parallel_cross_entropy does; the
per-shard stats are combined by hand (the all-reduces of the real caller) and must give the dense
loss; the per-shard in-place backward must give the dense gradient, with zeros in padding columns.
"""

import pytest
import torch
import torch.nn.functional as F

from megatronish import ops

TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def _shards(logits, tp):
    width = logits.size(1) // tp
    return [(rank * width, logits[:, rank * width : (rank + 1) * width].clone()) for rank in range(tp)]


def _combined_loss(logits, target, vocab_size, tp, label_smoothing):
    stats = [ops.cross_entropy_stats(shard, target, start, vocab_size) for start, shard in _shards(logits, tp)]
    for local_max, sum_exp, target_logit, sum_logits in stats:
        assert all(t.dtype == torch.float32 and not torch.isnan(t).any() for t in (local_max, sum_exp, target_logit, sum_logits))
    global_max = torch.stack([s[0] for s in stats]).amax(dim=0)
    sum_exp = sum(s[1] * torch.exp(s[0] - global_max) for s in stats)
    lse = global_max + torch.log(sum_exp)
    target_logit = sum(s[2] for s in stats)
    mean_logit = sum(s[3] for s in stats) / vocab_size
    nll = lse - target_logit
    if not label_smoothing:  # as the real caller: -inf logits make mean_logit -inf, and 0 * inf is NaN
        return nll, lse
    return (1 - label_smoothing) * nll + label_smoothing * (lse - mean_logit), lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n,vocab_size,padded,tp,label_smoothing",
    [
        (7, 50, 50, 1, 0.0),
        (5, 65, 128, 8, 0.0),  # ranks 5..7 own only padding columns
        (9, 65, 128, 8, 0.1),
        (3, 101, 104, 2, 0.2),
    ],
)
def test_sharded_loss_and_gradient_match_dense(dtype, n, vocab_size, padded, tp, label_smoothing):
    logits = (torch.randn(n, padded) * 3).to(dtype)
    logits[:, vocab_size:] = 1e4 if dtype != torch.float16 else 6e4  # padding must never leak in
    target = torch.randint(0, vocab_size, (n,))
    target[0] = vocab_size - 1  # the last real column, next to the padding
    dense = logits[:, :vocab_size].double().requires_grad_()
    dense_loss = F.cross_entropy(dense, target, reduction="none", label_smoothing=label_smoothing)

    loss, lse = _combined_loss(logits, target, vocab_size, tp, label_smoothing)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(loss.double(), dense_loss.detach(), rtol=max(rtol, 1e-5), atol=atol)

    grad_loss = torch.rand(n)
    dense_loss.backward(grad_loss.double())
    shard_grads = []
    for start, shard in _shards(logits, tp):
        returned = ops.cross_entropy_backward_(shard, target, start, vocab_size, lse, grad_loss, label_smoothing)
        assert returned is shard and returned.dtype == dtype  # written in place
        shard_grads.append(shard)
    grad = torch.cat(shard_grads, dim=1)
    assert torch.equal(grad[:, vocab_size:], torch.zeros_like(grad[:, vocab_size:]))
    torch.testing.assert_close(grad[:, :vocab_size].double(), dense.grad, rtol=rtol, atol=atol)


def test_stats_of_a_rank_without_valid_columns():
    logits, target = torch.randn(4, 16), torch.tensor([0, 64, 70, 3])
    local_max, sum_exp, target_logit, sum_logits = ops.cross_entropy_stats(logits, target, 80, 65)
    assert torch.equal(local_max, torch.full((4,), float("-inf")))
    for t in (sum_exp, target_logit, sum_logits):
        assert torch.equal(t, torch.zeros(4))


def test_stats_exclude_padding_and_pick_owned_targets_only():
    logits = torch.randn(3, 8, dtype=torch.float64)
    target = torch.tensor([10, 2, 12])  # row 0: owned column 2; row 1: another rank; row 2: padding id range
    local_max, sum_exp, target_logit, sum_logits = ops.cross_entropy_stats(logits, target, 8, 12)
    valid = logits[:, :4]
    # float64 logits keep float64 statistics (fp16/bf16/fp32 give fp32)
    torch.testing.assert_close(local_max, valid.amax(1))
    torch.testing.assert_close(sum_exp, torch.exp(valid - valid.amax(1, keepdim=True)).sum(1))
    torch.testing.assert_close(target_logit, torch.stack([valid[0, 2], torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)]))
    torch.testing.assert_close(sum_logits, valid.sum(1))


def test_minus_inf_logits_are_excluded_not_nan():
    """Masked-out tokens as -inf logits (some rows wholly on one TP rank) give the dense loss, never NaN."""
    logits = torch.randn(4, 16) * 3
    logits[0, 3:9] = float("-inf")  # part of a row, across both shards
    logits[1, :8] = float("-inf")  # the whole of rank 0's shard of this row
    logits[2, 0] = float("-inf")
    target = torch.tensor([1, 12, 5, 15])  # none is a masked column
    dense = logits.double().requires_grad_()
    dense_loss = F.cross_entropy(dense, target, reduction="none")
    loss, lse = _combined_loss(logits, target, 16, 2, 0.0)
    torch.testing.assert_close(loss.double(), dense_loss.detach(), rtol=1e-5, atol=1e-6)
    dense_loss.backward(torch.ones(4, dtype=torch.float64))
    grads = [ops.cross_entropy_backward_(shard, target, start, 16, lse, torch.ones(4), 0.0)
             for start, shard in _shards(logits, 2)]
    torch.testing.assert_close(torch.cat(grads, dim=1).double(), dense.grad, rtol=1e-5, atol=1e-6)
