"""GPT training samples: Megatron-core's GPTDataset, sample for sample.

For the same data, --seed, --split, --seq-length and number of samples, the samples (and the
cached index arrays) are the ones Megatron-core's GPTDataset and BlendedDataset produce:
- split: --split "949,50,1" (any separators, quotes included, as Megatron reads it) is normalized
  to fractions; split i covers the .idx *sequences* [round(lo * N), round(hi * N)) (GPTDataset
  counts sequences, not documents);
- epochs: as many passes over the split as the requested samples need
  (num_samples * seq_length + 1 tokens), every sample of every epoch is built;
- document index: the split's sequence ids repeated per epoch and shuffled with
  numpy.random.RandomState(seed), all epochs together, except that a last epoch from which fewer
  than 80% of its samples are needed is shuffled on its own ("separate final epoch");
- sample index: the sequences of the document index are read as one token stream; sample i is
  stream tokens [i * s, (i + 1) * s] (s + 1 tokens: inputs and labels), stored as
  (position in the document index, offset in that sequence) for i = 0..num_samples;
- shuffle index: a permutation of the samples from the same RandomState (the samples of a separate
  final epoch are permuted among themselves, after the others).
Megatron's cached index files (--data-cache-path) are read when their description matches
(index_cache.py); otherwise the arrays are built and cached in the same layout.
"""

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from megatronish.cache import cache_root
from megatronish.data import index_cache
from megatronish.data.blended_dataset import BlendedDataset, build_blend_index, normalize
from megatronish.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")
_INDEX_ARRAYS = ("document_index", "sample_index", "shuffle_index")
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80  # Megatron's: a last epoch needed below this fraction is shuffled apart


@dataclass
class GPTDatasetConfig:
    """What decides the samples (Megatron-core's GPTDatasetConfig fields, by their names)."""
    random_seed: int
    sequence_length: int
    split: str = "969, 30, 1"
    eod_id: int = 0
    eod_mask_loss: bool = False
    path_to_cache: str | None = None  # --data-cache-path; None: ~/.cache/megatronish/gpt-indices
    mmap_bin_files: bool = True
    mid_level_dataset_surplus: float = 0.005  # extra samples each blended member builds
    mock_vocab_size: int | None = None  # --mock-data: Megatron's synthetic sequences over this vocabulary

    @property
    def split_matrix(self) -> list:
        return split_matrix(parse_and_normalize_split(self.split))


class GPTDataset(torch.utils.data.Dataset):
    """The samples of sequences `sequence_range` of an indexed dataset (`split_name` of its --split).

    `num_samples` is the number asked for; the dataset holds every sample of the epochs that
    takes (so `len()` may be larger), as Megatron's does. Each item is a dict of tensors: tokens
    int64 [s], labels int64 [s] (tokens shifted by one), loss_mask float32 [s] (0 where the input
    token is EOD with eod_mask_loss), position_ids int64 [s].
    """

    def __init__(self, indexed: IndexedDataset, dataset_path: str, sequence_range: tuple[int, int],
                 num_samples: int | None, split_name: str, config: GPTDatasetConfig):
        self.indexed, self.dataset_path, self.config = indexed, dataset_path, config
        self.sequence_range = tuple(int(i) for i in sequence_range)
        self.num_samples, self.split_name = num_samples, split_name
        self.seq_length = config.sequence_length
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build_indices()

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, index: int) -> dict:
        tokens = torch.from_numpy(self.sample_tokens(index).astype(np.int64))
        inputs, labels = tokens[:-1], tokens[1:]
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        if self.config.eod_mask_loss:
            loss_mask[inputs == self.config.eod_id] = 0.0
        return {"tokens": inputs, "labels": labels, "loss_mask": loss_mask,
                "position_ids": torch.arange(self.seq_length, dtype=torch.int64)}

    def sample_tokens(self, index: int) -> np.ndarray:
        """The seq_length + 1 tokens of the index-th sample served (after shuffling)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for the {len(self)}-sample {self.split_name} dataset")
        i = int(self.shuffle_index[index])
        (first, first_offset), (last, last_offset) = self.sample_index[i], self.sample_index[i + 1]
        if first == last:
            return self.indexed.get(int(self.document_index[first]), int(first_offset),
                                    int(last_offset - first_offset + 1))
        pieces = [self.indexed.get(int(self.document_index[first]), int(first_offset))]
        pieces += [self.indexed.get(int(self.document_index[k])) for k in range(first + 1, last)]
        pieces.append(self.indexed.get(int(self.document_index[last]), 0, int(last_offset + 1)))
        return np.concatenate(pieces)

    def description(self) -> dict:
        """Megatron's description of this dataset (its cache files are named after its md5)."""
        return {"class": "GPTDataset", "dataset_path": self.dataset_path, "num_samples": self.num_samples,
                "index_split": self.split_name, "random_seed": self.config.random_seed,
                "sequence_length": self.seq_length, "split": self.config.split,
                "split_matrix": self.config.split_matrix}

    def _load_or_build_indices(self):
        start, stop = self.sequence_range
        if isinstance(self.indexed, MockIndexedDataset):  # cheap to rebuild; Megatron caches none either
            return build_gpt_indices(self.indexed.sequence_lengths, np.arange(start, stop, dtype=np.int32),
                                     self.num_samples, self.seq_length, self.config.random_seed)
        arrays, _ = index_cache.find(_cache_dirs(self.config, self.dataset_path), self.description(), _INDEX_ARRAYS)
        if arrays is not None and self._consistent(arrays):
            return [arrays[name] for name in _INDEX_ARRAYS]
        built = build_gpt_indices(self.indexed.sequence_lengths, np.arange(start, stop, dtype=np.int32),
                                  self.num_samples, self.seq_length, self.config.random_seed)
        index_cache.save(_write_dir(self.config), self.description(), dict(zip(_INDEX_ARRAYS, built)))
        return built

    def _consistent(self, arrays: dict) -> bool:
        """A cached entry fits this dataset (guards against a data file rewritten under the same path)."""
        documents, samples = arrays["document_index"], arrays["sample_index"]
        start, stop = self.sequence_range
        return (len(documents) > 0 and len(documents) % max(stop - start, 1) == 0
                and int(documents.min()) >= start and int(documents.max()) < stop
                and samples.ndim == 2 and len(arrays["shuffle_index"]) <= len(samples) - 1)


class MockIndexedDataset:
    """Megatron's MockGPTLowLevelDataset (--mock-data): 100000 sequences of 1..4095 tokens (lengths from
    numpy's default_rng(0)); sequence i is the ids 1, 2, ... (mod the vocabulary) followed by EOD."""
    SIZE, MAX_LENGTH = 100_000, 4096

    def __init__(self, vocab_size: int, eod_id: int):
        self.vocab_size, self.eod_id = vocab_size, eod_id
        self.sequence_lengths = np.random.default_rng(0).integers(1, self.MAX_LENGTH, size=self.SIZE, dtype=np.int32)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))

    def __len__(self) -> int:
        return self.SIZE

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        size = int(self.sequence_lengths[index])
        length = size - offset if length is None else length
        sequence = np.concatenate([(np.arange(size - 1, dtype=np.int64) + 1) % self.vocab_size, [self.eod_id]])
        return sequence[offset:offset + length]


def _cache_dirs(config: GPTDatasetConfig, dataset_path: str) -> list:
    """Where cached indices may be: --data-cache-path, else ours and Megatron's default beside the data."""
    if config.path_to_cache:
        return [config.path_to_cache]
    return [_write_dir(config), os.path.join(os.path.dirname(dataset_path), "cache", "GPTDataset_indices")]


def _write_dir(config: GPTDatasetConfig) -> str:
    return config.path_to_cache or str(cache_root() / "gpt-indices")


def build_gpt_indices(sequence_lengths: np.ndarray, sequences: np.ndarray, num_samples: int | None,
                      seq_length: int, seed: int):
    """(document index, sample index, shuffle index) of Megatron's GPTDataset (see the module docstring).

    `sequences` are the split's sequence ids; `num_samples` None means one epoch.
    """
    tokens_per_epoch = int(np.sum(sequence_lengths[sequences], dtype=np.int64))
    if tokens_per_epoch < 2:
        raise ValueError(f"sequences {sequences[:1].tolist()}..{sequences[-1:].tolist()} hold {tokens_per_epoch} "
                         "token(s); a GPT dataset needs at least two")
    num_epochs = 1 if num_samples is None else max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    separate_final_epoch = False
    if num_epochs > 1:
        samples_before_final_epoch = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_final_epoch = (num_samples - samples_before_final_epoch
                                < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch))
    random_state = np.random.RandomState(seed)
    if separate_final_epoch:
        document_index = np.concatenate([_document_index(sequences, num_epochs - 1, random_state),
                                         _document_index(sequences, 1, random_state)])
    else:
        document_index = _document_index(sequences, num_epochs, random_state)
    sample_index = _sample_index(sequence_lengths, document_index, seq_length, num_epochs * tokens_per_epoch)
    total = len(sample_index) - 1
    first_range = samples_before_final_epoch if separate_final_epoch else total
    return document_index, sample_index, _shuffle_index(first_range, total, random_state)


def _document_index(sequences: np.ndarray, num_epochs: int, random_state) -> np.ndarray:
    document_index = np.tile(sequences, num_epochs).astype(np.int32)
    random_state.shuffle(document_index)
    return document_index


def _sample_index(sequence_lengths, document_index: np.ndarray, seq_length: int, num_tokens: int) -> np.ndarray:
    """Rows (position in the document index, offset) of stream tokens 0, s, 2s, ...: the start of each
    sample and, inclusively, the end of the one before (its extra label token)."""
    num_samples = (num_tokens - 1) // seq_length
    stream_starts = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sequence_lengths, dtype=np.int64)[document_index], out=stream_starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    # side="right": a position lies in the last sequence that starts at or before it (empty ones are skipped)
    in_document = np.searchsorted(stream_starts, positions, side="right") - 1
    in_document[0] = 0  # Megatron's first row is always (0, 0), even when the first sequence is empty
    offsets = positions - stream_starts[in_document]
    fits_int32 = len(document_index) < np.iinfo(np.int32).max and int(np.max(sequence_lengths)) < np.iinfo(np.int32).max
    return np.stack([in_document, offsets], axis=1).astype(np.int32 if fits_int32 else np.int64)


def _shuffle_index(first_range: int, total: int, random_state) -> np.ndarray:
    """[0, first_range) shuffled, then [first_range, total) shuffled on its own."""
    dtype = np.int64 if total >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(first_range, dtype=dtype)
    random_state.shuffle(first)
    if first_range == total:
        return first
    last = np.arange(first_range, total, dtype=dtype)
    random_state.shuffle(last)
    return np.concatenate([first, last])


def parse_and_normalize_split(split: str) -> list[float]:
    """--split "949,50,1" -> three fractions, as Megatron reads it: the numbers in order, missing ones 0. Quotes
    around it (a script's "--split '99,1,0'" passes them on) and "/" or spaces as separators are accepted as
    Megatron accepts them; other text is an error (Megatron would silently skip it)."""
    text = split.strip().strip("'\"").strip()
    if not re.fullmatch(r"[0-9.]+(\s*[,/ ]\s*[0-9.]+)*", text):
        raise ValueError(f"--split {split!r} must be up to three comma-separated numbers, like 949,50,1")
    try:
        weights = [float(w) for w in re.findall(r"[.0-9]+", text)]
    except ValueError:
        raise ValueError(f"--split {split!r} must be up to three comma-separated numbers, like 949,50,1") from None
    if len(weights) > 3 or sum(weights) <= 0:
        raise ValueError(f"--split {split!r} must be up to three non-negative numbers with a positive sum, "
                         "like 949,50,1")
    return normalize(weights + [0.0] * (3 - len(weights)))


def split_matrix(fractions: list[float]) -> list:
    """[0.949, 0.05, 0.001] -> [(0, 0.949), (0.949, 0.999), (0.999, 1.0)]; None for an empty share."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + fraction)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:])]


def sequence_range(bounds, num_sequences: int) -> tuple[int, int]:
    lo, hi = bounds
    return int(round(lo * float(num_sequences))), int(round(hi * float(num_sequences)))


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """["prefix"], ["prefixA", "prefixB"] (no weights) or ["0.3", "prefixA", "0.7", "prefixB"]."""
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


def build_gpt_datasets(data_path: list[str] | None, config: GPTDatasetConfig, num_samples: tuple,
                       data_path_per_split: tuple | None = None):
    """(train, valid, test) as Megatron's BlendedMegatronDatasetBuilder builds them for pretrain_gpt.py.

    `data_path` (--data-path) is split by config.split; or `data_path_per_split` gives each split its
    own (--train-data-path/--valid-data-path/--test-data-path; None for a split without data); or, with
    config.mock_vocab_size, Megatron's synthetic --mock-data sequences are split.
    `num_samples[i]` samples are asked of split i; a split asked for 0 samples, or with no tokens, is
    None. Several prefixes are blended: in the given proportions, or in proportion to their sizes.

    Every rank must call this together when torch.distributed is initialized: local rank 0 of
    each node builds the cached indices while the other ranks wait at a barrier, then they load
    them (and build them themselves if their node sees no cache, e.g. without LOCAL_RANK).
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples {num_samples} must give three counts: (train, valid, test)")

    def build():
        opened = {}  # each prefix opened once for all splits (with --no-mmap-bin-files its tokens are read once)

        def open_indexed(prefix):
            if prefix not in opened:
                opened[prefix] = (MockIndexedDataset(config.mock_vocab_size, config.eod_id) if prefix is None
                                  else IndexedDataset(prefix, mmap=config.mmap_bin_files))
            return opened[prefix]

        if config.mock_vocab_size is not None:
            return tuple(_build_split(([None], None), config.split_matrix, i, n, config, open_indexed)
                         for i, n in enumerate(num_samples))
        if data_path_per_split is None:
            blend, matrix = parse_data_path(data_path), config.split_matrix
            return tuple(_build_split(blend, matrix, i, n, config, open_indexed) for i, n in enumerate(num_samples))
        whole = [None, None, None]
        return tuple(None if path is None else
                     _build_split(parse_data_path(path), whole[:i] + [(0.0, 1.0)] + whole[i + 1:], i, n, config,
                                  open_indexed)
                     for i, (path, n) in enumerate(zip(data_path_per_split, num_samples)))

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return build()
    if int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())) == 0:
        try:
            return build()
        finally:  # reached even when building fails, so that the others go on to fail the same way
            torch.distributed.barrier()
    torch.distributed.barrier()
    return build()


def _build_split(blend, matrix: list, split_index: int, num_samples: int, config: GPTDatasetConfig, open_indexed):
    prefixes, weights = blend
    name = SPLIT_NAMES[split_index]
    if num_samples <= 0 or matrix[split_index] is None:
        return None
    if weights is not None:
        weights = normalize(weights)
    if len(prefixes) == 1 and weights is None:
        return _gpt_dataset(prefixes[0], matrix, split_index, num_samples, config, open_indexed)
    if weights is None:  # each member one epoch; blended in proportion to their sizes
        members = [_gpt_dataset(p, matrix, split_index, None, config, open_indexed) for p in prefixes]
        present = [m for m in members if m is not None]
        weights = [len(m) for m in present]
        size = min(num_samples, sum(weights))
    else:
        targets = [int(np.ceil(num_samples * w)) for w in weights]
        buffers = [int(np.ceil(t * (1 + config.mid_level_dataset_surplus))) for t in targets]
        members = [_gpt_dataset(p, matrix, split_index, n, config, open_indexed) for p, n in zip(prefixes, buffers)]
        present = [m for m in members if m is not None]
        weights = [w for w, m in zip(weights, members) if m is not None]
        size = sum(t for t, m in zip(targets, members) if m is not None)
    if len(present) < len(members):
        empty = [p for p, m in zip(prefixes, members) if m is None]
        print(f"warning: the {name} split of {empty} holds no tokens; blending the {name} split of the others only")
    if not present:
        return None
    return BlendedDataset(present, weights, size, name, _write_dir(config), _cache_dirs(config, prefixes[0]))


def _gpt_dataset(prefix: str, matrix: list, split_index: int, num_samples: int | None,
                 config: GPTDatasetConfig, open_indexed) -> GPTDataset | None:
    """Split `split_index` of one prefix (None: the mock data; opened by `open_indexed`), or None when it
    holds fewer than two tokens (Megatron would loop forever looking for them)."""
    indexed = open_indexed(prefix)
    if indexed.num_tokens < 2:
        raise ValueError(f"--data-path {prefix} holds no tokens ({indexed.num_tokens}); a GPT dataset needs some")
    start, stop = sequence_range(matrix[split_index], len(indexed))
    if int(np.sum(indexed.sequence_lengths[start:stop], dtype=np.int64)) < 2:
        print(f"warning: the {SPLIT_NAMES[split_index]} split of {prefix} (sequences {start}:{stop} of --split "
              f"{config.split!r}) holds no samples; it is left out")
        return None
    return GPTDataset(indexed, prefix, (start, stop), num_samples, SPLIT_NAMES[split_index], config)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
