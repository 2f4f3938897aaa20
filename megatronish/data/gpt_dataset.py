"""GPT training samples from indexed datasets: splits, shuffled epochs, sample indices, blending.

How samples are laid out (all from one seeded numpy Generator, so the same inputs give the same
samples on every machine):
- document index: the split's documents in a fresh random order for every epoch, as many epochs
  as `num_samples` needs. Every epoch holds each document exactly once.
- sample index: the documents of the document index are read as one token stream; sample i is
  tokens [i * s, (i + 1) * s] of that stream (s + 1 tokens), so consecutive samples share one
  boundary token and samples cross document boundaries. Stored as (position in the document
  index, offset in that document) for i = 0..num_samples, found with one vectorized searchsorted.
- shuffle index: the order in which samples are served; samples are permuted within the epoch
  where they start, so the first epoch is served completely before the second begins.
The three arrays are cached as .npy files under a hash of everything they depend on (the .idx
contents, the split's document range, seq_length, seed, num_samples).
"""

import hashlib
import json
import os

import numpy as np
import torch

from megatronish.data.blended_dataset import BlendedDataset, build_blend_index
from megatronish.cache import cache_root, save_npy_atomic
from megatronish.data.indexed_dataset import IndexedDataset

INDEX_FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")


class GPTDataset(torch.utils.data.Dataset):
    """`num_samples` samples of `seq_length` tokens from documents [start, stop) of an indexed dataset.

    Each item is a dict of tensors: tokens int64 [s], labels int64 [s] (tokens shifted by one),
    loss_mask float32 [s] (0 where the input token is EOD when `eod_mask_loss`), position_ids int64 [s].
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        document_range: tuple[int, int],
        num_samples: int,
        seq_length: int,
        seed: int,
        eod_id: int,
        eod_mask_loss: bool = False,
        cache_dir=None,
        name: str = "train",
    ):
        if num_samples < 1 or seq_length < 1:
            raise ValueError(f"num_samples ({num_samples}) and seq_length ({seq_length}) must be positive")
        self.indexed = indexed
        self.document_range = tuple(int(d) for d in document_range)
        self.num_samples, self.seq_length, self.seed = int(num_samples), int(seq_length), int(seed)
        self.eod_id, self.eod_mask_loss, self.name = eod_id, eod_mask_loss, name
        self._document_starts, self._document_lengths = indexed.document_offsets, indexed.document_lengths
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build_indices(
            cache_dir or cache_root() / "gpt-indices"
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        tokens = torch.from_numpy(self.sample_tokens(index).astype(np.int64))
        inputs, labels = tokens[:-1], tokens[1:]
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[inputs == self.eod_id] = 0.0
        return {
            "tokens": inputs,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }

    def sample_tokens(self, index: int) -> np.ndarray:
        """The seq_length + 1 tokens of the index-th sample served (after shuffling)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for the {self.num_samples}-sample {self.name} dataset")
        i = int(self.shuffle_index[index])
        (first, first_offset), (last, last_offset) = self.sample_index[i], self.sample_index[i + 1]
        starts = self._document_starts[self.document_index[first : last + 1]]
        if first == last:
            return self.indexed.tokens[starts[0] + first_offset : starts[0] + last_offset + 1]
        lengths = self._document_lengths[self.document_index[first : last + 1]]
        pieces = [self.indexed.tokens[starts[0] + first_offset : starts[0] + lengths[0]]]
        pieces += [self.indexed.tokens[start : start + length] for start, length in zip(starts[1:-1], lengths[1:-1])]
        pieces.append(self.indexed.tokens[starts[-1] : starts[-1] + last_offset + 1])
        return np.concatenate(pieces)

    def _cache_key(self) -> str:
        description = {
            "version": INDEX_FORMAT_VERSION,
            "idx_sha256": self.indexed.index_sha256,
            "document_range": self.document_range,
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]

    def _load_or_build_indices(self, cache_dir):
        key = self._cache_key()
        paths = [os.path.join(cache_dir, f"{key}-{part}.npy") for part in ("document", "sample", "shuffle")]
        if all(os.path.exists(p) for p in paths):
            try:
                return [_load_index(p) for p in paths]
            except ValueError as error:  # a cache: rebuild it
                print(f"warning: {error}; rebuilding it", flush=True)
        os.makedirs(cache_dir, exist_ok=True)
        arrays = build_gpt_indices(
            self._document_lengths, self.document_range, self.num_samples, self.seq_length, self.seed
        )
        for path, array in zip(paths, arrays):  # each rename is atomic; a racing builder writes the same bytes
            save_npy_atomic(path, array)
        return [_load_index(p) for p in paths]


def _load_index(path: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r").view(np.ndarray)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"the sample-index cache file {path} is corrupt ({type(error).__name__}: {error})") from None
    if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"the sample-index cache file {path} is corrupt (a {array.dtype} array of shape {array.shape})")
    return array


def build_gpt_indices(
    document_lengths: np.ndarray, document_range: tuple[int, int], num_samples: int, seq_length: int, seed: int
):
    """The (document index, sample index, shuffle index) of a GPT dataset; see the module docstring.

    Works from document lengths alone (tokens per document of the whole dataset), so that the
    cost can be measured without the tokens themselves.
    """
    start, stop = document_range
    document_dtype = np.int32 if stop <= np.iinfo(np.int32).max else np.int64
    documents = np.arange(start, stop, dtype=document_dtype)
    lengths = np.asarray(document_lengths[start:stop], dtype=np.int64)
    tokens_per_epoch = int(lengths.sum())
    if tokens_per_epoch == 0:
        raise ValueError(f"documents {start}:{stop} hold no tokens; a GPT dataset needs at least one")
    # Sample i needs stream positions up to (i + 1) * seq_length inclusive.
    num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
    rng = np.random.default_rng(seed)

    # Each row is one epoch's random permutation of the documents (shuffled in place, row by row).
    document_index = np.tile(documents, (num_epochs, 1))
    rng.permuted(document_index, axis=1, out=document_index)
    document_index = document_index.ravel()

    stream_starts = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(np.asarray(document_lengths, dtype=np.int64)[document_index], out=stream_starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # side="right" skips empty documents: position p lies in the one document that contains it.
    in_document = np.searchsorted(stream_starts, positions, side="right") - 1
    sample_index = np.stack([in_document, positions - stream_starts[in_document]], axis=1)

    epoch_of_sample = positions[:-1] // tokens_per_epoch
    shuffle_index = np.lexsort((rng.random(num_samples), epoch_of_sample))
    return document_index, sample_index, shuffle_index


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Megatron's --split "949,50,1" (or "0.9,0.1") -> (start, stop) document ranges of train/valid/test."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r} must be up to three comma-separated numbers, like 949,50,1") from None
    if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r} must be up to three non-negative numbers with a positive sum")
    weights += [0.0] * (3 - len(weights))
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / sum(weights) * num_documents)))
    excess = bounds[-1] - num_documents  # rounding may overshoot or undershoot by one; the last splits absorb it
    bounds = [0] + [b - excess for b in bounds[1:]]
    return [(max(bounds[i], 0), max(bounds[i + 1], 0)) for i in range(3)]


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """["prefix"], ["prefixA", "prefixB"] (weights follow the sizes) or ["0.3", "prefixA", "0.7", "prefixB"]."""
    if not data_path:
        raise ValueError("--data-path is empty; give one prefix, or weight prefix pairs like 0.3 a 0.7 b")
    if len(data_path) % 2 == 0 and _is_number(data_path[0]):
        weights = []
        for weight in data_path[0::2]:
            if not _is_number(weight) or float(weight) <= 0:
                raise ValueError(f"--data-path weight {weight!r} must be a positive number (form: 0.3 a 0.7 b)")
            weights.append(float(weight))
        return list(data_path[1::2]), weights
    if any(_is_number(item) for item in data_path):
        raise ValueError(f"--data-path {data_path} mixes numbers and prefixes; use 'prefix' or '0.3 a 0.7 b'")
    return list(data_path), None


def build_gpt_datasets(
    data_path: list[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    eod_id: int,
    eod_mask_loss: bool = False,
    cache_dir=None,
):
    """(train, valid, test) datasets from Megatron's --data-path, --split, --seq-length, --seed.

    `num_samples[i]` samples are drawn for split i; a split with 0 samples requested, or no
    documents, is None. With several prefixes the split is a BlendedDataset that mixes them in
    the given proportions (proportional to their token counts when no weights are given).

    Every rank must call this together when torch.distributed is initialized: local rank 0 of
    each node builds the cached indices while the other ranks wait at a barrier, then they load
    them (and build them themselves if their node sees no cache, e.g. without LOCAL_RANK).
    """
    prefixes, weights = parse_data_path(data_path)
    if len(num_samples) != 3:
        raise ValueError(f"num_samples {num_samples} must give three counts: (train, valid, test)")

    def build():
        indexed = [IndexedDataset(p) for p in prefixes]
        blend_weights = weights or [float(d.num_tokens) for d in indexed]
        return tuple(
            _build_split(indexed, blend_weights, split, i, n, seq_length, seed, eod_id, eod_mask_loss, cache_dir)
            for i, n in enumerate(num_samples)
        )

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return build()
    if int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())) == 0:
        try:
            return build()
        finally:  # reached even when building fails, so that the others go on to fail the same way
            torch.distributed.barrier()
    torch.distributed.barrier()
    return build()


def _build_split(indexed, weights, split, split_index, num_samples, seq_length, seed, eod_id, eod_mask_loss, cache_dir):
    if num_samples <= 0:
        return None
    name = SPLIT_NAMES[split_index]
    ranges = [split_document_ranges(split, d.num_documents)[split_index] for d in indexed]
    present = [i for i, (start, stop) in enumerate(ranges) if stop > start]
    if not present:
        return None

    def make(i, n):
        return GPTDataset(indexed[i], ranges[i], n, seq_length, seed, eod_id, eod_mask_loss, cache_dir, name)

    if len(indexed) == 1:
        return make(0, num_samples)
    if len(present) < len(indexed):
        empty = [indexed[i].prefix for i in range(len(indexed)) if i not in present]
        print(f"warning: the {name} split of {empty} is empty; blending the {name} split of the others only")
    dataset_index, dataset_sample_index = build_blend_index([weights[i] for i in present], num_samples)
    counts = np.bincount(dataset_index, minlength=len(present))
    # A dataset whose weight is too small to get a sample in this split is left out (None).
    members = [make(i, int(c)) if c > 0 else None for i, c in zip(present, counts)]
    return BlendedDataset(members, dataset_index, dataset_sample_index)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
