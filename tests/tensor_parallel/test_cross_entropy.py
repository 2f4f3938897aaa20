"""vocab_parallel_cross_entropy against torch.nn.functional.cross_entropy on the full logits.

Logits are float64 over a padded vocabulary; the reference sees only the true vocabulary
(padding columns must not count). Tolerance 1e-10. Padding is chosen so that at TP 8 some
ranks hold no real column at all.
"""

import pytest
import torch
import torch.nn.functional as F

import megatronish.tensor_parallel as tp
from megatronish import parallel_state as ps
from megatronish.testing import run_distributed

TOL = dict(rtol=1e-10, atol=1e-10)
TOKENS, PADDED, TRUE_VOCAB = (3, 5), 64, 13  # at TP 8, ranks 2..7 hold padding only


def _check(tp_size):
    ps.initialize_model_parallel(tp_size)
    gen = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn(*TOKENS, PADDED, generator=gen, dtype=torch.float64)
    target = torch.randint(0, TRUE_VOCAB, TOKENS, generator=gen)
    grad_loss = torch.rand(*TOKENS, generator=gen, dtype=torch.float64)
    losses = {}
    for smoothing in (0.0, 0.1):
        ref_logits = logits[..., :TRUE_VOCAB].clone().requires_grad_(True)
        ref = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten(), reduction="none",
                              label_smoothing=smoothing).view(TOKENS)
        ref.backward(grad_loss)

        local = logits.chunk(tp_size, dim=-1)[ps.get_tensor_model_parallel_rank()].clone().requires_grad_(True)
        loss = tp.vocab_parallel_cross_entropy(local, target, label_smoothing=smoothing, vocab_size=TRUE_VOCAB)
        assert loss.dtype == torch.float64 and loss.shape == TOKENS
        torch.testing.assert_close(loss, ref.detach(), **TOL)
        loss.backward(grad_loss)
        full_grad = tp.gather_from_tensor_model_parallel_region(local.grad)
        torch.testing.assert_close(full_grad[..., :TRUE_VOCAB], ref_logits.grad, **TOL)
        assert full_grad[..., TRUE_VOCAB:].abs().sum() == 0  # padding columns get no gradient
        losses[smoothing] = loss.detach()

        # A caller that does not compute padding columns passes only this rank's real ones (maybe none).
        share = PADDED // tp_size
        real = min(max(0, TRUE_VOCAB - ps.get_tensor_model_parallel_rank() * share), share)
        narrow = logits.chunk(tp_size, dim=-1)[ps.get_tensor_model_parallel_rank()][..., :real].clone().requires_grad_(True)
        narrow_loss = tp.vocab_parallel_cross_entropy(narrow, target, label_smoothing=smoothing,
                                                      vocab_size=TRUE_VOCAB, partition_vocab_size=share)
        torch.testing.assert_close(narrow_loss, loss.detach(), **TOL)
        narrow_loss.backward(grad_loss)
        torch.testing.assert_close(narrow.grad, local.grad[..., :real], **TOL)
    return losses


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
def test_matches_torch_cross_entropy_with_and_without_label_smoothing(tp_size):
    results = run_distributed(_check, tp_size, args=(tp_size,))
    for losses in results[1:]:  # every rank of the group reports the same loss
        for smoothing in losses:
            torch.testing.assert_close(losses[smoothing], results[0][smoothing], rtol=0, atol=0)


def _low_precision_logits(tp_size):
    ps.initialize_model_parallel(tp_size)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 32, generator=gen).to(torch.bfloat16)
    target = torch.randint(0, 32, (4,), generator=gen)
    local = logits.chunk(tp_size, -1)[ps.get_tensor_model_parallel_rank()]
    loss = tp.vocab_parallel_cross_entropy(local, target)
    ref = F.cross_entropy(logits.double(), target, reduction="none")
    assert loss.dtype == torch.float32  # per-token losses are fp32 whatever the logits are
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    return True


def test_bf16_logits_give_fp32_losses():
    assert all(run_distributed(_low_precision_logits, 2, args=(2,)))


def test_partition_vocab_size_smaller_than_the_logits_is_rejected():
    with pytest.raises(ValueError, match="partition_vocab_size 4 is smaller than the logits' last dim 8"):
        tp.vocab_parallel_cross_entropy(torch.randn(2, 8), torch.zeros(2, dtype=torch.int64), partition_vocab_size=4)


def test_label_smoothing_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"label_smoothing 1.5 must be in \[0, 1\)"):
        tp.vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), label_smoothing=1.5)
