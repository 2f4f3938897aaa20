"""SWARM with real hivemind peers and trainers on 127.0.0.1: tools/swarm_dht.py, swarm_peer.py and
swarm_trainer.py as processes, 2 stages x 2 peers of a tiny GPT on the demo corpus."""

import math
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from megatronish.swarm.local import REPO, LocalSwarm, environment, last_digests, step_lines
from megatronish.training.checkpointing import read_full_model_state

pytest.importorskip("hivemind", reason="SWARM needs hivemind: pip install 'megatronish[swarm]'")

# A tiny GPT on the demo corpus (byte tokens): 2 stages of 1 layer each; short timeouts.
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
         "--micro-batch-size", "4", "--global-batch-size", "16", "--log-interval", "5", "--eval-iters", "0"]
SWARM = ["--pp", "2", "--call-timeout", "5", "--update-period", "0.5"]

PRETRAIN_LINE = re.compile(r"iteration +(\d+)/ +\d+ \|.* lm loss: (\S+) \|")


@pytest.fixture
def swarm(tmp_path):
    local = LocalSwarm(tmp_path, MODEL + SWARM)
    local.start_dht()
    yield local
    local.close()


def _pretrain(folder, *flags) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_gpt.py"), *MODEL, "--sample-tokens", "0", *flags],
                          capture_output=True, text=True, env=environment(folder), cwd=folder, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _accounted(steps: dict, count: int, global_batch: int = 16) -> None:
    """Steps 0..count-1 each once; each takes the next global batch of samples, and on every stage each
    sample is in exactly one holder's gradient part."""
    assert sorted(steps) == list(range(count))
    for step, line in steps.items():
        assert (line.first_sample, line.last_sample, line.per_stage) == (
            step * global_batch, (step + 1) * global_batch - 1, global_batch)
        assert [sum(per_holder.values()) for per_holder in line.holders.values()] == [global_batch] * 2, line


@pytest.mark.slow
def test_swarm_steps_like_pretrain_gpt_and_checkpoints_go_both_ways(swarm, tmp_path):
    # pretrain_gpt.py: 25 iterations, a checkpoint after each
    reference = _pretrain(tmp_path, "--train-iters", "25", "--save", "pretrain", "--save-interval", "1",
                          "--log-interval", "1")
    losses = {int(i): float(loss) for i, loss in PRETRAIN_LINE.findall(reference)}
    start = tmp_path / "start"  # its iteration 5 as the SWARM run's --load
    shutil.copytree(tmp_path / "pretrain" / "iter_0000005", start / "iter_0000005")
    (start / "latest_checkpointed_iteration.txt").write_text("5")

    # SWARM continues from iteration 5 to 25 on the same data; --max-staleness 0: every step sees the last one
    peers = [swarm.peer(f"peer{i}", "--stage", str(i // 2), "--train-iters", "25", "--load", "start",
                        "--save", "swarm", "--save-interval", "1") for i in range(4)]
    trainer = swarm.trainer("trainer", "--train-iters", "25", "--max-staleness", "0")
    steps = step_lines(swarm.finish(trainer))
    assert sorted(steps) == list(range(5, 25))
    worst = max(abs(steps[t].loss - losses[t + 1]) / losses[t + 1] for t in steps)
    assert worst < 0.02, f"SWARM's losses differ from pretrain_gpt.py's by up to {worst:.2%}"
    print(f"largest relative loss difference over 20 steps: {worst:.2e}")

    # the peers leave gracefully on SIGTERM (writing what they still save)
    for peer in peers:
        swarm.signal(peer, signal.SIGTERM, whole_group=False)
    for peer in peers:
        assert "stopping: finishing the steps" in swarm.finish(peer, timeout=60)
    assert (tmp_path / "swarm" / "latest_checkpointed_iteration.txt").read_text() == "25"

    # the SWARM run's first step (iteration 5 -> 6) is pretrain_gpt.py's on the same samples
    _, swarm_weights, common = read_full_model_state(str(tmp_path / "swarm" / "iter_0000006"))
    _, pretrain_weights, _ = read_full_model_state(str(tmp_path / "pretrain" / "iter_0000006"))
    assert common["iteration"] == 6 and swarm_weights.keys() == pretrain_weights.keys()
    for name, value in pretrain_weights.items():
        torch.testing.assert_close(swarm_weights[name], value, rtol=1e-5, atol=1e-5, msg=name)

    # pretrain_gpt.py continues the SWARM run's checkpoint
    resumed = _pretrain(tmp_path, "--train-iters", "27", "--load", "swarm", "--save", "swarm", "--log-interval", "1")
    assert "loaded checkpoint" in resumed and "at iteration 25" in resumed
    continued = {int(i): float(loss) for i, loss in PRETRAIN_LINE.findall(resumed)}
    assert sorted(continued) == [26, 27] and abs(continued[26] - losses[25]) < 0.1 * losses[25]


@pytest.mark.slow
def test_swarm_survives_a_killed_and_a_frozen_peer(swarm):
    peers = [swarm.peer(f"peer{i}", "--stage", str(i // 2), "--train-iters", "16") for i in range(4)]
    for peer in peers:  # all four take part from the start
        swarm.wait_for(peer, r"serving stage")
    trainer = swarm.trainer("trainer", "--train-iters", "16")
    swarm.wait_for(trainer, r"step 3 \|")
    swarm.signal(peers[0], signal.SIGKILL)  # stage 0: its whole process tree
    swarm.wait_for(trainer, r"step 7 \|")
    swarm.signal(peers[2], signal.SIGSTOP)  # stage 1: frozen, p2p daemon included
    log = swarm.finish(trainer)
    steps = step_lines(log)
    _accounted(steps, 16)
    killed, frozen = (re.search(r"peer (\S+) listening", peer.text()).group(1) for peer in (peers[0], peers[2]))
    # calls to both failed, logged (wiring calls were rerouted, commits went on without them, their gradient parts
    # were replayed); the last steps have neither as a holder
    assert re.search(rf"{killed}.* failed", log) and re.search(rf"{frozen}.*(failed|timed out)", log), log
    assert not {killed[-6:], frozen[-6:]} & {holder for stage in steps[15].holders.values() for holder in stage}
    assert all(math.isfinite(line.loss) for line in steps.values())

    swarm.signal(peers[2], signal.SIGCONT)  # it finds its stage ahead of it and downloads the state
    swarm.wait_for(peers[2], r"downloaded the state at iteration 16", timeout=120)
    swarm.wait_for(peers[1], r"iteration 16, weights")
    assert last_digests(peers[2].text())[1] == last_digests(peers[3].text())[1], "stage 1's peers differ"
    assert last_digests(peers[3].text())[1][0] == 16


@pytest.mark.slow
def test_late_peer_loads_the_stage_and_rebalancing_moves_a_peer_to_the_slow_stage(swarm):
    # Every peer emulates a slow device (its sleeps leave the 2 shared cores to the others, and steps take
    # long enough for a peer to start while training runs); the one on stage 0 is 3x slower still.
    rebalance = ["--rebalance-period", "2", "--train-iters", "40"]
    slow = swarm.peer("slow", "--stage", "0", "--throttle", "30", *rebalance)
    fast = [swarm.peer(f"fast{i}", "--stage", "1", "--throttle", "10", *rebalance) for i in range(2)]
    mover = swarm.wait_for_any(fast, r"moving this peer from stage 1 to stage 0", timeout=200)
    swarm.wait_for(mover, r"moved from stage 1 to stage 0")
    assert re.search(r"stage 0: downloaded the state at iteration 0", mover.text())

    trainer = swarm.trainer("trainer", "--train-iters", "40")
    swarm.wait_for(trainer, r"step 4 \|")
    late = swarm.peer("late", "--stage", "auto", "--throttle", "10", *rebalance)
    joined = swarm.wait_for(late, r"stage (\d): downloaded the state at iteration (\d+)")
    assert int(joined.group(2)) >= 4
    swarm.wait_for(trainer, rf"step {int(joined.group(2)) + 3} \|")
    swarm.signal(late, signal.SIGTERM, whole_group=False)  # a graceful leave in the middle of training
    assert "stopping: finishing the steps" in swarm.finish(late, timeout=120)
    steps = step_lines(swarm.finish(trainer))
    _accounted(steps, 40)

    final = {}
    for peer in [slow, *fast]:  # wherever each one serves now, at the last iteration
        swarm.wait_for(peer, r"iteration 40[,( ]")
        stage, (iteration, digest) = max(last_digests(peer.text()).items(), key=lambda item: item[1][0])
        final.setdefault(stage, set()).add((iteration, digest))
    assert all(len(states) == 1 for states in final.values()), f"peers of a stage differ: {final}"
