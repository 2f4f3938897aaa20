"""Resume and reshard through pretrain (CPU, gloo, fp32, the tiny GPT of checkpoint_testing).

- Exact resume: 20 iterations straight == 10, save, new processes, load, 10 more: bitwise equal
  losses with dropout on, at TP=2 x DP=2, with the plain and the distributed optimizer (the
  latter saving asynchronously every 5 iterations with --keep-last 1).
- Reshard: a checkpoint saved at TP=2 x DP=2 loads at TP=1 x DP=1, TP=4 x DP=1 and TP=1 x DP=4:
  the validation loss equals the one at save time, and 5 further iterations match a run that
  never changed layout (dropout 0, same global batch, same LR schedule).
Each run_distributed call forks fresh processes: a resume never shares a process with its save.
"""

import os

import pytest
from checkpoint_testing import build_corpus, run_pretrains, tiny_argv

from megatronish.testing import run_distributed
from megatronish.training.checkpointing import TRACKER_FILENAME
from megatronish.training.save_lock import LOCK_FILENAME

RESHARD_VALID_REL = 1e-6   # the same weights and batches; only fp32 summation order differs by layout
RESHARD_LOSS_REL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def test_exact_resume_bitwise_with_dropout_tp2_dp2_both_optimizers(corpus, tmp_path):
    plain, sharded = str(tmp_path / "plain"), str(tmp_path / "sharded")

    def argv(save, *extra):
        resume = ("--save", save, "--load", save, "--exit-interval", "10") if save else ()
        return tiny_argv(corpus, *resume, *extra, iters=20, tp=2, dropout=0.1)

    sharded_flags = ("--use-distributed-optimizer", "--async-save", "--save-interval", "5", "--keep-last", "1")
    straight = run_distributed(run_pretrains, 4, args=([argv(None), argv(None, "--use-distributed-optimizer")],),
                               timeout=300)[0]
    commands = [argv(plain), argv(sharded, *sharded_flags)]
    first = run_distributed(run_pretrains, 4, args=(commands,), timeout=300)[0]  # the same command twice:
    second = run_distributed(run_pretrains, 4, args=(commands,), timeout=300)[0]  # first run and restart

    for full, before, after in zip(straight, first, second):
        assert before["iteration"] == 10 and after["iteration"] == 20
        assert before["losses"] == full["losses"][:10]
        assert after["losses"] == full["losses"][10:]  # bitwise: model, Adam, LR, RNG and data position
    # --keep-last 1, no temporaries:
    assert sorted(os.listdir(sharded)) == [LOCK_FILENAME, "iter_0000020", TRACKER_FILENAME]
    assert sorted(os.listdir(plain)) == [LOCK_FILENAME, "iter_0000010", "iter_0000020", TRACKER_FILENAME]


def test_reshard_tp2_dp2_checkpoint_to_tp1_tp4_and_dp4(corpus, tmp_path):
    saved = str(tmp_path / "tp2dp2")

    def argv(tp, *extra):  # every run has the same data, schedule and evaluation arguments
        return tiny_argv(corpus, "--eval-interval", "10", *extra, iters=15, tp=tp)

    never_changed, at_save = run_distributed(
        run_pretrains, 4, args=([argv(2), argv(2, "--save", saved, "--exit-interval", "10")],), timeout=300)[0]
    # At each layout: load and evaluate only (--skip-train), then load and train the 5 remaining iterations.
    load, evaluate = ("--load", saved), ("--load", saved, "--skip-train")
    tp1 = run_distributed(run_pretrains, 1, args=([argv(1, *evaluate), argv(1, *load)],), timeout=300)[0]
    tp4_dp4 = run_distributed(run_pretrains, 4, args=([argv(4, *evaluate), argv(4, *load),
                                                       argv(1, *evaluate), argv(1, *load)],), timeout=300)[0]

    assert at_save["iteration"] == 10 and at_save["losses"] == never_changed["losses"][:10]
    for layout, (evaluated, continued) in {"TP1xDP1": tp1, "TP4xDP1": tp4_dp4[:2], "TP1xDP4": tp4_dp4[2:]}.items():
        assert evaluated["losses"] == [] and continued["iteration"] == 15, layout
        assert evaluated["final_valid"] == pytest.approx(at_save["valid"][10], rel=RESHARD_VALID_REL), layout
        assert continued["losses"] == pytest.approx(never_changed["losses"][10:], rel=RESHARD_LOSS_REL), layout
        assert continued["final_valid"] == pytest.approx(never_changed["final_valid"], rel=RESHARD_LOSS_REL), layout
