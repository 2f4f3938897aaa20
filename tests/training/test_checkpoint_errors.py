"""Faults: bad checkpoints get errors naming the file, a mismatched model lists its tensors, a
save killed midway leaves the previous checkpoint loadable, a hung rank fails its peers in time."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from checkpoint_testing import build_corpus, pretrain_errors, run_pretrains, tiny_argv

from megatronish.testing import RankFailed, run_distributed
from megatronish.training import checkpointing, save_lock
from megatronish.training.checkpoint_manifest import MANIFEST_FILENAME
from megatronish.training.checkpointing import TRACKER_FILENAME, read_latest_iteration
from megatronish.training.save_lock import LOCK_FILENAME


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """A checkpoint of iteration 2 saved at TP=2."""
    directory = str(tmp_path_factory.mktemp("saved") / "ckpt")
    argv = tiny_argv(corpus, "--save", directory, "--exit-interval", "2", iters=4, tp=2)
    run_distributed(run_pretrains, 2, args=([argv],), timeout=300)
    return directory


def _damaged_copy(saved: str, root, name: str, damage) -> str:
    copy = str(root / name)
    shutil.copytree(saved, copy)
    damage(os.path.join(copy, "iter_0000002"), copy)
    return copy


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _describe_hidden_64(folder: str) -> None:
    _remove(folder, MANIFEST_FILENAME)
    path = os.path.join(folder, "checkpoint.json")
    with open(path) as f:
        common = json.load(f)
    common["model_config"]["hidden_size"] = 64
    _write(path, json.dumps(common))


def _remove(folder: str, *names: str) -> None:
    for name in names:
        os.remove(os.path.join(folder, name))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def test_missing_truncated_and_foreign_checkpoints_name_the_file(corpus, saved, tmp_path):
    cases = {  # name: (damage, words the message must contain)
        "folder_gone": (lambda it, root: shutil.rmtree(it), ["iter_0000002", "is missing"]),
        "data_file_gone": (lambda it, root: os.remove(os.path.join(it, "__1_0.distcp")),
                           ["__1_0.distcp", "is missing"]),
        "data_file_truncated": (lambda it, root: _truncate(os.path.join(it, "__0_0.distcp")),
                                ["__0_0.distcp", "is truncated"]),
        "index_truncated": (lambda it, root: _truncate(os.path.join(it, ".metadata")), [".metadata", "is truncated"]),
        # Folders with no manifest (not saved by megatronish, or before manifests) are judged by their files:
        "no_description": (lambda it, root: _remove(it, "checkpoint.json", MANIFEST_FILENAME),
                           ["checkpoint.json", "not a megatronish checkpoint"]),
        "foreign_description": (lambda it, root: (_remove(it, MANIFEST_FILENAME), _write(
                                    os.path.join(it, "checkpoint.json"), '{"format": "nemo"}')),
                                ["checkpoint.json", "'nemo'", "not a megatronish checkpoint"]),
        "legacy_index_truncated": (lambda it, root: (_remove(it, MANIFEST_FILENAME),
                                                     _truncate(os.path.join(it, ".metadata"))),
                                   [".metadata", "truncated or corrupt"]),
        "bad_tracker": (lambda it, root: _write(os.path.join(root, TRACKER_FILENAME), "latest"),
                        [TRACKER_FILENAME, "'latest'"]),
    }
    directories = {name: _damaged_copy(saved, tmp_path, name, damage) for name, (damage, _) in cases.items()}
    argvs = [tiny_argv(corpus, "--load", directory, iters=4) for directory in directories.values()]
    # A description whose model config says hidden 64 over tensors of hidden 32: each tensor is compared too.
    shapes = _damaged_copy(saved, tmp_path, "description_disagrees", lambda it, root: _describe_hidden_64(it))
    argvs.append(tiny_argv(corpus, "--load", shapes, "--hidden-size", "64", iters=4))
    messages = run_distributed(pretrain_errors, 1, args=(argvs,), timeout=300)[0]

    for (name, (_, words)), message in zip(cases.items(), messages):
        for word in words:
            assert word in message, (name, message)
    mismatch = messages[-1]
    assert "tensor(s) differ in shape" in mismatch
    assert "model.embedding.word_embeddings.weight: saved [258, 32], expected [258, 64]" in mismatch
    assert "model.decoder.layers.0.mlp.linear_fc1.weight: saved [2, 64, 32], expected [2, 64, 64]" \
        in mismatch  # SwiGLU's stride-2 weight [gate; up] is stored as [stride, rows / stride, columns]
    assert "... and 84 more" in mismatch  # the optimizer's 3 x 28 tensors


def test_resuming_another_architecture_is_refused_unless_finetuning_into_it(corpus, saved, tmp_path):
    changes = {"--normalization RMSNorm": "normalization: saved 'LayerNorm', requested 'RMSNorm'",
               "--position-embedding-type rope": "position_embedding_type: saved 'learned_absolute', requested 'rope'",
               "--disable-bias-linear": "add_bias_linear: saved True, requested False",
               "--hidden-size 64": "hidden_size: saved 32, requested 64"}
    argvs = [tiny_argv(corpus, "--load", saved, *flags.split(), iters=4) for flags in changes]
    finetune = tiny_argv(corpus, "--load", saved, "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                         "--finetune", "--allow-architecture-change", "--save", str(tmp_path / "tuned"), iters=3)
    messages = run_distributed(pretrain_errors, 1, args=(argvs + [finetune],), timeout=300)[0]
    for (flags, difference), message in zip(changes.items(), messages):
        assert message.startswith(f"ValueError: the checkpoint {saved}/iter_0000002 holds another model "
                                  f"architecture ({difference}): resume with the model arguments it was saved "
                                  "with"), (flags, message)
    assert messages[-1] == "no error"  # fine-tuned 3 iterations from the shared weights
    assert read_latest_iteration(str(tmp_path / "tuned")) == 3


class KillDuringSecondSave:
    """Replaces checkpointing.save_blocks: the second save writes its files, then rank 0 truncates
    one of them and is SIGKILLed before the folder is renamed into place."""

    def __init__(self):
        self.real, self.calls = checkpointing.save_blocks, 0

    def __call__(self, state, directory, **kwargs):
        self.calls += 1
        self.real(state, directory, **kwargs)
        if self.calls == 2 and int(os.environ["RANK"]) == 0:
            _truncate(os.path.join(directory, "__0_0.distcp"))
            os.kill(os.getpid(), 9)


def _train_with_killed_save(argv):
    checkpointing.save_blocks = KillDuringSecondSave()
    run_pretrains([argv])


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(corpus, tmp_path):
    directory = str(tmp_path / "ckpt")
    argv = tiny_argv(corpus, "--save", directory, "--load", directory, "--save-interval", "2", iters=4, tp=2)
    with pytest.raises(RankFailed):  # rank 0 killed; rank 1 may report the broken barrier first
        run_distributed(_train_with_killed_save, 2, args=(argv,), timeout=300)
    assert read_latest_iteration(directory) == 2
    assert sorted(os.listdir(directory)) == [LOCK_FILENAME, "iter_0000002", "iter_0000004.tmp", TRACKER_FILENAME]
    with open(os.path.join(directory, "iter_0000002", "checkpoint.json")) as f:
        assert json.load(f)["iteration"] == 2

    resumed = run_distributed(run_pretrains, 2, args=([argv],), timeout=300)[0][0]
    assert resumed["iteration"] == 4 and len(resumed["losses"]) == 2  # iterations 3 and 4, from the checkpoint of 2
    assert sorted(os.listdir(directory)) == [LOCK_FILENAME, "iter_0000002", "iter_0000004", TRACKER_FILENAME]


def test_a_hung_rank_fails_its_peers_within_the_distributed_timeout(corpus):
    argv = tiny_argv(corpus, "--distributed-timeout-minutes", "0.05", iters=4, tp=2)  # 3 s
    start = time.monotonic()
    with pytest.raises(RankFailed) as failure:
        run_distributed(run_pretrains, 2, args=([argv], [("hang", 1, 2)]), timeout=120)
    assert time.monotonic() - start < 60
    message = str(failure.value)
    assert "rank 0 of 2 failed" in message
    assert "CollectiveError: timed out in the tensor-parallel collectives and pipeline transfers of forward/backward at iteration 2" in message
    assert "--distributed-timeout-minutes" in message


def _train_with_hung_save(argv):
    real = checkpointing.save_blocks

    def save_blocks(*args, **kwargs):
        if int(os.environ["RANK"]) == 1:
            time.sleep(3600)
        return real(*args, **kwargs)

    checkpointing.save_blocks = save_blocks
    # As under torchrun, where the world group gets --distributed-timeout-minutes (here: the harness's group).
    torch.distributed.distributed_c10d._set_pg_timeout(timedelta(minutes=0.05))
    run_pretrains([argv])


def test_a_rank_hung_in_a_save_fails_its_peers_naming_the_save(corpus, tmp_path):
    argv = tiny_argv(corpus, "--save", str(tmp_path / "ckpt"), "--save-interval", "2",
                     "--distributed-timeout-minutes", "0.05", iters=4, tp=2)
    with pytest.raises(RankFailed) as failure:
        run_distributed(_train_with_hung_save, 2, args=(argv,), timeout=120)
    assert "rank 0 of 2 failed" in str(failure.value)
    assert (f"CollectiveError: timed out in writing {tmp_path}/ckpt/iter_0000002 while saving the checkpoint of "
            "iteration 2 (a peer rank is hung or dead; the limit is --distributed-timeout-minutes)") in str(failure.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs: a checkpoint of the tiny GPT (~0.7 MB) does not fit."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(folder)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_failed_background_save_stops_training_at_once_with_the_os_error(corpus, small_disk):
    argv = tiny_argv(corpus, "--save", str(small_disk / "ckpt"), "--save-interval", "2", "--async-save", iters=5)
    with pytest.raises(RankFailed) as failure:
        run_distributed(run_pretrains, 1, args=([argv],), timeout=120)
    message = str(failure.value)
    assert (f"OSError: writing checkpoint {small_disk}/ckpt/iter_0000002.tmp failed: [Errno 28] No space left on "
            "device") in message
    assert "CheckpointException" not in message


def test_the_loop_check_raises_a_failed_background_save_without_waiting_for_a_running_one():
    # Deterministic half of the test above (there, whether the loop's check or the next save sees the
    # failure first depends on the machine's load).
    from concurrent.futures import Future

    from megatronish.training import checkpointing

    running, failed = Future(), Future()
    failed.set_exception(OSError(28, "No space left on device"))
    try:
        checkpointing._pending = running
        checkpointing.raise_if_async_save_failed()  # returns at once: the write is still going
        assert checkpointing._pending is running
        checkpointing._pending = failed
        with pytest.raises(OSError, match="No space left on device"):
            checkpointing.raise_if_async_save_failed()
        assert checkpointing._pending is None  # raised once; the next save does not raise it again
    finally:
        checkpointing._pending = None


def test_a_second_run_on_one_save_folder_is_refused(corpus, tmp_path):
    folder = tmp_path / "ckpt"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from megatronish.training import save_lock; "
                               "assert save_lock._lock(sys.argv[1]) is None; print('locked', flush=True); "
                               "time.sleep(600)", str(folder)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RankFailed) as failure:
            run_distributed(run_pretrains, 1, args=([tiny_argv(corpus, "--save", str(folder), iters=3)],), timeout=120)
        assert (f"another run (host {socket.gethostname()}, pid {holder.pid}) is saving into --save {folder} "
                f"(it holds {folder}/{LOCK_FILENAME})") in str(failure.value)
    finally:
        holder.kill()
        holder.wait()
    assert save_lock._lock(str(folder)) is None  # released with its holder's death
