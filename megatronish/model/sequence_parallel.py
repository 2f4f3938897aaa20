"""The one extra gradient reduction that sequence parallelism needs."""

import torch
from torch import nn

from megatronish import parallel_state
from megatronish.tensor_parallel import all_reduce_coalesced


def allreduce_sequence_parallel_grads(model: nn.Module) -> None:
    """Sum over the TP group the gradients of parameters marked `sequence_parallel = True`.

    Under sequence parallelism the norms (and learned position embeddings) are replicated on
    every TP rank but each rank applies them to its own sequence shard, so each holds a partial
    gradient. Call this after backward and before gradient clipping / the optimizer step (and
    before or after the data-parallel reduction: the two commute). One all-reduce per dtype;
    nothing happens at TP = 1 or when no parameter is marked.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        all_reduce_coalesced(grads, parallel_state.get_tensor_model_parallel_group())
