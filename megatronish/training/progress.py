"""How far training has come: what a checkpoint must restore for an exact resume."""

from dataclasses import asdict, dataclass


@dataclass
class TrainingProgress:
    iteration: int = 0
    consumed_train_samples: int = 0   # the data loader restarts right after these
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0       # fp16 steps skipped for inf/nan gradients, in total
    nan_iterations: int = 0           # iterations whose loss was inf/nan, in total

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingProgress":
        return cls(**values)
