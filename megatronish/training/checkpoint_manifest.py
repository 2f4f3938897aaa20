"""Which checkpoints are complete: a manifest per checkpoint folder, and the choice of the one to load.

A save writes `manifest.json` last into the checkpoint folder: every other file with its size.
A checkpoint is complete when every file the manifest names is there at that size. Through a
bucket mount (SkyPilot's MOUNT_CACHED uploads files a few seconds after they close, in no fixed
order) a tracker can name a folder whose data files never arrived; `--load` then falls back to
the newest complete checkpoint before it, and says so, instead of failing or starting over.

Folders without a manifest (saved before manifests existed, or not by megatronish) are checked
against DCP's own index: every data file it names, long enough.
"""

import json
import os

from megatronish.training.checkpoint_format import read_metadata

MANIFEST_FILENAME = "manifest.json"


def write_manifest(folder: str, write_durably) -> None:
    """List every file of `folder` (written, closed, synced) with its size in its manifest."""
    files = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    files.pop(MANIFEST_FILENAME, None)
    text = json.dumps({"files": files}, indent=1, sort_keys=True) + "\n"
    write_durably(os.path.join(folder, MANIFEST_FILENAME), text)


def why_incomplete(folder: str) -> str | None:
    """None when the checkpoint in `folder` is complete, else what is wrong (naming the file)."""
    manifest = os.path.join(folder, MANIFEST_FILENAME)
    if not os.path.isdir(folder):
        return f"{folder} is missing"
    if not os.path.isfile(manifest):
        return _why_legacy_incomplete(folder)
    try:
        with open(manifest, "rb") as f:
            files = json.loads(f.read().decode())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{manifest} is unreadable ({type(error).__name__}: {error})"
    for name, size in sorted(files.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} is truncated or changed: {os.path.getsize(path)} bytes, its manifest says {size}"
    return None


def _why_legacy_incomplete(folder: str) -> str | None:
    try:
        read_metadata(folder)
    except (OSError, ValueError) as error:
        return str(error)
    return None


def checkpoint_iterations(root: str) -> list[int]:
    """Iterations of the published `iter_XXXXXXX` folders under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    return sorted((int(name[5:]) for name in os.listdir(root) if name.startswith("iter_") and name[5:].isdigit()),
                  reverse=True)


def choose_checkpoint(root: str, tracked: int | None, folder_of) -> tuple[int | None, list[str]]:
    """The iteration to load from `root` and the log lines that explain the choice.

    `tracked` is the tracker file's iteration (None: no tracker). The tracked checkpoint when it
    is complete; otherwise the newest complete one below it (any, without a tracker: a save
    killed before its first tracker write, or a tracker lost). None when `root` holds no
    iter_ folder at all (a fresh start). Raises FileNotFoundError when there are folders but
    none is complete (nothing safe to resume from, and starting over would overwrite them).
    """
    notes, reasons = [], []
    candidates = [i for i in checkpoint_iterations(root) if tracked is None or i <= tracked]
    if tracked is not None and tracked not in candidates:
        candidates.insert(0, tracked)  # its folder is gone: why_incomplete says so
    for iteration in candidates:
        reason = why_incomplete(folder_of(iteration))
        if reason is None:
            if iteration != tracked:
                notes.append(f"loading {folder_of(iteration)}, the newest complete checkpoint"
                             + (" (no tracker file)" if tracked is None else ""))
            return iteration, notes + reasons
        reasons.append(f"skipping incomplete checkpoint of iteration {iteration}: {reason}")
    if not candidates:
        return None, []
    raise FileNotFoundError(f"no complete checkpoint in {root}: " + "; ".join(reasons)
                            + ". Restore the missing files, or move the folder away to start from scratch")
