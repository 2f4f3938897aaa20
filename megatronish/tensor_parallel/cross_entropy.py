"""Cross entropy over logits whose vocabulary dimension is split across TP ranks.

Each rank reduces its own columns to four numbers per token (max, sum of exponentials
relative to that max, the target's logit if it owns it, the sum of logits), and two
all-reduces combine them:
    M   = max_r m_r
    S   = sum_r s_r exp(m_r - M)          log-sum-exp = M + log S
    loss = (1 - eps) (lse - x_target) + eps (lse - sum_j x_j / V)
The last term is label smoothing: the mean of -log p_j over the true vocabulary of size V.
Summing it across ranks before dividing by the global V gives the same loss at every TP size
(Megatron's own version averages per rank, which changes with TP).

Columns past the true vocabulary (padding added so the vocabulary divides by TP) are
excluded from the softmax, so TP=1 and TP=k compute identical losses.

`megatron_label_smoothing=True` gives Megatron-core's own formula instead, for comparing losses with
Megatron: s = eps V_r / (V_r - 1) and loss = (1 - s) (lse - x_target) - s mean_{j on this rank} log p_j,
with V_r this rank's (real) vocabulary columns, so the loss depends on the TP size and the rank.
"""

import torch

from megatronish import ops, parallel_state
from megatronish.tensor_parallel.mappings import all_reduce_in_tensor_model_parallel_group
from megatronish.tensor_parallel.utils import VocabUtility


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, label_smoothing, vocab_size, partition_vocab_size, tp_group,
                megatron_label_smoothing=False):
        tp, rank = tp_group.size(), tp_group.rank()
        partition_vocab = vocab_parallel_logits.size(-1) if partition_vocab_size is None else partition_vocab_size
        vocab_start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(partition_vocab, rank, tp)
        vocab_size = partition_vocab * tp if vocab_size is None else vocab_size

        # [tokens, width]; the width is 0 on a rank whose share is all padding the caller skipped
        logits_2d = vocab_parallel_logits.reshape(target.numel(), vocab_parallel_logits.size(-1))
        target_1d = target.reshape(-1)
        local_max, sum_exp, target_logit, sum_logits = ops.cross_entropy_stats(
            logits_2d, target_1d, vocab_start, vocab_size)
        local_sum_logits = sum_logits

        if tp > 1:
            global_max = all_reduce_in_tensor_model_parallel_group(local_max, "max", tp_group)
            # A rank with no valid columns has local_max = -inf and sum_exp = 0: contributes 0.
            sum_exp = torch.where(sum_exp > 0, sum_exp * torch.exp(local_max - global_max), torch.zeros_like(sum_exp))
            sums = all_reduce_in_tensor_model_parallel_group(torch.stack([sum_exp, target_logit, sum_logits]),
                                                             group=tp_group)
            sum_exp, target_logit, sum_logits = sums.unbind(0)
        else:  # one rank: its statistics are the global ones
            global_max = local_max
        lse = global_max + torch.log(sum_exp)

        loss = lse - target_logit
        ctx.correction = 0.0
        if label_smoothing > 0 and megatron_label_smoothing:
            local_columns = max(0, min(logits_2d.size(1), vocab_size - vocab_start))
            label_smoothing = label_smoothing * local_columns / (local_columns - 1)
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - local_sum_logits / local_columns)
            # the backward kernel spreads eps over the whole vocabulary: move it onto this rank's columns
            ctx.correction = label_smoothing * (1.0 / vocab_size - 1.0 / local_columns)
        elif label_smoothing > 0:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_logits / vocab_size)

        ctx.save_for_backward(logits_2d, target_1d, lse)
        ctx.vocab_start, ctx.vocab_size, ctx.label_smoothing = vocab_start, vocab_size, label_smoothing
        ctx.logits_shape = vocab_parallel_logits.shape
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits_2d, target_1d, lse = ctx.saved_tensors
        # The gradient is written over the saved logits: no second logits-sized buffer.
        grad_rows = grad_loss.reshape(-1).to(lse.dtype)
        grad = ops.cross_entropy_backward_(
            logits_2d, target_1d, ctx.vocab_start, ctx.vocab_size, lse, grad_rows, ctx.label_smoothing)
        if ctx.correction:
            columns = max(0, min(grad.size(1), ctx.vocab_size - ctx.vocab_start))
            grad[:, :columns] += ctx.correction * grad_rows[:, None].to(grad.dtype)
        return grad.view(ctx.logits_shape), None, None, None, None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0, vocab_size: int | None = None,
                                 partition_vocab_size: int | None = None, tp_group=None,
                                 megatron_label_smoothing: bool = False) -> torch.Tensor:
    """Per-token fp32 losses for logits [..., vocab / tp] and global target ids [...].

    `vocab_size` is the true (unpadded) vocabulary; columns past it are ignored. It defaults
    to the full padded width. `partition_vocab_size` is each rank's share of the padded
    vocabulary when the logits hold only its first columns (a caller that skips computing
    padding columns); it defaults to the logits' width. `tp_group` is the group the vocabulary is
    split over (default: the current layout's TP group). Note: backward overwrites
    `vocab_parallel_logits` with its gradient (as Megatron does) to save memory; clone the
    logits if you still need them.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing {label_smoothing} must be in [0, 1)")
    width = vocab_parallel_logits.size(-1)
    if partition_vocab_size is not None and partition_vocab_size < width:
        raise ValueError(f"partition_vocab_size {partition_vocab_size} is smaller than the logits' last dim {width}: "
                         "pass each rank's full (padded) share of the vocabulary, or leave it out")
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, float(label_smoothing), vocab_size,
                                            partition_vocab_size,
                                            tp_group or parallel_state.get_tensor_model_parallel_group(),
                                            megatron_label_smoothing)
