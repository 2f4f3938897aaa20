"""megatronish: Megatron-style tensor-parallel GPT training on PyTorch.

Megatron-core's entry points by their names: `from megatronish import ModelParallelConfig, parallel_state,
tensor_parallel` where a module had `from megatron.core import ...`.
"""

from megatronish.model_parallel_config import ModelParallelConfig

__version__ = "0.1.0"
