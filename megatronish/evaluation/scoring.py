"""The distributed side of evaluation: which items a rank scores, the model calls, the sums.

Items (windows, examples) are dealt round-robin to the data-parallel ranks, item i to DP rank
i % DP, so each is scored exactly once; the TP ranks of one DP group get the same items and
run the model together. Sums are kept in float64 and all-reduced over the DP group.
"""

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatronish import parallel_state
from megatronish.tensor_parallel import gather_from_tensor_model_parallel_region


def data_parallel_share(num_items: int) -> range:
    """The indices of the items this rank's DP group scores."""
    return range(parallel_state.get_data_parallel_rank(), num_items,
                 parallel_state.get_data_parallel_world_size())


def micro_batches(indices: range, micro_batch_size: int, description: str, show_progress: bool):
    """Chunks of `indices`, with a progress bar (counted in items) on global rank 0."""
    bar = tqdm(total=len(indices), desc=description, unit="item",
               disable=not show_progress or dist.get_rank() != 0)
    with bar:
        for first in range(0, len(indices), micro_batch_size):
            chunk = indices[first:first + micro_batch_size]
            yield chunk
            bar.update(len(chunk))


def sum_over_data_parallel(*values: torch.Tensor) -> list[float]:
    """Each float64 value summed over the DP ranks."""
    totals = torch.stack([v.to(torch.float64) for v in values]).to(parallel_state.get_device())
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return totals.tolist()


@torch.no_grad()
def token_losses(model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token fp32 losses [b, s] of predicting tokens[:, 1:] from tokens[:, :-1] ([b, s + 1])."""
    tokens = tokens.to(parallel_state.get_device())
    return model(tokens[:, :-1], labels=tokens[:, 1:])


@torch.no_grad()
def greedy_predictions(model, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The most likely next token at `positions` (a [b, s] bool mask) of inputs [b, s], as a 1-D tensor.

    Only the selected rows of the vocab-parallel logits are gathered across TP, so memory stays
    at b * s * V / tp; padding columns of the vocabulary are never chosen.
    """
    device = parallel_state.get_device()
    logits = model(inputs.to(device))[positions.to(device)]  # [n, V_padded / tp]
    logits = gather_from_tensor_model_parallel_region(logits)[:, :model.config.vocab_size]
    return logits.argmax(dim=-1).cpu()
