"""Mixed-precision AdamW, the distributed (DP-sharded) optimizer, DP gradient reduction, LR schedule."""

from megatronish.optimizer.clip_grads import clip_grads_by_norm_, global_grad_norm
from megatronish.optimizer.distributed_data_parallel import Bucket, DistributedDataParallel, unwrap_model
from megatronish.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatronish.optimizer.optimizer import (
    DistributedOptimizer,
    MixedPrecisionOptimizer,
    OptimizerConfig,
    counted_in_grad_norm,
    uses_weight_decay,
)
from megatronish.optimizer.param_scheduler import OptimizerParamScheduler


def get_megatron_optimizer(model: DistributedDataParallel | list[DistributedDataParallel], config: OptimizerConfig, *,
                           fp16: bool = False,
                           loss_scale: float | None = None, initial_loss_scale: float = 2.0**32,
                           min_loss_scale: float = 1.0, loss_scale_window: int = 1000, hysteresis: int = 2):
    """The optimizer that matches the model wrapper: distributed if the DDP wrapper shards, plain otherwise.
    `model` is one DDP-wrapped model, or the list of a pipeline stage's model chunks.

    fp16 gets a loss scaler: constant with `loss_scale`, dynamic otherwise. bf16/fp32 need none.
    """
    grad_scaler = None
    if fp16:
        grad_scaler = (ConstantGradScaler(loss_scale) if loss_scale else
                       DynamicGradScaler(initial_loss_scale, min_loss_scale, growth_interval=loss_scale_window,
                                         hysteresis=hysteresis))
    first = model[0] if isinstance(model, list) else model
    cls = DistributedOptimizer if first.use_distributed_optimizer else MixedPrecisionOptimizer
    return cls(model, config, grad_scaler)


__all__ = [name for name in dir() if not name.startswith("_")]
