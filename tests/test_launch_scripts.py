"""The launch scripts' own logic, with stand-ins for the cluster's tools on PATH (a `torchrun` that
records its arguments, an `nvidia-smi` that lists N GPUs); the real launchers run in
tests/training/test_launchers.py. SkyPilot's YAML is read by SkyPilot's own parser.

- scripts that need GPUs stop with a message, before starting anything, where there are none;
- TORCHRUN_ARGS reaches torchrun (--max-restarts, --shutdown-timeout);
- TP defaults to the GPUs of a node;
- the SkyPilot task maps SKYPILOT_NUM_NODES / SKYPILOT_NODE_IPS / SKYPILOT_NUM_GPUS_PER_NODE onto
  one c10d rendezvous on the first node (not N standalone jobs).
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKYPILOT_PYTHON = os.environ.get("MEGATRONISH_SKYPILOT_PYTHON", sys.executable)  # CI: a venv of its own


@pytest.fixture
def tools(tmp_path):
    """A PATH folder with a recording `torchrun` and an `nvidia-smi` listing $FAKE_GPUS GPUs."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "torchrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$TORCHRUN_RECORD"\n')
    (folder / "nvidia-smi").write_text('#!/usr/bin/env bash\nfor ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do '
                                       'echo "GPU $i: stand-in"; done\n')
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def run_script(tools, tmp_path, script, *args, **env):
    record = tmp_path / "torchrun-args"
    environment = dict(os.environ, PATH=f"{tools}:{os.environ['PATH']}", TORCHRUN_RECORD=str(record),
                       **{key: str(value) for key, value in env.items()})
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True, text=True,
                          env=environment, timeout=60, cwd=tmp_path)
    return proc, (record.read_text().splitlines() if record.exists() else None)


def test_gpu_scripts_stop_before_starting_anything_without_gpus(tools, tmp_path):
    proc, torchrun = run_script(tools, tmp_path, "gpt2_345m_single_node.sh", "data", "vocab.json", "merges.txt",
                                FAKE_GPUS=2)
    assert proc.returncode == 1 and torchrun is None
    assert "gpt2_345m_single_node.sh: error: needs 8 GPU(s) on this node and nvidia-smi finds 2" in proc.stderr
    proc, torchrun = run_script(tools, tmp_path, "multi_node_torchrun.sh", NNODES=2, RDZV_HOST="10.0.0.1")
    assert proc.returncode == 1 and torchrun is None
    assert "needs 1 GPU(s) on this node and nvidia-smi finds 0" in proc.stderr


def test_torchrun_flags_pass_through_and_tp_follows_the_gpus_of_a_node(tools, tmp_path):
    proc, torchrun = run_script(tools, tmp_path, "multi_node_torchrun.sh", FAKE_GPUS=4, NNODES=2,
                                RDZV_HOST="10.0.0.1", DATA_PREFIX="d", VOCAB="v", MERGES="m",
                                TORCHRUN_ARGS="--max-restarts 3 --shutdown-timeout 110")
    assert proc.returncode == 0, proc.stderr
    line = " ".join(torchrun)
    assert "--nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29400" in line
    assert "--max-restarts 3 --shutdown-timeout 110" in line
    assert "--tp 4" in line and "--global-batch-size 128" in line
    proc, torchrun = run_script(tools, tmp_path, "gpt2_345m_single_node.sh", "data", "vocab.json", "merges.txt",
                                FAKE_GPUS=8, TORCHRUN_ARGS="--max-restarts 2")
    assert proc.returncode == 0 and "--nproc_per_node 8 --max-restarts 2" in " ".join(torchrun)


def _skypilot_task(name: str = "skypilot_spot.yaml") -> dict:
    """run, envs, num_nodes, accelerators, spot use and ports of launch/<name> as SkyPilot's parser reads them."""
    code = ("import json, sys, sky; task = sky.Task.from_yaml(sys.argv[1]); "
            "print(json.dumps({'run': task.run, 'envs': task.envs, 'num_nodes': task.num_nodes, "
            "'accelerators': {k: v for r in task.resources for k, v in (r.accelerators or {}).items()}, "
            "'use_spot': [r.use_spot for r in task.resources], 'ports': [r.ports for r in task.resources]}))")
    probe = subprocess.run([SKYPILOT_PYTHON, "-c", "import sky"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"SkyPilot is not installed for {SKYPILOT_PYTHON} (pip install skypilot; CI installs it into "
                    "a venv named by MEGATRONISH_SKYPILOT_PYTHON)")
    proc = subprocess.run([SKYPILOT_PYTHON, "-c", code, str(REPO / "launch" / name)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_skypilot_task_is_one_rendezvous_across_its_nodes_with_tp_per_node(tools, tmp_path):
    task = _skypilot_task()
    assert task["num_nodes"] == 1 and task["accelerators"] == {"A100": 8}
    # What SkyPilot sets on node 1 of a 2-node launch (sky jobs launch --num-nodes 2) of A100:4 nodes.
    env = dict(os.environ, **task["envs"], PATH=f"{tools}:{os.environ['PATH']}",
               TORCHRUN_RECORD=str(tmp_path / "torchrun-args"), SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_RANK="1",
               SKYPILOT_NODE_IPS="10.0.0.5\n10.0.0.6", SKYPILOT_NUM_GPUS_PER_NODE="4", SKYPILOT_TASK_ID="sky-job-7")
    proc = subprocess.run(["bash", "-c", task["run"]], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = shlex.join((tmp_path / "torchrun-args").read_text().splitlines())
    assert ("--nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint 10.0.0.5:29400 "
            "--rdzv_id sky-job-7 --max-restarts 3 pretrain_gpt.py --tp 4") in line
    assert "--standalone" not in line and "--global-batch-size 128" in line
    assert "--save /checkpoints/gpt2-345m --load /checkpoints/gpt2-345m" in line
    assert "--local-checkpoint-interval 50 --local-checkpoint-dir /tmp/megatronish-sky-job-7" in line


def test_swarm_skypilot_task_is_one_spot_peer_that_rejoins_its_swarm():
    task = _skypilot_task("swarm_skypilot.yaml")
    assert task["num_nodes"] == 1 and task["use_spot"] == [True] and task["ports"] == [["31337"]]
    assert "BOOTSTRAP" in task["envs"] and task["envs"]["PORT"] == "31337"
    run = task["run"]
    assert "tools/swarm_peer.py" in run and '--initial-peers "$BOOTSTRAP"' in run and "--stage auto" in run
    assert '--host 0.0.0.0 --port "$PORT"' in run and '--load "$CHECKPOINTS"' in run


def test_elastic_script_starts_an_elastic_rendezvous_or_one_fault_tolerant_replica(tools, tmp_path):
    proc, torchrun = run_script(tools, tmp_path, "elastic.sh", "--tp", "2", MEGATRONISH_CPU=1, RDZV_HOST="10.0.0.1",
                                MAX_NODES=3, TORCHRUN_ARGS="--monitor-interval 1")
    assert proc.returncode == 0, proc.stderr
    line = " ".join(torchrun)
    assert ("--nnodes 1:3 --nproc_per_node 2 --max-restarts 100 --rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29400 "
            "--rdzv_id megatronish-elastic --rdzv_conf last_call_timeout=10 --monitor-interval 1") in line
    assert line.endswith("pretrain_gpt.py --wait-for-nodes-minutes 30 --tp 2")
    proc, torchrun = run_script(tools, tmp_path, "elastic.sh", "--tp", "2", MEGATRONISH_CPU=1, RDZV_HOST="10.0.0.1",
                                FT=1, REPLICA_ID=1)
    assert proc.returncode == 0, proc.stderr
    line = " ".join(torchrun)
    assert line.startswith("--standalone --nproc_per_node 2 ")
    assert line.endswith("pretrain_gpt.py --fault-tolerant-dp --ft-lighthouse http://10.0.0.1:29510 --ft-replica-id 1 "
                         "--tp 2")
    proc, torchrun = run_script(tools, tmp_path, "elastic.sh", MEGATRONISH_CPU=1, RDZV_HOST="10.0.0.1", FT=1)
    assert proc.returncode != 0 and "REPLICA_ID" in proc.stderr
