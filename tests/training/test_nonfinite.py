"""A run whose loss turns NaN stops with an error and never saves a non-finite checkpoint.

--lr 1e30 makes the weights overflow in the update after warmup (iteration 2), so iterations
3, 4, ... have a NaN loss, in fp32, bf16 and fp16 (constant loss scale 1: fp16's overflow check
then lets the huge update through once, and the fp16 weights become non-finite). With
--max-nan-iterations 2, --save-interval 1 and --keep-last 2 the run must fail at iteration 4,
with the checkpoints of iterations 1 and 2 kept and the tracker on 2; in fp16 the weights
already overflow in the update of iteration 2 (after its finite loss): only iteration 1 is saved.
"""

import math
import os

import pytest
from checkpoint_testing import build_corpus, pretrain_errors, tiny_argv

from megatronish.testing import run_distributed
from megatronish.training.checkpointing import TRACKER_FILENAME, read_full_model_state, read_latest_iteration
from megatronish.training.nonfinite import NonFiniteGuard
from megatronish.training.save_lock import LOCK_FILENAME

PRECISIONS = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16", "--loss-scale", "1"]}
LAST_HEALTHY = {"fp32": 2, "bf16": 2, "fp16": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def test_nan_loss_stops_the_run_and_keeps_the_healthy_checkpoints(corpus, tmp_path):
    folders = {name: str(tmp_path / name) for name in PRECISIONS}
    argvs = [tiny_argv(corpus, "--lr", "1e30", "--min-lr", "0", "--save", folders[name], "--save-interval", "1",
                       "--keep-last", "2", "--max-nan-iterations", "2", *flags, iters=8)
             for name, flags in PRECISIONS.items()]
    messages = run_distributed(pretrain_errors, 1, args=(argvs,), timeout=300)[0]
    for name, message in zip(PRECISIONS, messages):
        assert message.startswith("NonFiniteTrainingError: the lm loss or gradient norm was not finite in 2 "
                                  "iteration(s) in a row (3-4; last loss nan"), (name, message)
        assert "--max-nan-iterations" in message
        kept = [f"iter_{i:07d}" for i in range(1, LAST_HEALTHY[name] + 1)]
        assert read_latest_iteration(folders[name]) == LAST_HEALTHY[name], name
        assert sorted(os.listdir(folders[name])) == [LOCK_FILENAME, *kept, TRACKER_FILENAME], name
        _, weights, _ = read_full_model_state(folders[name])
        assert all(bool(w.float().isfinite().all()) for w in weights.values()), name


def test_the_guard_counts_nonfinite_iterations_in_a_row():
    guard = NonFiniteGuard(max_in_a_row=2, fp16=False)
    guard.update(1, math.nan, 1.0)
    assert not guard.healthy and not guard.exhausted
    guard.update(2, 1.0, 1.0)  # a finite iteration ends the streak
    guard.update(3, 1.0, math.inf)  # a non-finite gradient norm counts without loss scaling
    guard.update(4, math.nan, None)
    assert guard.exhausted and "(3-4;" in str(guard.error())
    fp16 = NonFiniteGuard(max_in_a_row=1, fp16=True)
    fp16.update(1, 1.0, None)  # an overflow the loss scaler skipped: normal in fp16
    assert fp16.healthy
    never = NonFiniteGuard(max_in_a_row=0, fp16=False)
    never.update(1, math.nan, math.nan)
    assert not never.exhausted
