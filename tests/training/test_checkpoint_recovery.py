"""Recovering from damaged or confusing checkpoint folders (the tiny GPT of checkpoint_testing, TP=1):

- each checkpoint holds a manifest of its files with their sizes, written last;
- a tracked checkpoint with a missing or truncated shard (a bucket mount that never uploaded it)
  is skipped with a log line: --load resumes from the newest complete one before it;
- a folder with iter_* checkpoints but no tracker resumes from the newest complete one instead of
  starting over (and overwriting them); folders of which none is complete are refused;
  --finetune of a folder without checkpoints is refused instead of training from random weights;
- --keep-last prunes among the iterations up to the one just saved, never a newer folder's
  neighbour the tracker names;
- a tracker with binary bytes is an error naming the file.
"""

import json
import os
import shutil

import pytest
from checkpoint_testing import build_corpus, run_pretrains, tiny_argv

from megatronish.testing import RankFailed, run_distributed
from megatronish.training.checkpoint_manifest import MANIFEST_FILENAME
from megatronish.training.checkpointing import TRACKER_FILENAME, newest_complete_checkpoint, read_latest_iteration
from megatronish.training.save_lock import LOCK_FILENAME

ITERS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """Checkpoints of iterations 2, 4 and 6 (the tracker names 6)."""
    directory = str(tmp_path_factory.mktemp("saved") / "ckpt")
    run_distributed(run_pretrains, 1, args=([_argv(corpus, directory, "--save-interval", "2")],), timeout=300)
    return directory


def _argv(corpus, directory, *extra):
    return tiny_argv(corpus, "--save", directory, "--load", directory, *extra, iters=ITERS)


def _copy(saved, tmp_path, name) -> str:
    return shutil.copytree(saved, str(tmp_path / name))


def _pretrain(argv) -> dict:
    return run_distributed(run_pretrains, 1, args=([argv],), timeout=300)[0][0]


def test_the_manifest_names_every_other_file_with_its_size(saved):
    folder = os.path.join(saved, "iter_0000006")
    with open(os.path.join(folder, MANIFEST_FILENAME)) as f:
        files = json.load(f)["files"]
    on_disk = {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)}
    assert files == {name: size for name, size in on_disk.items() if name != MANIFEST_FILENAME}
    assert {"checkpoint.json", ".metadata", "__0_0.distcp"} <= set(files)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_an_incomplete_newest_checkpoint_falls_back_to_the_newest_complete_one(corpus, saved, tmp_path, damage):
    directory = _copy(saved, tmp_path, damage)
    shard = os.path.join(directory, "iter_0000006", "__0_0.distcp")
    if damage == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 1)
    else:
        os.remove(shard)
    iteration, notes = newest_complete_checkpoint(directory)
    assert iteration == 4
    assert notes[0].startswith(f"loading {directory}/iter_0000004, the newest complete checkpoint")
    assert f"skipping incomplete checkpoint of iteration 6: {shard} is" in notes[1]

    resumed = _pretrain(_argv(corpus, directory))
    assert resumed["iteration"] == ITERS and len(resumed["losses"]) == 2  # iterations 5 and 6, from 4
    assert read_latest_iteration(directory) == ITERS and newest_complete_checkpoint(directory) == (ITERS, [])


def test_a_folder_without_tracker_resumes_from_its_newest_checkpoint(corpus, saved, tmp_path):
    directory = _copy(saved, tmp_path, "untracked")
    os.remove(os.path.join(directory, TRACKER_FILENAME))
    assert newest_complete_checkpoint(directory)[0] == 6
    resumed = _pretrain(_argv(corpus, directory, "--train-iters", "8"))
    assert resumed["iteration"] == 8 and len(resumed["losses"]) == 2  # not 8 iterations from scratch


def test_folders_with_no_complete_checkpoint_and_finetune_without_one_are_refused(corpus, saved, tmp_path):
    directory = _copy(saved, tmp_path, "broken")
    for iteration in (2, 4, 6):
        os.remove(os.path.join(directory, f"iter_{iteration:07d}", ".metadata"))
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint in .*broken: skipping incomplete "
                                                r"checkpoint of iteration 6: .*iter_0000006/\.metadata is missing"):
        newest_complete_checkpoint(directory)
    empty = str(tmp_path / "empty")
    with pytest.raises(RankFailed, match=r"--finetune --load .*empty: there is no checkpoint in .*empty to fine-tune"):
        _pretrain(tiny_argv(corpus, "--load", empty, "--finetune", iters=ITERS))


def test_keep_last_never_deletes_the_checkpoint_just_written(corpus, saved, tmp_path):
    directory = _copy(saved, tmp_path, "rolled_back")
    with open(os.path.join(directory, TRACKER_FILENAME), "w") as f:
        f.write("2")  # a rollback to iteration 2: iter_0000006 is from the abandoned history
    resumed = _pretrain(_argv(corpus, directory, "--train-iters", "4", "--save-interval", "2", "--keep-last", "1"))
    assert resumed["iteration"] == 4
    assert sorted(os.listdir(directory)) == [LOCK_FILENAME, "iter_0000004", "iter_0000006", TRACKER_FILENAME]
    assert newest_complete_checkpoint(directory) == (4, [])


def test_a_tracker_with_binary_bytes_names_the_file(tmp_path):
    tracker = tmp_path / TRACKER_FILENAME
    tracker.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError) as error:
        read_latest_iteration(str(tmp_path))
    assert f"{tracker} should hold an iteration number" in str(error.value) and "xff" in str(error.value)


def test_a_resume_with_a_larger_eval_interval_sizes_the_validation_set_for_both(corpus, tmp_path):
    directory = str(tmp_path / "evaluated")
    first = _pretrain(tiny_argv(corpus, "--save", directory, "--eval-interval", "1", iters=4))
    assert sorted(first["valid"]) == [1, 2, 3, 4]  # 4 evaluations consumed
    resumed = _pretrain(_argv(corpus, directory, "--eval-interval", "8", "--train-iters", "8"))
    assert resumed["iteration"] == 8 and sorted(resumed["valid"]) == [8]
