"""The global gradient norm, each parameter counted exactly once, and clipping by it.

Across TP ranks a sharded parameter's gradient is split (every rank adds its part) while a
replicated one is whole on every rank (only TP rank 0 adds it). Tied parameters are one
tensor and appear once. With the distributed optimizer each DP rank holds a different slice
of the gradients, so the sum of squares is reduced over TP and DP; otherwise DP replicas hold
the same gradients and the sum is reduced over TP only.
"""

import torch
import torch.distributed as dist

from megatronish import parallel_state


def global_grad_norm(grads_counted: list[torch.Tensor], group: dist.ProcessGroup | None,
                     device: torch.device) -> float:
    """sqrt(sum of squares) of the gradients this rank counts, summed over `group` (None: the world)."""
    if grads_counted:
        sum_sq = torch.stack(torch._foreach_norm(grads_counted, 2.0)).float().square().sum()
    else:
        sum_sq = torch.zeros((), dtype=torch.float32, device=device)
    parallel_state.all_reduce_in_group(sum_sq, group)
    return sum_sq.sqrt().item()


@torch.no_grad()
def clip_grads_by_norm_(grads: list[torch.Tensor], total_norm: float, max_norm: float) -> None:
    """Scale every gradient by max_norm / total_norm when the norm exceeds max_norm (Megatron's rule)."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)
