import hashlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatronish.data import preprocess
from megatronish.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatronish.data.preprocess import BadRecordError, TokenizerSpec, preprocess_hf_dataset, preprocess_jsonl
from megatronish.data.tokenizers import build_tokenizer

from .conftest import FIXTURES, gpt2_files

REPO = Path(__file__).resolve().parents[2]
GPT2 = TokenizerSpec("GPT2BPETokenizer", **gpt2_files())
BYTES = TokenizerSpec("ByteTokenizer")


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def file_bytes(prefix) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def write_jsonl(path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def varied_records(rng, n: int) -> list[dict]:
    """Strings, sentence lists, empty documents, unicode."""
    words = ["alpha", "beta", "gamma", "naïve", "東京", "café", "x", "  ", "\n", "tensor", "shard", "!"]
    records = []
    for i in range(n):
        if i % 11 == 3:
            records.append({"text": ""})
        elif i % 7 == 2:
            records.append({"text": [" ".join(rng.choice(words, 4)) for _ in range(rng.integers(0, 4))] + [""]})
        else:
            records.append({"text": " ".join(rng.choice(words, rng.integers(1, 30)))})
    return records


@pytest.mark.parametrize(
    "corpus, reference", [("corpus.jsonl", "meg_text_document"), ("corpus_sentences.jsonl", "meg_sent_text_document")]
)
def test_same_bytes_as_megatron(tmp_path, expected, corpus, reference):
    stats = preprocess_jsonl(str(FIXTURES / corpus), str(tmp_path / "out"), GPT2, append_eod=True, workers=1)
    assert stats.outputs == [str(tmp_path / "out_text_document")] and stats.bad_records == 0
    for extension in (".bin", ".idx"):
        assert sha256(stats.outputs[0] + extension) == expected[reference]["files"][reference + extension]["sha256"]


def test_one_and_three_workers_write_identical_files(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", varied_records(np.random.default_rng(0), 300))
    outputs = [
        preprocess_jsonl(str(path), str(tmp_path / f"w{w}"), GPT2, append_eod=True, workers=w, chunk_records=7).outputs[
            0
        ]
        for w in (1, 3)
    ]
    assert file_bytes(outputs[0]) == file_bytes(outputs[1])
    assert IndexedDataset(outputs[0]).num_documents == 300


@pytest.mark.parametrize("append_eod", [False, True])
@pytest.mark.parametrize("spec", [GPT2, BYTES], ids=["gpt2", "bytes"])
def test_decoding_gives_the_text_back(tmp_path, append_eod, spec):
    records = varied_records(np.random.default_rng(1), 120)
    path = write_jsonl(tmp_path / "in.jsonl", records)
    prefix = preprocess_jsonl(
        str(path), str(tmp_path / "out"), spec, append_eod=append_eod, workers=2, chunk_records=16
    ).outputs[0]
    ds, tok = IndexedDataset(prefix), spec.build()
    assert ds.num_documents == len(records)
    for d, record in enumerate(records):
        text = record["text"] if isinstance(record["text"], str) else "".join(record["text"])
        ids = ds.tokens[ds.document_offsets[d] : ds.document_offsets[d] + ds.document_lengths[d]].tolist()
        if append_eod and text:
            assert ids[-1] == tok.eod
            ids = ids[:-1]
        assert tok.detokenize(ids) == text
        # one sequence per non-empty sentence
        sentences = [record["text"]] if isinstance(record["text"], str) else record["text"]
        assert ds.document_indices[d + 1] - ds.document_indices[d] == sum(1 for s in sentences if s)


def test_bad_lines_are_reported_and_counted(tmp_path, capsys):
    lines = [
        {"text": "one"},
        {"text": "two"},
        '{"text": "broken',
        {"text": "four"},
        {"other": "five"},
        {"text": "six"},
        {"text": 7},
        {"text": "eight"},
        "",
        "[1, 2]",
        {"text": "eleven"},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    stats = preprocess_jsonl(str(path), str(tmp_path / "out"), BYTES, workers=2, chunk_records=3)
    err = capsys.readouterr().err
    assert stats.bad_records == 4 and stats.documents == 6
    for line, reason in [
        (3, "invalid JSON"),
        (5, "missing key 'text'"),
        (7, "key 'text' holds int"),
        (10, "expected a JSON object, got list"),
    ]:
        assert f"in.jsonl line {line}: {reason}" in err
    assert "skipped 4 bad record(s)" in err
    ds, tok = IndexedDataset(stats.outputs[0]), BYTES.build()
    assert [tok.detokenize(ds[i]) for i in range(len(ds))] == ["one", "two", "four", "six", "eight", "eleven"]

    with pytest.raises(BadRecordError, match="line 3: invalid JSON"):
        preprocess_jsonl(str(path), str(tmp_path / "strict"), BYTES, workers=2, strict=True, chunk_records=3)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("strict")]  # nothing half-written is left


def test_surrogates_deep_nesting_and_huge_lines_are_bad_records_with_their_line(tmp_path, capsys):
    huge = json.dumps({"text": "x" * 400_000})
    lines = [{"text": "one"}, '{"text": "half a pair \\ud800 here"}', {"text": "three"},
             '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", {"text": "five"}, huge, {"text": "seven"}]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    stats = preprocess_jsonl(str(path), str(tmp_path / "out"), BYTES, workers=2, chunk_records=2,
                             max_record_bytes=300_000)
    err = capsys.readouterr().err
    assert stats.bad_records == 3 and stats.documents == 4
    assert "in.jsonl line 2: key 'text' holds text that is not valid Unicode (a lone surrogate" in err
    assert "in.jsonl line 4: JSON nested too deeply to parse" in err
    assert f"in.jsonl line 6: {len(huge) + 1} bytes, longer than --max-record-bytes 300000" in err
    ds, tok = IndexedDataset(stats.outputs[0]), BYTES.build()
    assert [tok.detokenize(ds[i]) for i in range(len(ds))] == ["one", "three", "five", "seven"]
    with pytest.raises(BadRecordError, match="line 2: key 'text' holds text that is not valid Unicode"):
        preprocess_jsonl(str(path), str(tmp_path / "strict"), BYTES, strict=True, max_record_bytes=300_000)


def test_a_huge_line_is_never_held_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b'{"text": "' + b"y" * (6 << 20) + b'"}\n{"text": "after"}\n')
    records = [r for chunk in preprocess._jsonl_chunks(str(path), 16, max_record_bytes=1 << 20) for r in chunk.records]
    assert records == [preprocess._TooLong((6 << 20) + 13, 1 << 20), b'{"text": "after"}\n']


def test_several_json_keys(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "abc", "title": "T1"}, {"text": "", "title": "T2"}])
    stats = preprocess_jsonl(str(path), str(tmp_path / "out"), BYTES, json_keys=["text", "title"], append_eod=True)
    text, title = (IndexedDataset(p) for p in stats.outputs)
    assert stats.outputs == [str(tmp_path / "out_text_document"), str(tmp_path / "out_title_document")]
    assert text.num_documents == title.num_documents == 2
    assert text.tokens.tolist() == [97, 98, 99, 256] and title.sequence_lengths.tolist() == [3, 3]


def test_hugging_face_datasets_offline(tmp_path):
    import datasets

    records = [{"text": t, "id": i} for i, t in enumerate(["first doc", "", "third – ünïcode", "x" * 50])]
    jsonl = write_jsonl(tmp_path / "in.jsonl", records)
    reference = preprocess_jsonl(str(jsonl), str(tmp_path / "ref"), GPT2, append_eod=True).outputs[0]
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "in.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "saved_dict"))
    sources = [
        (str(jsonl), "train"),
        (str(tmp_path / "in.parquet"), "train"),
        (str(tmp_path / "saved"), "train"),
        (str(tmp_path / "saved_dict"), "validation"),
    ]
    for i, (source, split) in enumerate(sources):
        out = preprocess_hf_dataset(
            source,
            split,
            str(tmp_path / f"hf{i}"),
            GPT2,
            append_eod=True,
            workers=1 + i % 2,
            chunk_records=2,
            cache_dir=str(tmp_path / "hf_cache"),
        ).outputs[0]
        assert file_bytes(out) == file_bytes(reference), source
    tool_main("preprocess_data.py")(
        "--hf-dataset", tmp_path / "saved_dict", "--hf-split", "validation", "--output-prefix", tmp_path / "cli",
        "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files()["vocab_file"],
        "--merge-file", gpt2_files()["merge_file"], "--append-eod",
    )  # fmt: skip
    assert file_bytes(str(tmp_path / "cli_text_document")) == file_bytes(reference)
    with pytest.raises(ValueError, match="--hf-split 'test'"):
        preprocess_hf_dataset(str(tmp_path / "saved_dict"), "test", str(tmp_path / "x"), GPT2)
    with pytest.raises(ValueError, match="--json-keys"):
        preprocess_hf_dataset(str(tmp_path / "saved"), "train", str(tmp_path / "x"), GPT2, json_keys=["body"])


def run_tool(*args) -> str:
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def tool_main(name: str):
    """A tool's main, run in this process (quicker than a subprocess): tool_main(name)(*args)."""
    main = runpy.run_path(str(REPO / "tools" / name), run_name="tool")["main"]
    return lambda *args: main([str(a) for a in args])


def test_command_line_tools(tmp_path, expected):
    """preprocess_data.py (2 workers) on the two halves of the corpus, merged by merge_datasets.py,
    gives Megatron's bytes; train_tokenizer.py writes tokenizers that load."""
    lines = (FIXTURES / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    tokenizer_flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files()["vocab_file"],
                       "--merge-file", gpt2_files()["merge_file"]]
    for part, chunk in (("a", lines[:123]), ("b", lines[123:])):
        (tmp_path / f"{part}.jsonl").write_text("".join(chunk), encoding="utf-8")
        run_tool("tools/preprocess_data.py", "--input", str(tmp_path / f"{part}.jsonl"), "--output-prefix",
                 str(tmp_path / "parts" / part), *tokenizer_flags, "--append-eod", "--workers", "2")
    run_tool("tools/merge_datasets.py", "--input-dir", str(tmp_path / "parts"), "--output-prefix", tmp_path / "all")
    reference = expected["meg_text_document"]["files"]
    assert sha256(tmp_path / "all.bin") == reference["meg_text_document.bin"]["sha256"]
    assert sha256(tmp_path / "all.idx") == reference["meg_text_document.idx"]["sha256"]

    text = tmp_path / "train.txt"
    text.write_text("".join(json.loads(x)["text"] + "\n" for x in lines), encoding="utf-8")
    train = tool_main("train_tokenizer.py")
    train("--type", "byte-level-bpe", "--input", text, "--vocab-size", 300, "--output-dir", tmp_path / "bpe")
    train("--type", "sentencepiece", "--input", text, "--vocab-size", 600, "--output-prefix", tmp_path / "sp")
    for tok in (
        build_tokenizer("GPT2BPETokenizer", str(tmp_path / "bpe/vocab.json"), str(tmp_path / "bpe/merges.txt")),
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model")),
    ):
        assert tok.detokenize(tok.tokenize("tensor parallel")) == "tensor parallel"


def test_reading_stays_a_bounded_distance_ahead_of_writing(tmp_path, monkeypatch):
    """Memory stays bounded: when chunk k is written, at most 2 x workers chunks beyond it were read."""
    path = write_jsonl(tmp_path / "in.jsonl", varied_records(np.random.default_rng(2), 200))
    read, read_when_written = [], []
    original_chunks, original_add = preprocess._jsonl_chunks, IndexedDatasetBuilder.add_documents

    def counting_chunks(*args, **kwargs):
        for chunk in original_chunks(*args, **kwargs):
            read.append(chunk)
            yield chunk

    def recording_add(self, *args):
        read_when_written.append(len(read))
        return original_add(self, *args)

    monkeypatch.setattr(preprocess, "_jsonl_chunks", counting_chunks)
    monkeypatch.setattr(IndexedDatasetBuilder, "add_documents", recording_add)
    preprocess_jsonl(str(path), str(tmp_path / "out"), BYTES, workers=2, chunk_records=4)
    assert len(read_when_written) == len(read) == 50
    # 2 workers: 4 chunks in flight at most, and the pipeline does fill up
    assert max(n - k for k, n in enumerate(read_when_written)) == 2 * 2
