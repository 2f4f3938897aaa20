"""Local checkpoints (--local-checkpoint-interval, --local-checkpoint-dir): two forked ranks pose as two
nodes of one rank each (LOCAL_WORLD_SIZE=1), each node with a folder of its own.

- A rank killed while its node writes a local checkpoint (during the copy to its buddy): the previous
  one stays complete, and it wins over an older durable one. The node that held rank 1's own file is
  then gone: the job restarts on the other node alone (DP 1), reads rank 1's file from the buddy copy
  and continues on the uninterrupted trajectory; when it ends with a durable checkpoint the local ones
  are deleted.
- A durable checkpoint newer than the newest local one wins, and the older local one is deleted.
"""

import os
import shutil
import signal
import time

import pytest
from checkpoint_testing import build_corpus, run_pretrains, tiny_argv

from megatronish.testing import RankFailed, run_distributed
from megatronish.training import training
from megatronish.training.checkpoint_manifest import checkpoint_iterations
from megatronish.training.local_checkpoint import LocalCheckpoints

ITERS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus):
    return run_distributed(run_pretrains, 2, args=([tiny_argv(corpus, iters=ITERS)],), timeout=300)[0][0]


def train_as_node(root: str, argv: list[str], local_interval: int, kill_while_writing: int | None = None,
                  kill_in_step: int | None = None) -> dict:
    """pretrain in a forked rank posing as node RANK, with its own local folder root/node<RANK>. Rank 1 dies
    while sending the local checkpoint of iteration `kill_while_writing` to its buddy, or in training step
    `kill_in_step` once the local checkpoints before it are on disk."""
    rank = int(os.environ["RANK"])
    folder = f"{root}/node{rank}"
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if rank == 1 and kill_while_writing is not None:
        real_exchange = LocalCheckpoints._exchange_with_buddy

        def exchange_and_die(self, temporary):
            if temporary.endswith(f"iter_{kill_while_writing:07d}.tmp"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_exchange(self, temporary)

        LocalCheckpoints._exchange_with_buddy = exchange_and_die
    if rank == 1 and kill_in_step is not None:
        real_step, steps = training.train_step, [0]

        def step_and_die(*args, **kwargs):
            steps[0] += 1
            if steps[0] == kill_in_step:
                newest = (kill_in_step - 1) // local_interval * local_interval
                while newest not in checkpoint_iterations(folder):  # published only once every node holds it
                    time.sleep(0.1)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(*args, **kwargs)

        training.train_step = step_and_die
    local = ["--local-checkpoint-interval", str(local_interval), "--local-checkpoint-dir", folder]
    return run_pretrains([argv + local])[0]


def test_a_kill_while_writing_keeps_the_previous_one_and_a_lost_nodes_file_comes_from_its_buddy(
        corpus, reference, tmp_path, capfd):
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(corpus, "--save", save, "--load", save, "--save-interval", "3", iters=ITERS)
    with pytest.raises(RankFailed):
        run_distributed(train_as_node, 2, args=(str(tmp_path), argv, 1, 5), timeout=300)
    assert checkpoint_iterations(str(tmp_path / "node0")) == [4]  # 5 was never published, 4 is intact
    assert checkpoint_iterations(str(tmp_path / "node1")) == [4]
    shutil.rmtree(tmp_path / "node1")  # that node is gone, with rank 1's own data file

    resumed = run_distributed(train_as_node, 1, args=(str(tmp_path), argv, 1), timeout=300)[0]
    output = capfd.readouterr().out
    assert "resuming from the local checkpoint of iteration 4 in" in output
    assert "(the newest durable one is 3)" in output
    assert resumed["losses"] == pytest.approx(reference["losses"][4:], rel=1e-5)
    assert resumed["final_valid"] == pytest.approx(reference["final_valid"], rel=1e-5)
    assert checkpoint_iterations(str(tmp_path / "node0")) == []  # the final durable checkpoint holds it all


def test_a_newer_durable_checkpoint_wins_over_an_older_local_one(corpus, reference, tmp_path, capfd):
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(corpus, "--save", save, "--load", save, "--save-interval", "5", iters=ITERS)
    with pytest.raises(RankFailed):  # rank 1 dies in step 6: durable 5, local 4
        run_distributed(train_as_node, 2, args=(str(tmp_path), argv, 4, None, 6), timeout=300)
    assert checkpoint_iterations(str(tmp_path / "node0")) == [4]

    resumed = run_distributed(train_as_node, 2, args=(str(tmp_path), argv, 4), timeout=300)[0]
    output = capfd.readouterr().out
    assert f"loaded checkpoint {save}/iter_0000005 at iteration 5" in output
    assert "resuming from the local checkpoint" not in output
    assert resumed["losses"] == pytest.approx(reference["losses"][5:], rel=1e-5)
