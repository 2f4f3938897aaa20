"""Stopping early and coming back: signals, --exit-duration-in-mins, torchrun --max-restarts.

- SIGTERM reaching one rank only (rank 1, during iteration 4): every rank stops after that
  iteration, saves, and pretrain returns normally (the script exits 0); the same command run
  again resumes and ends with the loss of an uninterrupted run.
- SIGUSR1 on rank 0 and a tiny --exit-duration-in-mins also save and stop (all ranks agree).
- torchrun --max-restarts 1: rank 1 SIGKILLs itself once during iteration 3; torchrun restarts
  the job, which resumes from the checkpoint of iteration 2 and ends with the uninterrupted loss.
"""

import json
import os

import pytest
from checkpoint_testing import build_corpus, run_pretrains, tiny_argv
from launcher_testing import FAULT_ENTRY, TORCHRUN, finish, start

from megatronish.testing import run_distributed
from megatronish.training.checkpointing import read_latest_iteration

ITERS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _argv(corpus, *extra):
    return tiny_argv(corpus, *extra, iters=ITERS, tp=2, dropout=0.1)


@pytest.fixture(scope="module")
def uninterrupted(corpus):
    return run_distributed(run_pretrains, 2, args=([_argv(corpus)],), timeout=300)[0][0]


def test_signals_and_time_limit_save_on_every_rank_and_resume_exactly(corpus, uninterrupted, tmp_path):
    sigterm, sigusr1, timed = (str(tmp_path / name) for name in ("sigterm", "sigusr1", "timed"))
    restartable = _argv(corpus, "--save", sigterm, "--load", sigterm)
    runs = [restartable, _argv(corpus, "--save", sigusr1), _argv(corpus, "--save", timed, "--exit-duration-in-mins", "1e-9")]
    faults = [("SIGTERM", 1, 4), ("SIGUSR1", 0, 2), None]
    stopped = run_distributed(run_pretrains, 2, args=(runs, faults), timeout=300)
    for rank_results in stopped:  # every rank stopped at the same iteration and returned normally
        assert [r["iteration"] for r in rank_results] == [4, 2, 1]
    assert [read_latest_iteration(d) for d in (sigterm, sigusr1, timed)] == [4, 2, 1]

    restarted = run_distributed(run_pretrains, 2, args=([restartable],), timeout=300)
    assert stopped[0][0]["losses"] == uninterrupted["losses"][:4]
    assert restarted[0][0]["iteration"] == ITERS
    assert restarted[0][0]["losses"] == uninterrupted["losses"][4:]
    assert restarted[0][0]["final_valid"] == uninterrupted["final_valid"]


def test_torchrun_restarts_a_sigkilled_rank_from_the_latest_checkpoint(corpus, uninterrupted, tmp_path):
    save, result_file = str(tmp_path / "ckpt"), tmp_path / "result.json"
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", FAULT_ENTRY,
               *_argv(corpus, "--save", save, "--load", save, "--save-interval", "2")]
    proc = start(command, tmp_path / "log.txt", tmp_path, KILL_AT="1:3", RESULT_FILE=result_file)
    returncode = finish([proc], timeout=240)[0]
    output = (tmp_path / "log.txt").read_text()

    assert returncode == 0, output[-3000:]
    assert os.path.exists(f"{result_file}.kill-done")
    result = json.loads(result_file.read_text())
    assert result["restart"] == "1"  # the second attempt finished the job
    assert "loaded checkpoint" in output and "at iteration 2" in output
    assert result["losses"] == uninterrupted["losses"][2:]
    assert result["final_valid"] == uninterrupted["final_valid"]
