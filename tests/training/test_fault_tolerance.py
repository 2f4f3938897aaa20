"""Fault-tolerant data parallelism on torchft (--fault-tolerant-dp): two replicas of TP=2, each its own
torchrun, around the real torchft_lighthouse on 127.0.0.1.

Replica 1's processes die mid-step (its rank 0 SIGKILLed, then its agent stops the other). Replica
0's step fails in the all-reduce and is discarded; it keeps stepping with no restart (alone it runs
every micro-batch of the fixed global batch). Replica 1 is relaunched, heals from replica 0 and both
step together to the end: their final weights are bit-identical, and every iteration's loss equals an
unfailed TP=2 run's within 1e-5.
"""

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_testing import build_corpus, run_pretrains, tiny_argv
from elastic_testing import LOSS_LINE
from launcher_testing import FAULT_ENTRY, TORCHRUN, finish, process_tree, start

from megatronish.testing import find_free_port, run_distributed
from megatronish.training.checkpointing import read_full_model_state

pytest.importorskip("torchft", reason="--fault-tolerant-dp needs torchft: pip install 'megatronish[ft]'")
LIGHTHOUSE = shutil.which("torchft_lighthouse") or str(Path(sys.executable).with_name("torchft_lighthouse"))
ITERS = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _wait_for(pattern: str, log: Path, procs, timeout: float = 400.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(pattern, log.read_text(), flags=re.M):
            return
        if all(proc.poll() is not None for proc in procs):
            break
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not in {log.name} within {timeout} s:\n{log.read_text()[-4000:]}")


def _losses(log: Path) -> dict[int, float]:
    found = {}
    for iteration, loss in LOSS_LINE.findall(log.read_text()):
        assert int(iteration) not in found, f"iteration {iteration} logged twice in {log.name}"
        found[int(iteration)] = float(loss)
    return found


@pytest.mark.slow
def test_a_killed_replica_rejoins_heals_and_the_trajectory_is_the_unfailed_one(corpus, tmp_path):
    argv = tiny_argv(corpus, "--log-interval", "1", iters=ITERS, tp=2)
    reference = run_distributed(run_pretrains, 2, args=([argv],), timeout=600)[0][0]["losses"]

    port = find_free_port()
    lighthouse = start([LIGHTHOUSE, "--min_replicas", "1", "--bind", f"127.0.0.1:{port}", "--quorum_tick_ms", "100",
                        "--join_timeout_ms", "30000", "--heartbeat_timeout_ms", "2000"], tmp_path / "lighthouse.txt",
                       tmp_path)
    joined, back = tmp_path / "replica-1-started", tmp_path / "replica-1-is-back"

    def replica(i: int, log: str, **env):
        command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", FAULT_ENTRY, *argv, "--fault-tolerant-dp",
                   "--ft-lighthouse", f"http://127.0.0.1:{port}", "--ft-replica-id", str(i), "--ft-host", "127.0.0.1",
                   "--ft-timeout-seconds", "60", "--save", str(tmp_path / f"ckpt{i}")]
        return start(command, tmp_path / log, tmp_path, RESULT_FILE=tmp_path / f"result{i}.json", STEP_DELAY=0.3,
                     **env)

    # Replica 0 starts first and holds in its 3rd and 12th steps until replica 1 has started (a replica that is
    # alive but out of the quorum would otherwise be left behind for the lighthouse's join timeout). Replica 1
    # heals from it, steps with it, and its rank 0 SIGKILLs itself in its 3rd step, before the all-reduce that
    # replica 0 waits in; its torchrun agent then stops rank 1 and exits (no restarts).
    replicas = [replica(0, "replica0.txt", HOLD_AT=f"0:3:{joined},0:12:{back}")]
    relaunched, left = None, []
    try:
        _wait_for(r"^ iteration +1/", tmp_path / "replica0.txt", replicas)
        replicas.append(replica(1, "replica1.txt", KILL_AT="0:3"))
        _wait_for(r"^> fault-tolerant DP: replica 1", tmp_path / "replica1.txt", replicas[1:])
        joined.touch()
        replicas[1].wait(timeout=400)
        left = process_tree(replicas[1].pid)
        relaunched = replica(1, "replica1-relaunched.txt")
        _wait_for(r"^> fault-tolerant DP: replica 1", tmp_path / "replica1-relaunched.txt", [relaunched])
        back.touch()
        codes = finish([replicas[0], relaunched], timeout=600)
    finally:
        finish([p for p in (*replicas, relaunched) if p is not None], timeout=0, also_kill=left)
        finish([lighthouse], timeout=0)
    logs = {name: (tmp_path / name).read_text() for name in ("replica0.txt", "replica1-relaunched.txt")}

    assert codes == [0, 0], "\n".join(text[-3000:] for text in logs.values())
    assert logs["replica0.txt"].count("> ops:") == 1  # replica 0 never restarted
    assert re.search(r"iteration \d+ discarded \(a replica failed during it\)", logs["replica0.txt"])
    assert re.search(r"healed from a live replica at iteration \d+", (tmp_path / "replica1.txt").read_text())
    assert re.search(r"healed from a live replica at iteration \d+", logs["replica1-relaunched.txt"])
    survivor = _losses(tmp_path / "replica0.txt")
    assert sorted(survivor) == list(range(1, ITERS + 1))
    for log in ("replica0.txt", "replica1.txt", "replica1-relaunched.txt"):
        for iteration, loss in _losses(tmp_path / log).items():
            assert loss == pytest.approx(reference[iteration - 1], rel=1e-5), (log, iteration)
    (_, weights_0, common_0), (_, weights_1, common_1) = (read_full_model_state(str(tmp_path / f"ckpt{i}"))
                                                          for i in (0, 1))
    assert common_0["iteration"] == common_1["iteration"] == ITERS
    assert weights_0.keys() == weights_1.keys()
    assert all(torch.equal(weights_0[name], weights_1[name]) for name in weights_0)  # bit-identical
