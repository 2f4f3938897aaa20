"""Full (unsharded, TP-independent) model state, and the simple checkpoint format built on it.

A full state dict maps each parameter name to its whole value, gathered across TP ranks, with
vocabulary padding rows stripped: the same dict comes out at every TP size, and it loads into
a model of any TP size (each rank keeps its slice; padding rows are re-added as zeros).

Checkpoint directory (until the checkpoint issue brings the sharded format):
    config.json   TransformerConfig.to_dict(), including the true vocab_size
    model.pt      torch.save of the full state dict (CPU tensors)
"""

import json
from pathlib import Path

import torch
from torch import nn

from megatronish.model.config import TransformerConfig
from megatronish.tensor_parallel import full_shape, gather_full, shard_of_full

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"


def _unpadded_shape(param: torch.Tensor) -> list[int]:
    shape = list(full_shape(param))
    rows = getattr(param, "unpadded_rows", None)
    if rows is not None:
        shape[0] = rows
    return shape


def _gather_stripped(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    full = gather_full(tensor, like=param)
    rows = getattr(param, "unpadded_rows", None)
    return (full if rows is None else full[:rows]).cpu()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full value on CPU, padding stripped}. A collective: every TP rank must call it."""
    return {name: _gather_stripped(param, param) for name, param in model.named_parameters()}


def full_grad_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full gradient on CPU, padding stripped}, like full_state_dict (for tests and debugging)."""
    missing = [name for name, param in model.named_parameters() if param.grad is None]
    if missing:
        raise ValueError(f"parameters without a gradient: {missing}; run backward first")
    return {name: _gather_stripped(param.grad, param) for name, param in model.named_parameters()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy each rank's slice of the full values in `state` into `model`, re-padding vocabulary rows."""
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}; "
                         "was it saved from a model with a different config?")
    for name, param in params.items():
        value, expected = state[name], _unpadded_shape(param)
        if list(value.shape) != expected:
            raise ValueError(f"{name}: state has shape {list(value.shape)}, the model expects {expected}")
        if list(value.shape) != list(full_shape(param)):  # a vocabulary: add the zero padding rows back
            padded = torch.zeros(full_shape(param), dtype=value.dtype)
            padded[:value.size(0)] = value
            value = padded
        param.copy_(shard_of_full(value.to(param.device), param))


def save_full_checkpoint(directory, config: TransformerConfig, state: dict[str, torch.Tensor]) -> None:
    """Write config.json and model.pt (call on one rank, with the output of full_state_dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    torch.save(state, directory / WEIGHTS_FILE)


def load_full_checkpoint(directory) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a megatronish checkpoint directory "
                                    f"(expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = TransformerConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return config, state
