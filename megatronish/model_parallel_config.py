"""ModelParallelConfig: the parallelism and precision settings Megatron-core's layers take as `config=`.

A module written for `megatron.core.tensor_parallel` passes one of these (or a TransformerConfig, which
carries the same fields) to ColumnParallelLinear, RowParallelLinear and VocabParallelEmbedding. The layers
read what exists here; Megatron's CUDA tuning fields are accepted for compatibility and change nothing.
"""

from dataclasses import dataclass

import torch


@dataclass
class ModelParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    perform_initialization: bool = True     # draw weights with init_method (False: leave them for a loader)
    use_cpu_initialization: bool = False    # the full weight is always drawn on the CPU here (TP-invariant)
    params_dtype: torch.dtype = torch.float32
    fp16: bool = False
    bf16: bool = False
    # Megatron's CUDA tuning knobs: accepted, no effect here
    gradient_accumulation_fusion: bool = False
    async_tensor_model_parallel_allreduce: bool = False
    tp_comm_overlap: bool = False
    deterministic_mode: bool = False

    def __post_init__(self):
        for name in ("context_parallel_size", "expert_model_parallel_size"):
            if getattr(self, name) != 1:
                raise ValueError(f"{name} {getattr(self, name)} is not supported: megatronish has no context or "
                                 "expert parallelism (use 1)")
