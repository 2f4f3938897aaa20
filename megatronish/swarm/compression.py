"""8-bit blockwise quantization of the tensors SWARM sends between peers (--compression blockwise8).

Each block of BLOCK consecutive values is scaled by its largest magnitude and rounded to int8:
one byte per value plus one fp32 scale per block, about a quarter of the fp32 bytes, with an error
of at most half a step (|x|max / 254) per value. It is the absmax variant of the blockwise
quantization that hivemind's BLOCKWISE_8BIT applies through bitsandbytes; that one needs
bitsandbytes and, in hivemind 1.1.12, fails to decode under NumPy 2 (`int()` of a one-element
array), so the quantization here is plain torch.
"""

import torch

BLOCK = 4096


def quantize_blockwise(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like `tensor`, fp32 scale per BLOCK values): code = round(x / scale),
    scale = the block's largest |x| / 127."""
    flat = tensor.detach().float().reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1) / 127.0
    codes = torch.round(padded / scales.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1))
    return codes.to(torch.int8).view(-1)[:flat.numel()].view(tensor.shape), scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = codes.reshape(-1).float()
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK) * scales.unsqueeze(1)
    return padded.view(-1)[:flat.numel()].view(codes.shape).to(dtype)


def roundtrip(tensor: torch.Tensor, compression: str) -> torch.Tensor:
    """What the receiver of `Lossy(tensor)` gets under `compression` (a peer uses it for its own gradient
    part, so that every peer of a stage sums the same values)."""
    if compression == "none" or not tensor.is_floating_point():
        return tensor
    return dequantize_blockwise(*quantize_blockwise(tensor), tensor.dtype)
