"""Reading evaluation texts from local files or the Hugging Face hub.

Local inputs (--data):
    a plain text file        WikiText's wiki.test.tokens as is; for LAMBADA, JSON lines {"text": ...}
    a .parquet file          a table with a "text" column
    a directory              a dataset written by `datasets` save_to_disk (a Dataset, or a
                             DatasetDict from which --split is taken)
A hub dataset (--hf-dataset NAME [--hf-dataset-config CONFIG] [--split test]) goes through
`datasets.load_dataset`; NAME may also be a local folder of data files, which needs no network.

A table's "text" rows are returned in order (for WikiText, the lines of the file: see
wikitext.wikitext_from_rows for how they become the file's text again).
"""

import json
import os


def _check_local(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {path} (--data) does not exist: pass a text, JSON-lines or parquet file, "
                                "or a folder written by datasets' save_to_disk")


def _text_rows(column_names, read_column, source: str) -> list[str]:
    if "text" not in column_names:
        raise ValueError(f"{source} has no 'text' column (columns: {list(column_names)}): "
                         "the evaluation reads the text from a column named 'text'")
    return list(read_column("text"))


def _rows_from_disk(path: str, split: str) -> list[str]:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"dataset {path} has splits {list(loaded)}, not {split!r}: choose one with --split")
        loaded = loaded[split]
    return _text_rows(loaded.column_names, loaded.__getitem__, f"dataset {path}")


def _rows_from_parquet(path: str) -> list[str]:
    import pyarrow.parquet

    table = pyarrow.parquet.read_table(path)
    return _text_rows(table.column_names, lambda name: table.column(name).to_pylist(), f"parquet file {path}")


def _rows_from_hub(name: str, config: str | None, split: str) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, unknown config: say which and what to do instead
        raise ValueError(f"cannot load dataset {name!r} (config {config!r}, split {split!r}) through datasets: "
                           f"{type(e).__name__}: {e}. Without network, download it elsewhere and pass the "
                           "file with --data") from None
    return _text_rows(dataset.column_names, dataset.__getitem__, f"dataset {name!r}")


def read_text_rows(data: str | None, hf_dataset: str | None, hf_dataset_config: str | None = None,
                   split: str = "test", jsonl: bool = False) -> list[str]:
    """The texts of a local input or a hub dataset (see the module docstring).

    `jsonl` reads a plain local file as JSON lines with a "text" field (LAMBADA) instead of as
    one text (WikiText). Raises before any model work for a missing, empty or malformed input.
    """
    if (data is None) == (hf_dataset is None):
        raise ValueError("pass exactly one of --data FILE and --hf-dataset NAME")
    if hf_dataset is not None:
        rows = _rows_from_hub(hf_dataset, hf_dataset_config, split)
        source = f"dataset {hf_dataset!r}"
    else:
        _check_local(data)
        source = f"input {data}"
        if os.path.isdir(data):
            rows = _rows_from_disk(data, split)
        elif data.endswith(".parquet"):
            rows = _rows_from_parquet(data)
        elif jsonl:
            rows = _read_jsonl(data)
        else:
            with open(data, encoding="utf-8") as f:
                rows = [f.read()]
    if not any(row and row.strip() for row in rows):
        raise ValueError(f"{source} holds no text: check the path (or --split) points at the evaluation data")
    return rows


def _read_jsonl(path: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not JSON ({e}): LAMBADA input is one "
                                 '{"text": ...} object per line') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path} line {number} has no "text" string: LAMBADA input is one '
                                 '{"text": ...} object per line')
            texts.append(record["text"])
    return texts
