"""Learning-rate schedule counted in samples, as Megatron's OptimizerParamScheduler.

With n = samples consumed so far:
    n <= warmup:            lr = init_lr + (max_lr - init_lr) * n / warmup
    constant:               lr = max_lr
    n >  decay:             lr = min_lr
    otherwise, r = (n - warmup) / (decay - warmup):
        linear:             lr = min_lr + (max_lr - min_lr) * (1 - r)
        cosine:             lr = min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi r))
Counting samples (not iterations) keeps the schedule right when the global batch size changes.
"""

import math

DECAY_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    def __init__(self, optimizer, *, max_lr: float, min_lr: float, lr_warmup_steps: int, lr_decay_steps: int,
                 lr_decay_style: str, init_lr: float = 0.0, use_checkpoint_opt_param_scheduler: bool = False):
        if lr_decay_style not in DECAY_STYLES:
            raise ValueError(f"unknown lr decay style {lr_decay_style!r}: use one of {', '.join(DECAY_STYLES)}")
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"min lr {min_lr} must be in [0, lr={max_lr}]")
        if lr_decay_steps <= 0 or lr_warmup_steps >= lr_decay_steps and lr_decay_style != "constant":
            raise ValueError(f"lr warmup ({lr_warmup_steps} samples) must be shorter than the decay "
                             f"({lr_decay_steps} samples): lower the warmup or raise --lr-decay-iters")
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = max_lr, min_lr, init_lr
        self.lr_warmup_steps, self.lr_decay_steps, self.lr_decay_style = lr_warmup_steps, lr_decay_steps, lr_decay_style
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.num_steps = 0
        self.step(0)

    def get_lr(self, group: dict | None = None) -> float:
        """The learning rate now: of a parameter group with its own peak and minimum ("max_lr"/"min_lr", as
        Megatron's --decoupled-lr gives the embeddings), or the common one."""
        max_lr = (group or {}).get("max_lr", self.max_lr)
        min_lr = (group or {}).get("min_lr", self.min_lr)
        min_lr = self.min_lr if min_lr is None else min_lr
        n = self.num_steps
        if self.lr_warmup_steps > 0 and n <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * n / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return max_lr
        if n > self.lr_decay_steps:
            return min_lr
        ratio = (n - self.lr_warmup_steps) / (self.lr_decay_steps - self.lr_warmup_steps)
        coeff = 1.0 - ratio if self.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment: int) -> float:
        """Advance by `increment` samples (the global batch size) and set each group's lr; returns the common lr."""
        self.num_steps += increment
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group)
        return self.get_lr()

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "init_lr": self.init_lr,
                "lr_warmup_steps": self.lr_warmup_steps, "lr_decay_steps": self.lr_decay_steps,
                "lr_decay_style": self.lr_decay_style, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        """Resume the sample count. The schedule's shape comes from the current arguments (as Megatron does
        with --override-opt_param-scheduler), so a resumed run may change its schedule; built with
        use_checkpoint_opt_param_scheduler=True it comes from the checkpoint instead."""
        if self.use_checkpoint_opt_param_scheduler:
            for name in ("max_lr", "min_lr", "init_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style"):
                setattr(self, name, state[name])
        self.num_steps = int(state["num_steps"])
        self.step(0)
