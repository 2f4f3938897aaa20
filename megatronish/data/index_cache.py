"""Sample-index caches in Megatron-core's own layout, so that its cached files are read, not rebuilt.

Megatron-core writes each dataset's index arrays to `path_to_cache` (--data-cache-path) as
    <md5 of the description>-<Class>-<split>-description.txt   (JSON: what the arrays depend on)
    <md5 of the description>-<Class>-<split>-<array>.npy
and the description also names the tokenizer, whose identifiers differ between Megatron
versions and from ours. The arrays do not depend on the tokenizer, so a cache entry is found
by reading the descriptions and comparing the fields that do decide the arrays (`IDENTITY`),
not by recomputing the md5. Entries written here use the same names and description format.
"""

import glob
import hashlib
import json
import math
import os

import numpy as np

from megatronish.cache import partial_path, save_npy_atomic

# The description fields that decide a dataset's index arrays (the tokenizer does not).
IDENTITY = {
    "GPTDataset": ("class", "dataset_path", "num_samples", "index_split", "random_seed", "sequence_length",
                   "split_matrix"),
    "BlendedDataset": ("class", "datasets", "split", "weights", "size"),
}


def _same_path(a, b) -> bool:
    return a == b or (isinstance(a, str) and isinstance(b, str) and os.path.realpath(a) == os.path.realpath(b))


def _same(stored, ours, key: str = "") -> bool:
    if key == "dataset_path":
        return _same_path(stored, ours)
    if isinstance(ours, dict):
        fields = IDENTITY.get(ours.get("class"), tuple(ours))
        return isinstance(stored, dict) and all(_same(stored.get(k), ours.get(k), k) for k in fields)
    if isinstance(ours, (list, tuple)):
        return (isinstance(stored, (list, tuple)) and len(stored) == len(ours)
                and all(_same(s, o) for s, o in zip(stored, ours)))
    if isinstance(ours, float) or isinstance(stored, float):
        return isinstance(stored, (int, float)) and isinstance(ours, (int, float)) and math.isclose(stored, ours)
    return stored == ours


def _base(cache_dir: str, digest: str, description: dict) -> str:
    split = description.get("index_split") or description.get("split")
    return os.path.join(cache_dir, f"{digest}-{description['class']}-{split}")


def find(cache_dirs, description: dict, arrays: tuple[str, ...]):
    """The cached arrays of the entry whose description matches ours on the identity fields
    ({name: array}, memory-mapped, and the description file), or (None, None)."""
    split = description.get("index_split") or description.get("split")
    for cache_dir in cache_dirs:
        pattern = os.path.join(glob.escape(str(cache_dir)), f"*-{description['class']}-{split}-description.txt")
        for path in sorted(glob.glob(pattern)):
            try:
                with open(path) as f:
                    stored = json.load(f)
            except (OSError, ValueError):
                continue  # not a description we can read: not ours to judge
            base = path[: -len("-description.txt")]
            files = {name: f"{base}-{name}.npy" for name in arrays}
            if _same(stored, description) and all(os.path.isfile(p) for p in files.values()):
                try:
                    return {name: _load_index(p) for name, p in files.items()}, path
                except ValueError as error:  # a cache: rebuild it
                    print(f"warning: {error}; rebuilding it", flush=True)
    return None, None


def _load_index(path: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"the sample-index cache file {path} is corrupt ({type(error).__name__}: {error})") from None
    if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"the sample-index cache file {path} is corrupt (a {array.dtype} array of shape {array.shape})")
    return array


def save(cache_dir, description: dict, arrays: dict[str, np.ndarray]) -> str:
    """Write the arrays, then the description last (an entry is complete once its description exists)."""
    text = json.dumps(description, indent=4)
    digest = hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()
    os.makedirs(cache_dir, exist_ok=True)
    base = _base(str(cache_dir), digest, description)
    for name, array in arrays.items():  # each rename is atomic; a racing builder writes the same bytes
        save_npy_atomic(f"{base}-{name}.npy", array)
    tmp = partial_path(f"{base}-description.txt")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, f"{base}-description.txt")
    return f"{base}-description.txt"
