"""Faults: bad checkpoints get errors naming the file, a mismatched model lists its tensors, a
save killed midway leaves the previous checkpoint loadable, a hung rank fails its peers in time."""

import json
import os
import shutil
import time

import pytest
from checkpoint_testing import build_corpus, run_pretrains, tiny_argv

from megatronish.testing import RankFailed, run_distributed
from megatronish.training import checkpointing
from megatronish.training.checkpoint_manifest import MANIFEST_FILENAME
from megatronish.training.checkpointing import TRACKER_FILENAME, read_latest_iteration


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


def _load_errors(argvs: list[list[str]]) -> list[str]:
    """Each argv's error message (pretrain with --load fails before any data is read)."""
    messages = []
    for argv in argvs:
        try:
            run_pretrains([argv])
            messages.append("no error")
        except Exception as error:  # noqa: BLE001 - the message is what the test checks
            messages.append(f"{type(error).__name__}: {error}")
    return messages


def _damaged_copy(saved: str, root, name: str, damage) -> str:
    copy = str(root / name)
    shutil.copytree(saved, copy)
    damage(os.path.join(copy, "iter_0000002"), copy)
    return copy


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


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
    argvs.append(tiny_argv(corpus, "--load", saved, "--hidden-size", "64", iters=4))  # another model shape
    messages = run_distributed(_load_errors, 1, args=(argvs,), timeout=300)[0]

    for (name, (_, words)), message in zip(cases.items(), messages):
        for word in words:
            assert word in message, (name, message)
    mismatch = messages[-1]
    assert "tensor(s) differ in shape" in mismatch
    assert "model.embedding.word_embeddings.weight: saved [258, 32], expected [258, 64]" in mismatch
    assert "model.decoder.layers.0.mlp.linear_fc1.weight: saved [2, 64, 32], expected [2, 64, 64]" \
        in mismatch  # SwiGLU's stride-2 weight [gate; up] is stored as [stride, rows / stride, columns]
    assert "... and 84 more" in mismatch  # the optimizer's 3 x 28 tensors


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
    assert sorted(os.listdir(directory)) == ["iter_0000002", "iter_0000004.tmp", TRACKER_FILENAME]
    with open(os.path.join(directory, "iter_0000002", "checkpoint.json")) as f:
        assert json.load(f)["iteration"] == 2

    resumed = run_distributed(run_pretrains, 2, args=([argv],), timeout=300)[0][0]
    assert resumed["iteration"] == 4 and len(resumed["losses"]) == 2  # iterations 3 and 4, from the checkpoint of 2
    assert sorted(os.listdir(directory)) == ["iter_0000002", "iter_0000004", TRACKER_FILENAME]


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
