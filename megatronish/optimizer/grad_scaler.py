"""Loss scaling for fp16 training.

fp16 gradients underflow to zero unless the loss is multiplied by a large factor before
backward; the optimizer divides it out again (in fp32) before the step. A dynamic scaler
starts high, halves the scale whenever a step produces inf/nan gradients (that step is
skipped), and doubles it again after `growth_interval` clean steps in a row. `hysteresis`
lets a few overflows pass before the scale drops, as in Megatron.
"""

import torch


class ConstantGradScaler:
    """A fixed scale (`--loss-scale S`); overflowing steps are still skipped."""

    def __init__(self, scale: float):
        self.scale = torch.tensor(float(scale))

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale.item()}

    def load_state_dict(self, state: dict) -> None:
        self.scale = torch.tensor(float(state["scale"]))


class DynamicGradScaler:
    """Halve on overflow (after `hysteresis` overflows), double after `growth_interval` clean steps."""

    def __init__(self, initial_scale: float = 2.0**32, min_scale: float = 1.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2):
        if not (initial_scale > 0 and min_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1):
            raise ValueError(
                f"bad loss-scaler settings (initial {initial_scale}, min {min_scale}, growth {growth_factor}, "
                f"backoff {backoff_factor}): need scales > 0, growth > 1, 0 < backoff < 1")
        self.scale = torch.tensor(float(initial_scale))
        self.min_scale, self.growth_factor, self.backoff_factor = min_scale, growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = torch.clamp(self.scale * self.backoff_factor, min=self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale.item(), "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = torch.tensor(float(state["scale"]))
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
