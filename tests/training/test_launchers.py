"""Stop signals and faults delivered the way the real launchers deliver them, with torchrun's agents:

- SIGTERM while data-loader workers run (--num-workers 2): as torchrun passes it on (to each
  worker's process group) and as SLURM sends it (to every process of the step). Every rank
  saves at the next iteration boundary; no rank dies of a killed loader worker.
- two torchrun agents as two nodes (c10d rendezvous on 127.0.0.1), --max-restarts 1: a worker
  SIGKILLed while its peer is busy; the agents' restart counters then differ, and the restarted
  ranks still meet and finish from the newest checkpoint.
- an agent SIGKILLed: its workers notice, save and stop instead of training on unsupervised.
- launch/slurm.sbatch on a real SLURM cluster (slurmctld + slurmd started here): the stop signal
  saves, the job requeues itself and the next run resumes from the checkpoint.
"""

import json
import os
import signal
import subprocess
import time

import pytest
from checkpoint_testing import build_corpus, run_pretrains, tiny_argv
from launcher_testing import (
    FAULT_ENTRY,
    REPO,
    TORCHRUN,
    SlurmCluster,
    finish,
    kill_all,
    process_tree,
    signal_every_process,
    start,
    wait_for_file_value,
)

from megatronish.testing import find_free_port, run_distributed
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
    """launch/multi_node_torchrun.sh run twice on 127.0.0.1 as two nodes, TORCHRUN_ARGS="--max-restarts 1"."""
    save = tmp_path / "ckpt"
    # Rank 1 (on one node) dies in its 3rd step while rank 0 (on the other) is busy: rank 0's agent
    # restarts its worker for the membership change without counting a restart, rank 1's counts one.
    env = dict(KILL_AT="1:3", SLEEP_AT="0:3:5", RESULT_FILE=tmp_path / "result.json", NNODES=2,
               RDZV_HOST="127.0.0.1", RDZV_PORT=find_free_port(), RUN_ID="two-agents", MEGATRONISH_CPU=1,
               NPROC_PER_NODE=1, TORCHRUN_ARGS="--max-restarts 1", TRAIN_SCRIPT=FAULT_ENTRY)
    command = ["bash", str(REPO / "launch" / "multi_node_torchrun.sh"),
               *_train_argv(corpus, save, "--save-interval", "2", iters=6)[1:]]
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


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"no SLURM cluster can start here: {error}")
    yield cluster
    cluster.run("scancel", "--full", "--user", "root", check=False)
    time.sleep(1)
    cluster.stop()


@pytest.mark.slow
def test_slurm_job_saves_at_the_stop_signal_requeues_itself_and_resumes(corpus, tmp_path, slurm):
    """launch/slurm.sbatch on a real one-node cluster, as gloo ranks with loader workers. The signal
    is the one --signal=B:USR1@120 sends before the time limit (scancel --batch --signal=USR1)."""
    log, progress = tmp_path / "job.log", tmp_path / "progress"
    slurm.env.update(MEGATRONISH_CPU="1", NPROC_PER_NODE="2", TRAIN_SCRIPT=FAULT_ENTRY, STEP_DELAY="0.3",
                     PROGRESS_FILE=str(progress), RESULT_FILE=str(tmp_path / "result.json"), REPO=str(REPO),
                     CHECKPOINTS=str(tmp_path / "ckpt"), PYTHONPATH=str(REPO), STOP_GRACE="60")
    job = slurm.run("sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
                    f"--output={log}", f"--chdir={tmp_path}", str(REPO / "launch" / "slurm.sbatch"),
                    *tiny_argv(corpus, "--num-workers", "2", "--save-interval", "1000", iters=20, tp=2)).stdout.strip()
    wait_for_file_value(progress, 3, [], timeout=180)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    deadline, idle_since = time.monotonic() + 240, None
    while slurm.job_field(job, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        # Skip SLURM's requeue hold-off, but only once the node has been idle a while after the stopped run:
        # released at once, slurmd refuses the job id it is still cleaning up ("Job 1 already killed, do not
        # launch batch job") and the job FAILS.
        requeued = slurm.job_field(job, "JobState") == "PENDING" and slurm.job_field(job, "Restarts") == "1"
        idle_since = (idle_since or time.monotonic()) if requeued and slurm.node_field("State") == "IDLE" else None
        if idle_since is not None and time.monotonic() - idle_since >= 5:
            slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    output = log.read_text()  # both runs of the job: --open-mode=append
    assert (slurm.job_field(job, "JobState"), slurm.job_field(job, "Restarts")) == ("COMPLETED", "1"), output[-3000:]
    stopped = int(output.split("exiting after iteration ")[1].split(":")[0])
    assert f"exiting after iteration {stopped}: received SIGTERM" in output and "killed by signal" not in output
    assert f"job {job} starts (restart 1)" in output
    assert f"loaded checkpoint {tmp_path}/ckpt/iter_{stopped:07d} at iteration {stopped}" in output
    assert json.loads((tmp_path / "result.json").read_text())["iteration"] == 20


def _pretrain_as_one_rank_per_node(argv):
    os.environ["LOCAL_WORLD_SIZE"] = "1"  # what torchrun sets with --nproc_per_node 1 on each node
    return run_pretrains([argv])


def test_tensor_parallelism_across_nodes_is_warned_about(corpus, capfd):
    run_distributed(_pretrain_as_one_rank_per_node, 2, args=(tiny_argv(corpus, iters=3, tp=2),), timeout=300)
    assert "warning: --tp 2 is larger than the 1 ranks of a node: tensor-parallel collectives" in capfd.readouterr().out
