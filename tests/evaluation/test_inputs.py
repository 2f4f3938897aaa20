"""Evaluation inputs: a raw text file, parquet, save_to_disk folders and a local folder through
datasets.load_dataset all give the same text; bad inputs fail with errors that name them.
Offline only (HF_DATASETS_OFFLINE=1 from tests/conftest.py)."""

import json

import pytest

from megatronish.evaluation.inputs import read_text_rows
from megatronish.evaluation.wikitext import wikitext_from_rows

from .conftest import wikitext_text

datasets = pytest.importorskip("datasets")


@pytest.fixture
def text():
    return wikitext_text(seed=1)


def _lines(text):
    return text.splitlines(keepends=True)


def test_raw_text_file(tmp_path, text):
    (tmp_path / "wiki.test.tokens").write_text(text, encoding="utf-8")
    assert read_text_rows(str(tmp_path / "wiki.test.tokens"), None) == [text]


def test_parquet_and_saved_datasets_give_the_rows_in_order(tmp_path, text):
    dataset = datasets.Dataset.from_dict({"text": _lines(text), "id": list(range(len(_lines(text))))})
    dataset.to_parquet(str(tmp_path / "test.parquet"))
    assert "".join(read_text_rows(str(tmp_path / "test.parquet"), None)) == text
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert "".join(read_text_rows(str(tmp_path / "saved"), None)) == text
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["other"]}), "test": dataset}).save_to_disk(
        str(tmp_path / "saved_dict"))
    assert "".join(read_text_rows(str(tmp_path / "saved_dict"), None, split="test")) == text
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\], not 'validation'"):
        read_text_rows(str(tmp_path / "saved_dict"), None, split="validation")


def test_load_dataset_on_a_local_folder(tmp_path, text, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "hub_like"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": _lines(text)}).to_parquet(str(folder / "test.parquet"))
    assert "".join(read_text_rows(None, str(folder), None, split="test")) == text


def test_unreachable_hub_dataset_says_what_to_do():
    with pytest.raises(ValueError, match="cannot load dataset 'wikitext'.*pass the file with --data"):
        read_text_rows(None, "wikitext", "wikitext-103-raw-v1")


def test_lambada_jsonl(tmp_path):
    texts = ["one two three", "four five"]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n")
    assert read_text_rows(str(tmp_path / "l.jsonl"), None, jsonl=True) == texts


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="exactly one of --data FILE and --hf-dataset NAME"):
        read_text_rows(None, None)
    with pytest.raises(FileNotFoundError, match="missing.txt .--data. does not exist"):
        read_text_rows(str(tmp_path / "missing.txt"), None)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt holds no text"):
        read_text_rows(str(tmp_path / "empty.txt"), None)
    datasets.Dataset.from_dict({"sentence": ["a b"]}).to_parquet(str(tmp_path / "other.parquet"))
    with pytest.raises(ValueError, match=r"other.parquet has no 'text' column \(columns: \['sentence'\]\)"):
        read_text_rows(str(tmp_path / "other.parquet"), None)


def test_hub_style_rows_give_the_files_text(text):
    # The hub's wikitext stores the file's blank lines " \n" as empty rows.
    rows = ["" if line == " \n" else line for line in _lines(text)]
    assert "" in rows and wikitext_from_rows(rows) == text
    assert wikitext_from_rows([text]) == text
