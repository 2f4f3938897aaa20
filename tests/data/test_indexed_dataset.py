import hashlib
import os
import struct

import numpy as np
import pytest

from megatronish.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, optimal_dtype

from .conftest import FIXTURES, random_documents, write_dataset


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def documents_of(ds: IndexedDataset):
    """[(tokens, sequence lengths)] per document, read back through the sequence API."""
    out = []
    for d in range(ds.num_documents):
        first, stop = ds.document_indices[d], ds.document_indices[d + 1]
        seqs = [ds[i] for i in range(first, stop)]
        out.append((np.concatenate(seqs) if seqs else np.zeros(0, ds.dtype), [len(s) for s in seqs]))
    return out


@pytest.mark.parametrize("name", ["meg_text_document", "meg_sent_text_document", "meg_int32_text_document"])
def test_megatron_files_read_unchanged(name, expected):
    ds, want = IndexedDataset(str(FIXTURES / name)), expected[name]
    assert ds.dtype == np.dtype(want["dtype"])
    assert len(ds) == want["num_sequences"] and ds.num_documents == want["num_documents"]
    assert ds.document_indices.tolist() == want["document_indices"]
    assert ds.sequence_lengths.tolist() == want["sequence_lengths"]
    assert [s.tolist() for s in ds[0:3]] == want["first_3_sequences"]
    assert ds.num_tokens == want["num_tokens"] == int(ds.document_lengths.sum())
    # document 5 is empty: no sequence, a repeated document-index entry, zero length
    assert ds.document_lengths[5] == 0 and ds.document_indices[5] == ds.document_indices[6]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    vocab = 65535 if dtype == np.uint16 else 2**31 - 1
    docs = random_documents(rng, 60, 40, vocab, empty_every=7)
    docs[1] = np.array([vocab - 1])  # single-token document holding the largest id
    sentences = {3: [2, 5, 1], 10: [4, 4]}  # some documents of several sequences
    for d, lengths in sentences.items():
        docs[d] = rng.integers(0, vocab, size=sum(lengths))
    builder = IndexedDatasetBuilder(str(tmp_path / "ds"), dtype)
    for d, doc in enumerate(docs):
        builder.add_document(doc, sentences.get(d))
    builder.finalize()

    ds = IndexedDataset(str(tmp_path / "ds"))
    assert ds.dtype == np.dtype(dtype) and ds.num_documents == len(docs)
    for d, (tokens, lengths) in enumerate(documents_of(ds)):
        assert tokens.tolist() == docs[d].tolist()
        assert lengths == sentences.get(d, [len(docs[d])] if len(docs[d]) else [])
        start = ds.document_offsets[d]
        assert ds.tokens[start : start + ds.document_lengths[d]].tolist() == docs[d].tolist()
    assert os.path.getsize(tmp_path / "ds.bin") == sum(len(d) for d in docs) * np.dtype(dtype).itemsize
    seq = ds[4]
    assert ds.get(4, offset=2, length=3).tolist() == seq[2:5].tolist()
    assert ds.get(4, offset=1).tolist() == seq[1:].tolist()
    with pytest.raises(IndexError):
        ds.get(4, offset=len(seq), length=1)


def test_idx_layout_byte_by_byte(tmp_path):
    # documents: [7, 8, 9] as sequences [7] + [8, 9]; an empty one; [65000]
    builder = IndexedDatasetBuilder(str(tmp_path / "tiny"), np.uint16)
    builder.add_document([7, 8, 9], lengths=[1, 2])
    builder.add_document([])
    builder.add_document([65000])
    builder.finalize()
    want = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # dtype code: uint16
        + struct.pack("<Q", 3)  # sequences
        + struct.pack("<Q", 4)  # document-index entries = documents + 1
        + struct.pack("<3i", 1, 2, 1)  # sequence lengths
        + struct.pack("<3q", 0, 2, 6)  # byte offsets = cumulative length x 2 bytes
        + struct.pack("<4q", 0, 2, 2, 3)  # document index; the empty document repeats 2
    )
    got = (tmp_path / "tiny.idx").read_bytes()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"byte {i}: got {g:#04x}, want {w:#04x}"
    assert len(got) == len(want)
    assert (tmp_path / "tiny.bin").read_bytes() == struct.pack("<4H", 7, 8, 9, 65000)
    assert optimal_dtype(65499) == np.uint16 and optimal_dtype(65500) == np.int32


def test_rewriting_the_megatron_files_gives_the_same_bytes(tmp_path, expected):
    """Builder output is byte-identical: whole, in halves (documents 0-199, 200-399), and merged."""
    source = IndexedDataset(str(FIXTURES / "meg_int32_text_document"))
    docs = documents_of(source)
    halves = {"part0": docs[:200], "part1": docs[200:]}
    for part, part_docs in halves.items():
        builder = IndexedDatasetBuilder(str(tmp_path / f"meg_int32_{part}_text_document"), np.int32)
        for tokens, lengths in part_docs:
            builder.add_document(tokens, lengths)
        builder.finalize()
    merged = IndexedDatasetBuilder(str(tmp_path / "meg_int32_merged_text_document"), np.int32)
    merged.add_index(str(tmp_path / "meg_int32_part0_text_document"))
    merged.add_index(str(tmp_path / "meg_int32_part1_text_document"))
    merged.finalize()
    for name in ("meg_int32_part0_text_document", "meg_int32_part1_text_document", "meg_int32_merged_text_document"):
        for file, facts in expected[name]["files"].items():
            assert sha256(tmp_path / file) == facts["sha256"], file


def test_merge_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    a_docs, b_docs = random_documents(rng, 20, 30, 1000, empty_every=5), random_documents(rng, 13, 30, 1000)
    write_dataset(tmp_path / "a", a_docs)
    write_dataset(tmp_path / "b", b_docs)
    builder = IndexedDatasetBuilder(str(tmp_path / "ab"), np.uint16)
    builder.add_index(str(tmp_path / "a"))
    builder.add_document([5, 6])
    builder.add_index(str(tmp_path / "b"))
    builder.finalize()
    merged = IndexedDataset(str(tmp_path / "ab"))
    want = a_docs + [np.array([5, 6])] + b_docs
    assert [t.tolist() for t, _ in documents_of(merged)] == [d.tolist() for d in want]

    write_dataset(tmp_path / "wide", [[1, 2]], dtype=np.int32)
    with pytest.raises(ValueError, match="dtype"):
        IndexedDatasetBuilder(str(tmp_path / "bad"), np.uint16).add_index(str(tmp_path / "wide"))


def test_bad_files_get_clear_errors(tmp_path):
    write_dataset(tmp_path / "ok", [[1, 2, 3], [4]])
    idx, bin_ = (tmp_path / "ok.idx").read_bytes(), (tmp_path / "ok.bin").read_bytes()

    with pytest.raises(FileNotFoundError, match="missing.idx"):
        IndexedDataset(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="without .bin/.idx"):
        IndexedDataset(str(tmp_path / "ok.bin"))

    def reader_error(idx_bytes, bin_bytes=bin_):
        (tmp_path / "x.idx").write_bytes(idx_bytes)
        (tmp_path / "x.bin").write_bytes(bin_bytes)
        with pytest.raises(ValueError) as info:
            IndexedDataset(str(tmp_path / "x"))
        assert "x.idx" in str(info.value) or "x.bin" in str(info.value)
        return str(info.value)

    assert "not an MMIDIDX" in reader_error(b"PK\x03\x04" + bytes(60))  # a foreign file
    assert "truncated" in reader_error(idx[:-5])
    assert "truncated" in reader_error(idx[:20])
    assert "dtype code" in reader_error(idx[:17] + b"\x63" + idx[18:])
    assert "version" in reader_error(idx[:9] + struct.pack("<Q", 2) + idx[17:])
    assert "mismatched" in reader_error(idx, bin_[:-2])
    with pytest.raises(ValueError, match="does not fit uint16"):
        IndexedDatasetBuilder(str(tmp_path / "y"), np.uint16).add_document([70000])
