import json

import numpy as np
import pytest

from megatronish.data.tokenizer_training import train_byte_level_bpe, train_sentencepiece
from megatronish.data.tokenizers import build_tokenizer

from .conftest import FIXTURES, gpt2_files

SAMPLES = ["Hello  world", " leading space", "naïve café – ünïcode ✓ 東京", "tabs\tand\nnewlines\n", "x", ""]


def corpus_texts() -> list[str]:
    with open(FIXTURES / "corpus.jsonl") as f:
        return [json.loads(line)["text"] for line in f]


def random_text(rng, words: int) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzé"))
    lengths = rng.integers(1, 8, size=words)
    return (
        " ".join("".join(w) for w in np.split(rng.choice(letters, size=lengths.sum()), np.cumsum(lengths)[:-1])) + "\n"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SentencePiece model and a byte-level BPE trained on freshly generated text."""
    folder = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    text = folder / "train.txt"
    text.write_text("".join(random_text(rng, 30) for _ in range(300)), encoding="utf-8")
    return {
        "spm": train_sentencepiece([str(text)], str(folder / "sp"), vocab_size=400),
        "bpe": train_byte_level_bpe([str(text)], str(folder / "bpe"), vocab_size=400),
        "folder": folder,
    }


def all_tokenizers(trained):
    bpe = trained["bpe"]
    return {
        "GPT2BPETokenizer": build_tokenizer(
            "GPT2BPETokenizer", vocab_file=bpe["vocab.json"], merge_file=bpe["merges.txt"]
        ),
        "SentencePieceTokenizer": build_tokenizer("SentencePieceTokenizer", tokenizer_model=trained["spm"]),
        "HuggingFaceTokenizer": build_tokenizer("HuggingFaceTokenizer", tokenizer_model=bpe["tokenizer.json"]),
        "ByteTokenizer": build_tokenizer("ByteTokenizer"),
    }


def test_gpt2_bpe_gives_megatrons_ids(expected):
    tok = build_tokenizer("GPT2BPETokenizer", **gpt2_files())
    assert tok.vocab_size == 553 and tok.eod == 0 and tok.pad == 0
    texts = corpus_texts()
    assert [tok.tokenize(t) + [tok.eod] for t in texts[:3]] == expected["meg_text_document"]["first_3_sequences"]
    ids = tok.tokenize_batch(texts)
    assert ids == [tok.tokenize(t) for t in texts]
    assert [tok.detokenize(i) for i in ids] == texts
    assert tok.detokenize(ids[0] + [tok.eod]) == texts[0] + "<|endoftext|>"


def test_every_type_round_trips(trained):
    rng = np.random.default_rng(1)
    texts = SAMPLES + [random_text(rng, 20) for _ in range(5)]
    for name, tok in all_tokenizers(trained).items():
        ids = tok.tokenize_batch(texts)
        assert ids == [tok.tokenize(t) for t in texts], name
        assert [tok.detokenize(i) for i in ids] == texts, name
        assert all(0 <= i < tok.vocab_size for seq in ids for i in seq), name
        assert 0 <= tok.eod < tok.vocab_size and 0 <= tok.pad < tok.vocab_size, name
        assert tok.detokenize(tok.tokenize("ab") + [tok.eod]).startswith("ab"), name


def test_special_tokens(trained):
    tokenizers = all_tokenizers(trained)
    byte = tokenizers["ByteTokenizer"]
    assert (byte.vocab_size, byte.eod, byte.pad) == (258, 256, 257)
    assert byte.tokenize("é") == [0xC3, 0xA9]
    assert byte.detokenize([104, 105, 256, 257]) == "hi<|endoftext|><pad>"
    spm = tokenizers["SentencePieceTokenizer"]
    assert (spm.eod, spm.pad) == (2, 3)  # </s> and <pad> as trained
    bpe_vocab = json.loads(open(trained["bpe"]["vocab.json"]).read())
    assert tokenizers["GPT2BPETokenizer"].eod == tokenizers["HuggingFaceTokenizer"].eod == bpe_vocab["<|endoftext|>"]


def test_hugging_face_folder_and_config(trained, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(open(trained["bpe"]["tokenizer.json"], "rb").read())
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(folder))
    assert tok.detokenize(tok.tokenize("hello there")) == "hello there"
    vocab = json.loads(open(trained["bpe"]["vocab.json"]).read())
    some_token = next(t for t, i in vocab.items() if i == 300)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": some_token}, "pad_token": "e"}))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(folder))
    assert tok.eod == 300 and tok.pad == vocab["e"]


def test_errors_name_the_file_and_flag(tmp_path):
    with pytest.raises(ValueError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(FIXTURES / "vocab.json"))
    with pytest.raises(FileNotFoundError, match=r"nope\.json \(--vocab-file\)"):
        build_tokenizer("GPT2BPETokenizer", vocab_file="nope.json", merge_file=str(FIXTURES / "merges.txt"))
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match=r"bad\.json \(--vocab-file\)"):
        build_tokenizer(
            "GPT2BPETokenizer", vocab_file=str(tmp_path / "bad.json"), merge_file=str(FIXTURES / "merges.txt")
        )
    (tmp_path / "noeod.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        build_tokenizer(
            "GPT2BPETokenizer", vocab_file=str(tmp_path / "noeod.json"), merge_file=str(FIXTURES / "merges.txt")
        )
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(FileNotFoundError, match=r"missing\.model \(--tokenizer-model\)"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model="missing.model")
    with pytest.raises(ValueError, match=r"bad\.json \(--tokenizer-model\)"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    with pytest.raises(ValueError, match="ByteTokenizer"):
        build_tokenizer("GPT2Tokenizer")
