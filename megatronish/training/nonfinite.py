"""Stopping a run whose loss or gradients are no longer finite, before it saves a broken checkpoint.

A non-finite step is never applied (the optimizer skips it, as fp16's loss scaling always did),
but once the weights themselves are non-finite, or the data makes every loss NaN, the run
would go on to the end, exit 0, save NaN checkpoints and let --keep-last delete the healthy
ones. Counted here: iterations whose lm loss is not finite, and (without fp16, whose scaler
handles overflowing gradients) whose gradient norm is not finite. After --max-nan-iterations
such iterations in a row the run stops with an error (Megatron's --check-for-nan-in-loss-and-grad
stops at the first). No checkpoint is saved while the newest iteration is non-finite or any
weight is (an update can overflow the weights after a finite loss, e.g. fp16 ones).
"""

import math

import torch
import torch.distributed as dist

from megatronish import parallel_state


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: too many non-finite iterations in a row."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int, fp16: bool):
        self.max_in_a_row, self.fp16 = max_in_a_row, fp16
        self.in_a_row, self.first, self.last = 0, None, None

    @property
    def healthy(self) -> bool:
        """The newest iteration was finite: its state may be saved."""
        return self.in_a_row == 0

    @property
    def exhausted(self) -> bool:
        """The limit is reached (never with --max-nan-iterations 0)."""
        return bool(self.max_in_a_row) and self.in_a_row >= self.max_in_a_row

    def update(self, iteration: int, loss: float, grad_norm: float | None) -> None:
        finite = math.isfinite(loss) and (self.fp16 or grad_norm is None or math.isfinite(grad_norm))
        self.in_a_row = 0 if finite else self.in_a_row + 1
        self.first = None if finite else (self.first or iteration)
        self.last = (iteration, loss, grad_norm)

    def error(self) -> NonFiniteTrainingError:
        iteration, loss, grad_norm = self.last
        return NonFiniteTrainingError(
            f"the lm loss or gradient norm was not finite in {self.in_a_row} iteration(s) in a row "
            f"({self.first}-{iteration}; last loss {loss}, grad norm {grad_norm}): stopping without saving them; "
            "the newest checkpoint is the last healthy state. Lower --lr, check the data, or raise "
            "--max-nan-iterations to let the run skip more such steps")


@torch.no_grad()
def parameters_are_finite(model_chunks) -> bool:
    """Whether every weight of every rank is finite (a collective over the world)."""
    bad = torch.zeros(1, device=parallel_state.get_device())
    for chunk in model_chunks:
        for param in chunk.parameters():
            bad += (~torch.isfinite(param)).any()
    parallel_state.all_reduce_in_group(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0
