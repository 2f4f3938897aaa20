"""Stop signals and faults delivered the way the real launchers deliver them, with torchrun's agents:

- SIGTERM while data-loader workers run (--num-workers 2): as torchrun passes it on (to each
  worker's process group) and as SLURM sends it (to every process of the step). Every rank
  saves at the next iteration boundary; no rank dies of a killed loader worker.
- two torchrun agents as two nodes (c10d rendezvous on 127.0.0.1), --max-restarts 1: a worker
  SIGKILLed while its peer is busy; the agents' restart counters then differ, and the restarted
  ranks still meet and finish from the newest checkpoint.
- an agent SIGKILLed: its workers notice, save and stop instead of training on unsupervised.
"""

import json
import os
import signal
import time

import pytest
from checkpoint_testing import build_corpus, tiny_argv
from launcher_testing import (
    FAULT_ENTRY,
    TORCHRUN,
    finish,
    kill_all,
    process_tree,
    signal_every_process,
    start,
    wait_for_file_value,
)

from megatronish.testing import find_free_port
from megatronish.training.checkpointing import read_latest_iteration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _train_argv(corpus, save, *extra, iters):
    return [FAULT_ENTRY, *tiny_argv(corpus, "--save", str(save), "--load", str(save), *extra, iters=iters)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("delivery", ["torchrun", "slurm"])
def test_sigterm_with_data_loader_workers_saves_on_every_rank(corpus, tmp_path, delivery):
    save, progress, log = tmp_path / "ckpt", tmp_path / "progress", tmp_path / "log.txt"
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2",
               *_train_argv(corpus, save, "--num-workers", "2", "--save-interval", "1000", iters=500)]
    proc = start(command, log, tmp_path, STEP_DELAY=0.2, PROGRESS_FILE=progress, RESULT_FILE=tmp_path / "result")
    try:
        wait_for_file_value(progress, 2, [proc], timeout=120)
        processes = process_tree(proc.pid)
        assert len(processes) >= 7, processes  # torchrun, 2 ranks, 2 loader workers each
        if delivery == "torchrun":
            os.kill(proc.pid, signal.SIGTERM)  # the agent passes it to each worker's process group
        else:
            signal_every_process(proc.pid, signal.SIGTERM)
        returncode = finish([proc], timeout=120)[0]
    finally:
        finish([proc], timeout=0)
    output = log.read_text()
    assert "killed by signal" not in output, output[-3000:]
    stopped = read_latest_iteration(str(save))
    assert stopped is not None and stopped >= 2, output[-3000:]
    assert f"exiting after iteration {stopped}: received SIGTERM" in output
    assert returncode is not None  # torchrun itself exits (1: it re-raises the signal it got)


def test_two_agents_restart_together_after_a_killed_worker(corpus, tmp_path):
    save, port = tmp_path / "ckpt", find_free_port()
    # Rank 1 (on one node) dies in its 3rd step while rank 0 (on the other) is busy: rank 0's agent
    # restarts its worker for the membership change without counting a restart, rank 1's counts one.
    env = dict(KILL_AT="1:3", SLEEP_AT="0:3:5", RESULT_FILE=tmp_path / "result.json")
    command = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-agents", "--max-restarts", "1",
               *_train_argv(corpus, save, "--save-interval", "2", iters=6)]
    agents = [start(command, tmp_path / f"node{n}.txt", tmp_path, **env) for n in range(2)]
    codes = finish(agents, timeout=240)
    logs = "\n".join((tmp_path / f"node{n}.txt").read_text() for n in range(2))
    assert os.path.exists(f"{env['RESULT_FILE']}.kill-done")
    assert codes == [0, 0], logs[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["iteration"] == 6 and len(result["losses"]) == 4  # iterations 3-6, resumed from iteration 2
    assert "loaded checkpoint" in logs and "connectFullMesh failed" not in logs


def test_workers_of_a_killed_agent_save_and_stop(corpus, tmp_path):
    save, progress, log = tmp_path / "ckpt", tmp_path / "progress", tmp_path / "log.txt"
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2",
               *_train_argv(corpus, save, "--save-interval", "1000", iters=500)]
    proc = start(command, log, tmp_path, STEP_DELAY=0.2, PROGRESS_FILE=progress, RESULT_FILE=tmp_path / "result")
    workers = []
    try:
        wait_for_file_value(progress, 2, [proc], timeout=120)
        workers = process_tree(proc.pid)[1:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        still_running = [pid for pid in workers if _alive(pid)]
    finally:
        kill_all(workers)
    output = log.read_text()
    assert not still_running, output[-3000:]
    stopped = read_latest_iteration(str(save))
    assert stopped is not None and stopped >= 2, output[-3000:]
    assert f"exiting after iteration {stopped}: a torchrun agent is gone" in output
