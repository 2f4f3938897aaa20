"""The GPT model on tensor-parallel layers.

    from megatronish.model import GPTModel, TransformerConfig
"""

from megatronish.model.config import TransformerConfig
from megatronish.model.full_state import (
    full_grad_dict,
    full_state_dict,
    load_full_checkpoint,
    load_full_state_dict,
    save_full_checkpoint,
)
from megatronish.model.gpt_model import GPTModel
from megatronish.model.sequence_parallel import allreduce_sequence_parallel_grads

__all__ = [
    "GPTModel",
    "TransformerConfig",
    "allreduce_sequence_parallel_grads",
    "full_grad_dict",
    "full_state_dict",
    "load_full_checkpoint",
    "load_full_state_dict",
    "save_full_checkpoint",
]
