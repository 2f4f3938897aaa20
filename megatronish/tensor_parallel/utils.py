"""Small helpers shared by the tensor-parallel layers."""

import math

import torch
import torch.distributed as dist

from megatronish import parallel_state


def divide(numerator: int, denominator: int, what: str = "value") -> int:
    """Exact integer division; fails with the values named when it is not exact."""
    if numerator % denominator != 0:
        raise ValueError(
            f"{what} {numerator} is not divisible by the tensor-model-parallel size {denominator}: "
            f"choose a {what} that is a multiple of {denominator}, or a TP size that divides {numerator}"
        )
    return numerator // denominator


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False):
    """Split a tensor into `num_partitions` equal chunks along its last dimension."""
    last_dim_size = divide(tensor.size(-1), num_partitions, "last dimension")
    chunks = torch.split(tensor, last_dim_size, dim=-1)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


class VocabUtility:
    """The [first, last) vocabulary rows that one TP rank owns."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size: int, rank: int, world_size: int):
        first = rank * per_partition_vocab_size
        return first, first + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int, world_size: int):
        per_partition = divide(global_vocab_size, world_size, "vocabulary size")
        return VocabUtility.vocab_range_from_per_partition_vocab_size(per_partition, rank, world_size)


def split_tensor_into_1d_equal_chunks(tensor: torch.Tensor, new_buffer: bool = False, tp_group=None) -> torch.Tensor:
    """This TP rank's 1/tp of the flattened tensor (Megatron-core's name)."""
    group = tp_group or parallel_state.get_tensor_model_parallel_group()
    flat = tensor.reshape(-1)
    size = divide(flat.numel(), group.size(), "tensor size")
    chunk = flat[group.rank() * size:(group.rank() + 1) * size]
    return chunk.clone() if new_buffer else chunk


def gather_split_1d_tensor(tensor: torch.Tensor, tp_group=None) -> torch.Tensor:
    """The inverse of split_tensor_into_1d_equal_chunks: all TP ranks' chunks, flat, in rank order."""
    group = tp_group or parallel_state.get_tensor_model_parallel_group()
    gathered = torch.empty(tensor.numel() * group.size(), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(gathered, tensor.contiguous(), group=group)
    return gathered


def all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    """Sum each tensor over `group` in place with one collective: flatten, all-reduce, copy back."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for tensor, reduced in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(reduced.view_as(tensor))


def init_method_normal(sigma: float):
    """Initialize with N(0, sigma^2)."""
    def init_(tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=sigma)
    return init_


def scaled_init_method_normal(sigma: float, num_layers: int):
    """N(0, (sigma / sqrt(2 num_layers))^2): GPT-2's init for projections into the residual stream."""
    return init_method_normal(sigma / math.sqrt(2.0 * num_layers))


def broadcast_data(keys: list[str], data: dict | None, datatype: torch.dtype) -> dict[str, torch.Tensor]:
    """Send `data[key]` for each key from TP rank 0 to the other ranks of its TP group.

    Only TP rank 0 needs `data` (others may pass None): one broadcast carries the shapes,
    a second the values flattened into a single buffer. Returns the tensors on this rank's device.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    device = parallel_state.get_device()
    is_src = parallel_state.get_tensor_model_parallel_rank() == 0
    max_dims = 8
    sizes = torch.full((len(keys) * max_dims,), -1, dtype=torch.long, device=device)  # -1: no such dim
    if is_src:
        for i, key in enumerate(keys):
            shape = data[key].shape
            if len(shape) > max_dims:
                raise ValueError(f"broadcast_data: {key!r} has {len(shape)} dims; at most {max_dims} are supported")
            if data[key].dtype != datatype:
                raise ValueError(f"broadcast_data: {key!r} has dtype {data[key].dtype}, expected {datatype}")
            sizes[i * max_dims:i * max_dims + len(shape)] = torch.tensor(shape)
    dist.broadcast(sizes, src, group=group)
    shapes = []
    for i in range(len(keys)):
        dims = sizes[i * max_dims:(i + 1) * max_dims].tolist()
        shapes.append(tuple(d for d in dims if d >= 0))
    numels = [math.prod(shape) for shape in shapes]
    if is_src:
        flat = torch.cat([data[key].reshape(-1).to(device) for key in keys])
    else:
        flat = torch.empty(sum(numels), dtype=datatype, device=device)
    dist.broadcast(flat, src, group=group)
    return {key: chunk.view(shape) for key, chunk, shape in zip(keys, flat.split(numels), shapes)}
