"""The indexed dataset: Megatron-LM's MMIDIDX format, read and written byte for byte.

A dataset is a pair of files sharing a prefix:

`<prefix>.bin`  the tokens of all sequences back to back, no header.
`<prefix>.idx`  little-endian:
    9 bytes  b"MMIDIDX\\x00\\x00"
    u64      version = 1
    u8       dtype code of the .bin (see DTYPE_CODES)
    u64      N, the number of sequences
    u64      D + 1, the number of document-index entries (D documents)
    int32    sequence lengths [N], in tokens
    int64    sequence byte offsets into .bin [N] (cumulative length x itemsize, from 0)
    int64    document index [D + 1]: 0, then one past the last sequence of each document

A document is one or more consecutive sequences (one per sentence when sentences are split,
otherwise one); an empty document has no sequence but still its document-index entry, so the
document index may repeat a value. A document's tokens are contiguous in .bin.
"""

import os
import shutil
import struct

import numpy as np

from megatronish.cache import partial_path

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
# magic, version, dtype code, N, D + 1
_FIXED_HEADER = struct.Struct("<9sQBQQ")


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def optimal_dtype(vocab_size: int) -> type:
    """Megatron's choice of token dtype: uint16 below 65500 entries, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def write_index(path: str, dtype, sequence_lengths: np.ndarray, document_index: np.ndarray) -> None:
    """Write an .idx file for sequences of the given lengths (tokens of `dtype`) grouped into
    documents by `document_index` (leading 0 included)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    document_index = np.asarray(document_index, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(_FIXED_HEADER.pack(HEADER, VERSION, _CODE_OF_DTYPE[dtype], len(lengths), len(document_index)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(document_index.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Writes `<prefix>.bin` and `<prefix>.idx`.

        builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
        builder.add_document(tokens)                 # one sequence
        builder.add_document(tokens, lengths=[3, 4])  # two sentences of one document
        builder.add_index(other_prefix)              # append a whole dataset (merge)
        builder.finalize()

    Files are written under temporary names and renamed into place by `finalize` (.bin first,
    .idx last), so an interrupted run never leaves a dataset that looks complete; `abort`
    removes the temporary file.
    """

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(
                f"token dtype {self.dtype} is not one of the MMIDIDX dtypes {sorted(map(str, _CODE_OF_DTYPE))}"
            )
        self._bin_tmp = partial_path(bin_path(prefix))
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")
        # Metadata is kept as numpy chunks (12 bytes per sequence, 8 per document), not lists.
        self._sequence_lengths: list[np.ndarray] = []
        self._document_ends: list[np.ndarray] = []
        self._num_sequences = 0

    def add_document(self, tokens, lengths=None) -> None:
        """Append one document; `lengths` splits it into sequences (default: one, none if empty)."""
        tokens = np.asarray(tokens)
        if lengths is None:
            lengths = [len(tokens)] if len(tokens) else []
        self.add_documents(tokens, np.asarray(lengths, dtype=np.int64), [len(lengths)])

    def add_documents(self, tokens, sequence_lengths, sequences_per_document) -> None:
        """Append many documents at once: their tokens back to back, every sequence's length,
        and how many sequences each document has (0 for an empty document)."""
        tokens = np.asarray(tokens)
        sequence_lengths = np.asarray(sequence_lengths, dtype=np.int64)
        sequences_per_document = np.asarray(sequences_per_document, dtype=np.int64)
        if sequence_lengths.sum() != len(tokens):
            raise ValueError(f"sequence lengths add up to {sequence_lengths.sum()} tokens but {len(tokens)} were given")
        if sequences_per_document.sum() != len(sequence_lengths):
            raise ValueError(
                f"documents hold {sequences_per_document.sum()} sequences, "
                f"but {len(sequence_lengths)} lengths were given"
            )
        if (sequence_lengths < 0).any() or (sequence_lengths > np.iinfo(np.int32).max).any():
            raise ValueError("sequence lengths must lie in [0, 2**31 - 1]")
        self._bin.write(self._as_dtype(tokens).tobytes(order="C"))
        self._sequence_lengths.append(sequence_lengths.astype(np.int32))
        self._document_ends.append(self._num_sequences + np.cumsum(sequences_per_document))
        self._num_sequences += len(sequence_lengths)

    def add_index(self, prefix: str) -> None:
        """Append every document of the dataset at `prefix` (same dtype required)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"cannot merge {idx_path(prefix)} (dtype {other.dtype}) into a {self.dtype} dataset: "
                "all merged datasets must share one token dtype"
            )
        self._sequence_lengths.append(np.array(other.sequence_lengths, dtype=np.int32))
        self._document_ends.append(self._num_sequences + np.asarray(other.document_indices[1:], dtype=np.int64))
        self._num_sequences += len(other)
        del other  # release the memory maps before copying the file
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, length=16 << 20)

    def finalize(self) -> None:
        """Write the .idx and publish both files under their final names."""
        self._bin.close()
        idx_tmp = partial_path(idx_path(self.prefix))
        write_index(
            idx_tmp,
            self.dtype,
            np.concatenate([np.zeros(0, np.int32), *self._sequence_lengths]),
            np.concatenate([np.zeros(1, np.int64), *self._document_ends]),
        )
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))

    def abort(self) -> None:
        """Drop what was written so far."""
        self._bin.close()
        if os.path.exists(self._bin_tmp):
            os.remove(self._bin_tmp)

    def _as_dtype(self, tokens: np.ndarray) -> np.ndarray:
        if tokens.dtype == self.dtype or len(tokens) == 0:
            return tokens.astype(self.dtype, copy=False)
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        if info is not None and (tokens.min() < info.min or tokens.max() > info.max):
            raise ValueError(
                f"token ids span [{tokens.min()}, {tokens.max()}], which does not fit {self.dtype}: "
                "use a wider dtype (int32 for vocabularies of 65500 entries or more)"
            )
        return tokens.astype(self.dtype)


class IndexedDataset:
    """Memory-mapped reader of `<prefix>.bin/.idx`.

    Sequences: `len(ds)`, `ds[i]` (array of tokens), `ds[i:j]` (list of arrays),
    `ds.get(i, offset, length)`, `ds.sequence_lengths`, `ds.sequence_pointers`.
    Documents: `ds.document_indices` (D + 1 entries, as stored), `ds.num_documents`,
    `ds.document_lengths` and `ds.document_offsets` (tokens, as int64 arrays).
    `ds.tokens` is the whole .bin as one array: memory-mapped, or read into memory with
    `mmap=False` (Megatron's --no-mmap-bin-files, for file systems where mapping is slow).
    """

    def __init__(self, prefix: str, mmap: bool = True):
        self.prefix, self.mmap = prefix, mmap
        self._open()

    def _open(self) -> None:
        prefix = self.prefix
        idx, bin_ = idx_path(prefix), bin_path(prefix)
        for path in (idx, bin_):
            if not os.path.isfile(path):
                hint = " (pass the prefix without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
                raise FileNotFoundError(f"indexed dataset file {path} does not exist{hint}")
        idx_size = os.path.getsize(idx)
        if idx_size < _FIXED_HEADER.size:
            raise ValueError(f"{idx} is truncated: {idx_size} bytes, shorter than the {_FIXED_HEADER.size}-byte header")
        with open(idx, "rb") as f:
            magic, version, code, n, d1 = _FIXED_HEADER.unpack(f.read(_FIXED_HEADER.size))
        if magic != HEADER:
            raise ValueError(f"{idx} is not an MMIDIDX index: it starts with {magic!r}, expected {HEADER!r}")
        if version != VERSION:
            raise ValueError(f"{idx} has MMIDIDX version {version}; only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx} names dtype code {code}, which is none of {sorted(DTYPE_CODES)}")
        expected = _FIXED_HEADER.size + n * 4 + n * 8 + d1 * 8
        if idx_size != expected:
            raise ValueError(
                f"{idx} is {'truncated' if idx_size < expected else 'too long'}: its header declares {n} sequences and "
                f"{d1} document-index entries ({expected} bytes), but the file has {idx_size} bytes"
            )
        if d1 < 1:
            raise ValueError(f"{idx} declares an empty document index; it must hold at least the leading 0")
        self.dtype = np.dtype(DTYPE_CODES[code])
        # Plain ndarray views of the maps: np.memmap's own slicing costs microseconds per call.
        raw = np.memmap(idx, dtype=np.uint8, mode="r").view(np.ndarray)
        offset = _FIXED_HEADER.size
        self.sequence_lengths = raw[offset : offset + 4 * n].view(np.int32)
        offset += 4 * n
        self.sequence_pointers = raw[offset : offset + 8 * n].view(np.int64)
        offset += 8 * n
        self.document_indices = raw[offset:].view(np.int64)
        self._check_index(idx)
        total_bytes = int(self._sequence_starts[-1]) * self.dtype.itemsize
        bin_size = os.path.getsize(bin_)
        if bin_size != total_bytes:
            raise ValueError(
                f"{bin_} holds {bin_size} bytes but {idx} describes {total_bytes} bytes "
                f"({self._sequence_starts[-1]} {self.dtype} tokens): the pair is truncated or mismatched"
            )
        if bin_size and not self.mmap:
            self.tokens = np.fromfile(bin_, dtype=self.dtype)
        elif bin_size:
            self.tokens = np.memmap(bin_, dtype=self.dtype, mode="r").view(np.ndarray)
        else:  # np.memmap cannot map an empty file
            self.tokens = np.zeros(0, self.dtype)

    def _check_index(self, idx: str) -> None:
        lengths, docs = self.sequence_lengths, self.document_indices
        if (lengths < 0).any():
            raise ValueError(f"{idx} holds negative sequence lengths")
        starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, dtype=np.int64, out=starts[1:])
        if not np.array_equal(self.sequence_pointers, starts[:-1] * self.dtype.itemsize):
            raise ValueError(f"{idx}: sequence byte offsets are not the running sum of the sequence lengths")
        if docs[0] != 0 or docs[-1] != len(lengths) or (np.diff(docs) < 0).any():
            raise ValueError(
                f"{idx}: the document index must rise from 0 to the number of sequences ({len(lengths)}); "
                f"it runs from {docs[0]} to {docs[-1]}"
            )
        self._sequence_starts = starts  # token offset of each sequence, plus the total at the end

    def __getstate__(self):
        return {"prefix": self.prefix, "mmap": self.mmap}  # the files are reopened, never pickled by value

    def __setstate__(self, state):
        self.prefix, self.mmap = state["prefix"], state["mmap"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError(f"slices of an IndexedDataset must be contiguous, got step {step}")
            return [self.get(i) for i in range(start, stop)]
        return self.get(index)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset:offset + length` of sequence `index` (the rest of it when length is None)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sequence {index} out of range for {self.prefix} with {n} sequences")
        index %= n
        size = int(self.sequence_lengths[index])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {index} of length {size}")
        start = int(self._sequence_starts[index]) + offset
        return np.asarray(self.tokens[start : start + length])

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def document_offsets(self) -> np.ndarray:
        """Token offset in .bin where each document starts."""
        return self._sequence_starts[self.document_indices[:-1]]

    @property
    def document_lengths(self) -> np.ndarray:
        """Number of tokens in each document (the sum of its sequences)."""
        return self._sequence_starts[self.document_indices[1:]] - self._sequence_starts[self.document_indices[:-1]]

    @property
    def num_tokens(self) -> int:
        return int(self._sequence_starts[-1])
