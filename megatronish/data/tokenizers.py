"""Tokenizers behind one small interface, built by Megatron's names.

    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file="vocab.json", merge_file="merges.txt")
    ids = tokenizer.tokenize("hello")            # list[int]
    text = tokenizer.detokenize(ids)             # str
    tokenizer.vocab_size, tokenizer.eod, tokenizer.pad
    tokenizer.tokenize_batch(["a", "b"])         # list[list[int]], the fast path for preprocessing

Types (the flags that feed them are those of tools/preprocess_data.py and pretrain_gpt.py):
    GPT2BPETokenizer        byte-level BPE from --vocab-file vocab.json and --merge-file merges.txt;
                            eod = pad = the id of "<|endoftext|>". Gives Megatron's ids exactly.
    SentencePieceTokenizer  --tokenizer-model x.model; eod = the model's </s> (eos) id, pad = its pad
                            id or eod (Megatron's GPTSentencePieceTokenizer behaviour).
    HuggingFaceTokenizer    --tokenizer-model path/to/tokenizer.json (or the folder holding it);
                            eod = the eos token of tokenizer_config.json when present, else the first
                            of "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>" in the vocabulary.
                            No BOS/EOS is inserted by tokenize(); --append-eod adds the EOD.
    ByteTokenizer           no files: ids 0-255 are the UTF-8 bytes, 256 is "<|endoftext|>" (eod),
                            257 is "<pad>"; vocab_size 258.
    NullTokenizer           no files (Megatron's, for pre-tokenized or --mock-data runs): --vocab-size N ids,
                            eod = --null-tokenizer-eod-id or N - 1, no pad; text is space-separated ids.
    Llama2Tokenizer         --tokenizer-model x.model: SentencePiece whose tokenize() puts BOS first, as
                            Megatron's Llama2Tokenizer does; eod = eos.
Special-token ids are rendered by detokenize() as their text ("<|endoftext|>").
"""

import json
import os

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer", "ByteTokenizer")


class Tokenizer:
    """The interface every tokenizer implements."""

    vocab_size: int
    eod: int
    pad: int

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids) -> str:
        raise NotImplementedError

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens plus two special tokens; needs no files, never fails to encode."""

    SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")

    def __init__(self):
        self.vocab_size = 256 + len(self.SPECIAL_TOKENS)
        self.eod = 256
        self.pad = 257

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self.SPECIAL_TOKENS[i - 256] if i < self.vocab_size else "")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class _HFTokenizersBase(Tokenizer):
    """Shared by the tokenizers built on the `tokenizers` library (Rust, batch encoding)."""

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class GPT2BPETokenizer(_HFTokenizersBase):
    """GPT-2 byte-level BPE (vocab.json + merges.txt), same ids as Megatron's GPT2BPETokenizer."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers

        _require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer")
        _require_file(merge_file, "--merge-file", "GPT2BPETokenizer")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"vocab file {vocab_file} (--vocab-file) is not a JSON token->id map: {e}") from None
        if not isinstance(vocab, dict):
            raise ValueError(f"vocab file {vocab_file} (--vocab-file) must hold a JSON object token->id")
        if self.EOD_TOKEN not in vocab:
            raise ValueError(f"vocab file {vocab_file} (--vocab-file) has no {self.EOD_TOKEN!r} token, needed as EOD")
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:  # the Rust error names neither the file nor the flag
            raise ValueError(
                f"cannot read BPE merges from {merge_file} (--merge-file) with {vocab_file}: {e}"
            ) from None
        self._tokenizer = RustTokenizer(model)
        # Megatron's GPT-2 tokenizer has no special tokens: "<|endoftext|>" in text is plain text.
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        self.vocab_size = len(vocab)
        self.eod = self.pad = vocab[self.EOD_TOKEN]


class HuggingFaceTokenizer(_HFTokenizersBase):
    """Any `tokenizers` tokenizer.json (the file, or a folder holding it)."""

    EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
    PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")

    def __init__(self, tokenizer_model: str):
        from tokenizers import Tokenizer as RustTokenizer

        folder = tokenizer_model if os.path.isdir(tokenizer_model) else os.path.dirname(tokenizer_model)
        path = os.path.join(tokenizer_model, "tokenizer.json") if os.path.isdir(tokenizer_model) else tokenizer_model
        _require_file(path, "--tokenizer-model", "HuggingFaceTokenizer")
        try:
            self._tokenizer = RustTokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path} (--tokenizer-model) is not a tokenizers tokenizer.json: {e}") from None
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(os.path.join(folder, "tokenizer_config.json"))
        eod_name = _token_text(config.get("eos_token")) or next((t for t in self.EOD_CANDIDATES if t in vocab), None)
        if eod_name not in vocab:
            raise ValueError(
                f"{path} (--tokenizer-model) has no end-of-document token: none of {self.EOD_CANDIDATES} is in its "
                "vocabulary; add one, or name it as eos_token in a tokenizer_config.json beside it"
            )
        self.eod = vocab[eod_name]
        pad_name = _token_text(config.get("pad_token")) or next((t for t in self.PAD_CANDIDATES if t in vocab), None)
        self.pad = vocab.get(pad_name, self.eod)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model; eod is the model's eos (</s>) id."""

    def __init__(self, tokenizer_model: str):
        import sentencepiece

        _require_file(tokenizer_model, "--tokenizer-model", "SentencePieceTokenizer")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(tokenizer_model)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{tokenizer_model} (--tokenizer-model) is not a SentencePiece model: {e}") from None
        self.vocab_size = self._sp.GetPieceSize()
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"SentencePiece model {tokenizer_model} (--tokenizer-model) has no eos (</s>) token for EOD"
            )
        self.eod = self._sp.eos_id()
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.Encode(texts)

    def detokenize(self, ids) -> str:
        return self._sp.Decode([int(i) for i in ids])


class Llama2Tokenizer(SentencePieceTokenizer):
    """Llama 2's SentencePiece model: every tokenize() starts with BOS (Megatron's Llama2Tokenizer)."""

    def tokenize(self, text: str) -> list[int]:
        return [self._sp.bos_id()] + self._sp.EncodeAsIds(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [[self._sp.bos_id()] + ids for ids in self._sp.Encode(texts)]


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: ids without text; "1 2 3" <-> [1, 2, 3]."""

    def __init__(self, vocab_size: int, eod_id: int | None = None):
        if not vocab_size or vocab_size < 1:
            raise ValueError(f"--tokenizer-type NullTokenizer needs --vocab-size N (N >= 1), got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1 if eod_id is None else int(eod_id)
        self.pad = -1  # none: Megatron's default pad id, never a token

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None, tokenizer_model=None,
                    vocab_size: int | None = None, null_tokenizer_eod_id: int | None = None) -> Tokenizer:
    """Build a tokenizer by its Megatron name (see the module docstring for the files each needs)."""
    if tokenizer_type == "GPT2BPETokenizer":
        _require_flag(vocab_file, "--vocab-file", tokenizer_type, "vocab.json")
        _require_flag(merge_file, "--merge-file", tokenizer_type, "merges.txt")
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        _require_flag(tokenizer_model, "--tokenizer-model", tokenizer_type, "a SentencePiece .model file")
        cls = Llama2Tokenizer if tokenizer_type == "Llama2Tokenizer" else SentencePieceTokenizer
        return cls(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size, null_tokenizer_eod_id)
    if tokenizer_type == "HuggingFaceTokenizer":
        _require_flag(tokenizer_model, "--tokenizer-model", tokenizer_type, "tokenizer.json or its folder")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def _require_flag(value, flag: str, tokenizer_type: str, what: str) -> None:
    if not value:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag} ({what})")


def _require_file(path: str, flag: str, tokenizer_type: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tokenizer_type}: {path} ({flag}) does not exist or is not a file")


def _read_tokenizer_config(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(token) -> str | None:
    """tokenizer_config.json writes special tokens either as text or as {"content": text, ...}."""
    return token.get("content") if isinstance(token, dict) else token
