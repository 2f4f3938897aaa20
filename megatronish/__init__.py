"""megatronish: Megatron-style tensor-parallel GPT training on PyTorch."""

__version__ = "0.1.0"
