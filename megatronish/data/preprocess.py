"""JSONL or a Hugging Face dataset -> indexed datasets, tokenized across worker processes.

Each JSON key gets its own dataset, `<output_prefix>_<key>_document.{bin,idx}`, byte-identical
to what Megatron-LM's tools/preprocess_data.py writes from the same input and tokenizer:
a key holding a string is one document of one sequence; a key holding a list of strings is one
document with a sequence per (non-empty) string; `append_eod` adds the EOD id to the last
sequence of every non-empty document; an empty document adds only its document-index entry.

The input is read in chunks of records; up to 2 x workers chunks are in flight, and results
are written in input order, so memory stays bounded however large the input and the output
does not depend on the number of workers. A record that is not valid JSON (or nested too
deeply to parse), not an object, lacks a key, holds text that is not valid Unicode (a lone
surrogate escape such as \ud800), or is longer than `max_record_bytes` (read no further than
that: one huge line would otherwise hold gigabytes through tokenization) is reported with its
line number and skipped (counted), or stops the run under `strict`. Blank lines are ignored.
"""

import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from megatronish.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype
from megatronish.data.tokenizers import build_tokenizer

MAX_REPORTED_BAD_RECORDS = 20
MAX_RECORD_BYTES = 8 << 20  # default --max-record-bytes


@dataclass(frozen=True)
class _TooLong:
    """Stands in for a JSONL line longer than the limit (its bytes were never kept)."""

    num_bytes: int
    limit: int


@dataclass(frozen=True)
class TokenizerSpec:
    """What build_tokenizer needs, so that every worker process builds its own tokenizer."""

    tokenizer_type: str
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    null_tokenizer_eod_id: int | None = None
    tiktoken_pattern: str | None = None
    tiktoken_num_special_tokens: int | None = None
    tokenizer_special_tokens: tuple[str, ...] | None = None

    def build(self):
        return build_tokenizer(**asdict(self))


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bad_records: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)  # the prefixes written, one per key


class BadRecordError(ValueError):
    """A malformed input record under strict mode."""


@dataclass
class _Chunk:
    first_record: int  # line number (1-based) of the first JSONL line, or row index of a dataset
    records: list  # raw JSONL lines (bytes) or already-parsed rows (dicts)
    num_bytes: int


@dataclass
class _EncodedChunk:
    tokens: dict  # key -> all token ids of the chunk, back to back
    sequence_lengths: dict  # key -> int64 [sequences]
    sequences_per_document: dict  # key -> int64 [documents]
    bad: list  # (record number, reason)
    num_documents: int
    num_bytes: int


class _Encoder:
    def __init__(self, tokenizer_spec: TokenizerSpec, json_keys, append_eod: bool, dtype):
        self.tokenizer = tokenizer_spec.build()
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.dtype = dtype

    def encode(self, chunk: _Chunk) -> _EncodedChunk:
        documents, bad = [], []
        for number, record in enumerate(chunk.records, start=chunk.first_record):
            if isinstance(record, bytes) and not record.strip():
                continue
            sentences, reason = self._parse(record)
            if reason:
                bad.append((number, reason))
            else:
                documents.append(sentences)
        out = _EncodedChunk({}, {}, {}, bad, len(documents), chunk.num_bytes)
        for key in self.json_keys:
            out.tokens[key], out.sequence_lengths[key], out.sequences_per_document[key] = self._tokenize(
                [d[key] for d in documents]
            )
        return out

    def _parse(self, record):
        """-> ({key: [sentence, ...]}, None), or (None, why the record is bad)."""
        if isinstance(record, _TooLong):
            return None, f"{record.num_bytes} bytes, longer than --max-record-bytes {record.limit}"
        if isinstance(record, bytes):
            try:
                record = json.loads(record)
            except ValueError as e:
                return None, f"invalid JSON ({e})"
            except RecursionError:
                return None, "JSON nested too deeply to parse"
        if not isinstance(record, dict):
            return None, f"expected a JSON object, got {type(record).__name__}"
        sentences = {}
        for key in self.json_keys:
            if key not in record:
                return None, f"missing key {key!r} (it has {sorted(record)[:5]})"
            value = record[key]
            if isinstance(value, str):
                sentences[key] = [value]
            elif isinstance(value, list) and all(isinstance(s, str) for s in value):
                sentences[key] = value
            else:
                return None, f"key {key!r} holds {type(value).__name__}, expected a string or a list of strings"
            if not all(_is_unicode(s) for s in sentences[key]):
                return None, f"key {key!r} holds text that is not valid Unicode (a lone surrogate such as \\ud800)"
        return sentences, None

    def _tokenize(self, documents: list[list[str]]):
        counts = np.array([len(d) for d in documents], dtype=np.int64)
        ids = self.tokenizer.tokenize_batch(list(itertools.chain.from_iterable(documents)))
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        document_of = np.repeat(np.arange(len(documents)), counts)
        # Empty sentences make no sequence (an all-empty document makes no sequence at all).
        kept = lengths > 0
        lengths, document_of = lengths[kept], document_of[kept]
        if self.append_eod and len(lengths):
            is_last = np.append(document_of[1:] != document_of[:-1], True)
            tokens = np.insert(tokens, np.cumsum(lengths)[is_last], self.tokenizer.eod)
            lengths = lengths + is_last
        per_document = np.bincount(document_of, minlength=len(documents)).astype(np.int64)
        return tokens.astype(self.dtype), lengths, per_document


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (JSON allows the escape; UTF-8 and tokenizers do not)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_worker_encoder: _Encoder | None = None


def _init_worker(*encoder_args) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(*encoder_args)


def _encode_in_worker(chunk: _Chunk) -> _EncodedChunk:
    return _worker_encoder.encode(chunk)


def preprocess_jsonl(
    input_path: str,
    output_prefix: str,
    tokenizer: TokenizerSpec,
    json_keys=("text",),
    append_eod: bool = False,
    workers: int = 1,
    strict: bool = False,
    log_interval: int = 1000,
    chunk_records: int = 1024,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> PreprocessStats:
    """Tokenize a JSONL file (one JSON object per line) into `<output_prefix>_<key>_document`."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input {input_path} does not exist")
    chunks = _jsonl_chunks(input_path, chunk_records, max_record_bytes)
    return _run(
        chunks,
        os.path.getsize(input_path),
        f"{input_path} line",
        output_prefix,
        tokenizer,
        json_keys,
        append_eod,
        workers,
        strict,
        log_interval,
    )


def preprocess_hf_dataset(
    name_or_path: str,
    split: str,
    output_prefix: str,
    tokenizer: TokenizerSpec,
    json_keys=("text",),
    append_eod: bool = False,
    workers: int = 1,
    strict: bool = False,
    log_interval: int = 1000,
    chunk_records: int = 1024,
    cache_dir=None,
) -> PreprocessStats:
    """Tokenize a Hugging Face dataset: a folder written by `save_to_disk`, a local .jsonl/.json/
    .parquet/.csv/.arrow/.txt file, or a hub name (`datasets.load_dataset(name, split=split)`)."""
    dataset = load_hf_dataset(name_or_path, split, cache_dir)
    missing = [k for k in json_keys if k not in dataset.column_names]
    if missing:
        raise ValueError(f"--json-keys {missing} not among the columns {dataset.column_names} of {name_or_path}")
    dataset = dataset.select_columns(list(json_keys))
    chunks = _dataset_chunks(dataset, json_keys, chunk_records)
    return _run(
        chunks,
        len(dataset),
        f"{name_or_path} row",
        output_prefix,
        tokenizer,
        json_keys,
        append_eod,
        workers,
        strict,
        log_interval,
        unit="rows",
    )


def load_hf_dataset(name_or_path: str, split: str, cache_dir=None):
    import datasets

    builders = {
        ".jsonl": "json",
        ".json": "json",
        ".parquet": "parquet",
        ".csv": "csv",
        ".arrow": "arrow",
        ".txt": "text",
    }
    if os.path.isdir(name_or_path) and any(
        os.path.exists(os.path.join(name_or_path, f)) for f in ("state.json", "dataset_dict.json")
    ):
        dataset = datasets.load_from_disk(name_or_path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"--hf-split {split!r} is not in {name_or_path}; it has {list(dataset)}")
            dataset = dataset[split]
        return dataset
    if os.path.isfile(name_or_path):
        extension = os.path.splitext(name_or_path)[1].lower()
        if extension not in builders:
            raise ValueError(
                f"--hf-dataset {name_or_path}: cannot read {extension!r} files; use one of {sorted(builders)}"
            )
        return datasets.load_dataset(builders[extension], data_files=name_or_path, split="train", cache_dir=cache_dir)
    return datasets.load_dataset(name_or_path, split=split, cache_dir=cache_dir)


def _jsonl_chunks(path: str, chunk_records: int, max_record_bytes: int = MAX_RECORD_BYTES, chunk_bytes: int = 1 << 20):
    with open(path, "rb") as f:
        records, size, first = [], 0, 1
        for number, line in enumerate(iter(lambda: f.readline(max_record_bytes + 1), b""), start=1):
            if len(line) > max_record_bytes and not line.endswith(b"\n"):
                line = _TooLong(len(line) + _skip_to_next_line(f), max_record_bytes)
            records.append(line)
            size += len(line) if isinstance(line, bytes) else line.num_bytes
            if len(records) >= chunk_records or size >= chunk_bytes:
                yield _Chunk(first, records, size)
                records, size, first = [], 0, number + 1
        if records:
            yield _Chunk(first, records, size)


def _skip_to_next_line(f) -> int:
    """Read past the rest of a line in bounded pieces; returns how many bytes that was."""
    skipped = 0
    while True:
        piece = f.readline(1 << 20)
        skipped += len(piece)
        if not piece or piece.endswith(b"\n"):
            return skipped


def _dataset_chunks(dataset, json_keys, chunk_records: int):
    for start in range(0, len(dataset), chunk_records):
        batch = dataset[start : start + chunk_records]
        rows = [dict(zip(json_keys, values)) for values in zip(*(batch[k] for k in json_keys))]
        yield _Chunk(start, rows, len(rows))


def _run(
    chunks, total, source, output_prefix, tokenizer_spec, json_keys, append_eod, workers, strict, log_interval, unit="B"
) -> PreprocessStats:
    json_keys = list(json_keys)
    if not json_keys:
        raise ValueError("--json-keys must name at least one key")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    # --workers is the parallelism knob: each process tokenizes on one core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    dtype = optimal_dtype(tokenizer_spec.build().vocab_size)  # also checks the tokenizer files up front
    builders = {k: IndexedDatasetBuilder(f"{output_prefix}_{k}_document", dtype) for k in json_keys}
    stats = PreprocessStats(outputs=[b.prefix for b in builders.values()])
    encoder_args = (tokenizer_spec, json_keys, append_eod, dtype)
    pool = (
        mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(
            workers, _init_worker, encoder_args
        )
        if workers > 1
        else None
    )
    progress = _Progress(total, unit, log_interval)  # after the fork: no progress thread in the workers
    try:
        for result in _encode_in_order(chunks, pool, workers, encoder_args):
            _report_bad_records(result.bad, stats, source, strict)
            for key, builder in builders.items():
                builder.add_documents(
                    result.tokens[key], result.sequence_lengths[key], result.sequences_per_document[key]
                )
            tokens = sum(len(t) for t in result.tokens.values())
            stats.documents += result.num_documents
            stats.tokens += tokens
            progress.update(result.num_bytes, result.num_documents, tokens)
        for builder in builders.values():
            builder.finalize()
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.seconds = progress.elapsed()
    if stats.bad_records:
        print(
            f"skipped {stats.bad_records} bad record(s) of {source.rsplit(' ', 1)[0]} "
            "(--strict makes the first one fatal)",
            file=sys.stderr,
        )
    return stats


def _encode_in_order(chunks, pool, workers: int, encoder_args):
    """Yield encoded chunks in input order, keeping at most 2 x workers chunks in flight."""
    if pool is None:
        encoder = _Encoder(*encoder_args)
        yield from map(encoder.encode, chunks)
        return
    in_flight = deque()
    for chunk in chunks:
        in_flight.append(pool.apply_async(_encode_in_worker, (chunk,)))
        if len(in_flight) >= 2 * workers:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def _report_bad_records(bad, stats: PreprocessStats, source: str, strict: bool) -> None:
    for number, reason in bad:
        if strict:
            raise BadRecordError(
                f"{source} {number}: {reason} (--strict stops at the first bad record; "
                "without it bad records are skipped and counted)"
            )
        stats.bad_records += 1
        if stats.bad_records <= MAX_REPORTED_BAD_RECORDS:
            print(f"skipping {source} {number}: {reason}", file=sys.stderr)
        elif stats.bad_records == MAX_REPORTED_BAD_RECORDS + 1:
            print("(more bad records follow; only the count is reported from here on)", file=sys.stderr)


class _Progress:
    """A tqdm bar with documents/s and tokens/s on a terminal; a log line every `log_interval`
    documents otherwise (batch jobs, CI logs)."""

    def __init__(self, total: int, unit: str, log_interval: int):
        from tqdm import tqdm

        self.start = time.perf_counter()
        self.bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", dynamic_ncols=True, disable=None)
        self.log_interval = max(1, log_interval)
        self.documents = self.tokens = 0
        self.next_log = self.log_interval

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, amount: int, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        seconds = max(self.elapsed(), 1e-9)
        rates = {"docs/s": f"{self.documents / seconds:,.0f}", "tok/s": f"{self.tokens / seconds:,.0f}"}
        if not self.bar.disable:
            self.bar.set_postfix(rates, refresh=False)
            self.bar.update(amount)
        elif self.documents >= self.next_log:
            print(
                f"processed {self.documents:,} documents, {self.tokens:,} tokens in {seconds:.1f} s "
                f"({rates['docs/s']} docs/s, {rates['tok/s']} tok/s)",
                file=sys.stderr,
            )
            self.next_log = self.documents + self.log_interval

    def close(self) -> None:
        self.bar.close()
