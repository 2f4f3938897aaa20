"""The LR schedule (counted in samples) against its formula at warmup, mid-decay and the end."""

import math

import pytest
import torch

from megatronish.optimizer import OptimizerParamScheduler

MAX_LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 100, 1100


def make(style, init_lr=0.0):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)
    scheduler = OptimizerParamScheduler(optimizer, max_lr=MAX_LR, min_lr=MIN_LR, lr_warmup_steps=WARMUP,
                                        lr_decay_steps=DECAY, lr_decay_style=style, init_lr=init_lr)
    return optimizer, scheduler


def lr_after(scheduler, optimizer, samples):
    scheduler.step(samples - scheduler.num_steps)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("style", ["linear", "cosine", "constant"])
def test_warmup_is_linear_from_init_lr(style):
    optimizer, scheduler = make(style, init_lr=1e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # set at construction (0 samples)
    assert lr_after(scheduler, optimizer, 25) == pytest.approx(1e-5 + (MAX_LR - 1e-5) * 25 / WARMUP)
    assert lr_after(scheduler, optimizer, WARMUP) == pytest.approx(MAX_LR)


def test_linear_and_cosine_mid_decay_and_end():
    for style, coeff in (("linear", lambda r: 1 - r), ("cosine", lambda r: 0.5 * (1 + math.cos(math.pi * r)))):
        optimizer, scheduler = make(style)
        for samples in (350, 600, 1000):
            ratio = (samples - WARMUP) / (DECAY - WARMUP)
            assert lr_after(scheduler, optimizer, samples) == pytest.approx(MIN_LR + coeff(ratio) * (MAX_LR - MIN_LR))
        assert lr_after(scheduler, optimizer, DECAY) == pytest.approx(MIN_LR)
        assert lr_after(scheduler, optimizer, DECAY + 500) == pytest.approx(MIN_LR)  # stays at min after the decay
    optimizer, scheduler = make("cosine")
    assert lr_after(scheduler, optimizer, (WARMUP + DECAY) // 2) == pytest.approx((MAX_LR + MIN_LR) / 2)


def test_constant_after_warmup_and_state_round_trip():
    optimizer, scheduler = make("constant")
    assert lr_after(scheduler, optimizer, 5000) == pytest.approx(MAX_LR)
    optimizer, scheduler = make("cosine")
    lr = lr_after(scheduler, optimizer, 700)
    other_optimizer, other = make("cosine")
    other.load_state_dict(scheduler.state_dict())
    assert other.num_steps == 700 and other_optimizer.param_groups[0]["lr"] == pytest.approx(lr)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="decay style"):
        make("exponential")
    with pytest.raises(ValueError, match="warmup"):
        OptimizerParamScheduler(make("linear")[0], max_lr=1.0, min_lr=0.0, lr_warmup_steps=10, lr_decay_steps=10,
                                lr_decay_style="linear")
