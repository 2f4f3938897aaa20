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
    TikTokenizer            --tokenizer-model vocab.json (Megatron's tiktoken vocabulary, see TikTokenizer), with
                            --tiktoken-pattern, --tiktoken-num-special-tokens, --tokenizer-special-tokens and
                            --vocab-size; needs the tiktoken package (pip install 'megatronish[tiktoken]').
Special-token ids are rendered by detokenize() as their text ("<|endoftext|>").
"""

import base64
import binascii
import json
import os

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer", "ByteTokenizer", "TikTokenizer")
# Every option build_tokenizer takes, by the argument names of the tools (pretrain_gpt.py, preprocess_data.py, ...)
TOKENIZER_OPTIONS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size",
                     "null_tokenizer_eod_id", "tiktoken_pattern", "tiktoken_num_special_tokens",
                     "tokenizer_special_tokens")

# Megatron's TikTokenizer defaults and its two pre-tokenization (split) patterns.
TIKTOKEN_VOCAB_SIZE = 2**17
TIKTOKEN_NUM_SPECIAL_TOKENS = 1000
TIKTOKEN_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


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
        vocab = _read_json(vocab_file, "--vocab-file", dict, "a JSON object token->id")
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


class TikTokenizer(Tokenizer):
    """Megatron's TikTokenizer: a tiktoken BPE whose ids start after a block of special tokens.

    --tokenizer-model is a JSON list of the BPE's tokens, the 256 single bytes first (entry i is byte i) and each
    merge after the tokens it joins: {"rank": i, "token_bytes": base64 of the token's bytes, "token_str": its
    text}; rank i must be the entry's position, and the lower the rank, the earlier the merge applies.
    Ids 0..num_special_tokens-1 are the special tokens: `special_tokens` (which must hold <unk> <s> </s> <mask>
    <pad> <cls> <sep>; these seven by default), then "<SPECIAL_k>" fillers with k its id; token rank r gets id
    r + num_special_tokens. vocab_size counts both, so only the first vocab_size - num_special_tokens entries
    of the file are used. eod is </s>, bos <s>, pad <pad>. tokenize() turns special tokens written in the text
    into their ids, as Megatron does; detokenize() renders them as their text.
    """

    def __init__(self, tokenizer_model: str, pattern: str | None = None, vocab_size: int | None = None,
                 num_special_tokens: int | None = None, special_tokens=None):
        tiktoken = import_tiktoken()
        self.special_tokens = tiktoken_special_tokens(pattern, vocab_size, num_special_tokens, special_tokens)
        self.vocab_size = vocab_size or TIKTOKEN_VOCAB_SIZE
        num_special_tokens = len(self.special_tokens)
        ranks = read_tiktoken_vocabulary(tokenizer_model, self.vocab_size, num_special_tokens)
        self._encoding = tiktoken.Encoding(
            name=os.path.basename(os.path.dirname(os.path.abspath(tokenizer_model))),
            pat_str=TIKTOKEN_PATTERNS[pattern or "v2"],
            mergeable_ranks={token: rank + num_special_tokens for token, rank in ranks.items()},
            special_tokens={token: i for i, token in enumerate(self.special_tokens)},
        )
        self.bos, self.eod, self.pad = (self.special_tokens.index(t) for t in ("<s>", "</s>", "<pad>"))

    def tokenize(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")

    def detokenize(self, ids) -> str:
        ids = [int(i) for i in ids]
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:
            raise ValueError(f"token id {outside[0]} is outside the TikTokenizer vocabulary (0..{self.vocab_size - 1})")
        return self._encoding.decode(ids)


def tiktoken_special_tokens(pattern: str | None = None, vocab_size: int | None = None,
                            num_special_tokens: int | None = None, special_tokens=None) -> list:
    """TikTokenizer's special tokens in id order (the given ones, then "<SPECIAL_k>" fillers); None means Megatron's
    default. Raises ValueError, a line per problem naming the flag, when the options do not fit together: all but
    the vocabulary file is checked, so argument validation calls it too."""
    vocab_size = vocab_size or TIKTOKEN_VOCAB_SIZE
    num_special_tokens = TIKTOKEN_NUM_SPECIAL_TOKENS if num_special_tokens is None else num_special_tokens
    special_tokens = list(special_tokens or TIKTOKEN_SPECIAL_TOKENS)
    fillers = [f"<SPECIAL_{i}>" for i in range(len(special_tokens), num_special_tokens)]
    problems = []
    if pattern is not None and pattern not in TIKTOKEN_PATTERNS:
        problems.append(f"--tiktoken-pattern {pattern}: choose one of {', '.join(TIKTOKEN_PATTERNS)} (default v2)")
    repeated = sorted({t for t in special_tokens if special_tokens.count(t) > 1})
    if repeated:
        problems.append(f"--tokenizer-special-tokens names {' '.join(repeated)} more than once: give each token once")
    missing = [t for t in TIKTOKEN_SPECIAL_TOKENS if t not in special_tokens]
    if missing:
        problems.append(f"--tokenizer-special-tokens lacks {' '.join(missing)}: TikTokenizer needs "
                        f"{' '.join(TIKTOKEN_SPECIAL_TOKENS)} among them (their positions give their ids)")
    clash = [t for t in fillers if t in special_tokens]
    if clash:
        problems.append(f"--tokenizer-special-tokens names {clash[0]}, the filler name of another id: rename it")
    if not len(special_tokens) <= num_special_tokens < vocab_size:
        problems.append(f"--tiktoken-num-special-tokens {num_special_tokens} must be at least the "
                        f"{len(special_tokens)} special tokens and below --vocab-size {vocab_size}")
    elif vocab_size - num_special_tokens < 256:
        problems.append(f"--vocab-size {vocab_size} leaves {vocab_size - num_special_tokens} ids after "
                        f"--tiktoken-num-special-tokens {num_special_tokens}: the 256 byte tokens need at least "
                        f"--vocab-size {num_special_tokens + 256}")
    if problems:
        raise ValueError("\n".join(problems))
    return special_tokens + fillers


def read_tiktoken_vocabulary(path: str, vocab_size: int, num_special_tokens: int) -> dict[bytes, int]:
    """{token bytes: rank} of the entries of a TikTokenizer vocabulary file (see TikTokenizer) that the ids after the
    special tokens hold: the first vocab_size - num_special_tokens."""
    max_entries = vocab_size - num_special_tokens
    _require_file(path, "--tokenizer-model", "TikTokenizer")
    entries = _read_json(path, "--tokenizer-model", list, "a JSON list of {rank, token_bytes, token_str}")
    if len(entries) < max_entries:
        raise ValueError(f"{path} (--tokenizer-model) holds {len(entries)} tokens, fewer than the {max_entries} that "
                         f"--vocab-size {vocab_size} minus --tiktoken-num-special-tokens {num_special_tokens} asks "
                         f"for: give --vocab-size {len(entries) + num_special_tokens} or less")
    ranks = {}
    for rank, entry in enumerate(entries[:max_entries]):
        token = _vocabulary_entry(path, rank, entry)
        if token in ranks:
            raise ValueError(f"{path} (--tokenizer-model): entry {rank} repeats the token of entry {ranks[token]}")
        ranks[token] = rank
    return ranks


def _vocabulary_entry(path: str, rank: int, entry) -> bytes:
    where = f"{path} (--tokenizer-model) entry {rank}"
    if not isinstance(entry, dict) or entry.keys() != {"rank", "token_bytes", "token_str"}:
        raise ValueError(f"{where} is {str(entry)[:80]}: every entry is {{rank, token_bytes, token_str}}")
    if entry["rank"] != rank:
        raise ValueError(f"{where} has rank {entry['rank']}: entries are listed in rank order 0, 1, 2, ...")
    try:
        token = base64.b64decode(entry["token_bytes"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError(f"{where}: token_bytes {str(entry['token_bytes'])[:40]!r} is not base64") from None
    if rank < 256 and token != bytes([rank]):
        raise ValueError(f"{where} is {token!r}: the first 256 entries must be the bytes 0..255 in order")
    return token


def import_tiktoken():
    try:
        import tiktoken
    except ImportError:
        raise ImportError("--tokenizer-type TikTokenizer needs the tiktoken package: "
                          "pip install 'megatronish[tiktoken]'") from None
    return tiktoken


def build_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None, tokenizer_model=None,
                    vocab_size: int | None = None, null_tokenizer_eod_id: int | None = None,
                    tiktoken_pattern: str | None = None, tiktoken_num_special_tokens: int | None = None,
                    tokenizer_special_tokens=None) -> Tokenizer:
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
    if tokenizer_type == "TikTokenizer":
        _require_flag(tokenizer_model, "--tokenizer-model", tokenizer_type, "the tiktoken vocabulary .json")
        return TikTokenizer(tokenizer_model, tiktoken_pattern, vocab_size, tiktoken_num_special_tokens,
                            tokenizer_special_tokens)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def tokenizer_from_args(args, **overrides) -> Tokenizer:
    """build_tokenizer from parsed arguments (any object with the TOKENIZER_OPTIONS attributes it has)."""
    options = {name: getattr(args, name, None) for name in TOKENIZER_OPTIONS}
    return build_tokenizer(**{**options, **overrides})


def add_tokenizer_options(group) -> None:
    """The flags of NullTokenizer and TikTokenizer, Megatron's names and meanings, for every tool that builds one."""
    group.add_argument("--vocab-size", type=int, help="NullTokenizer: the vocabulary size (ids 0..N-1); "
                       f"TikTokenizer: the ids in all, special tokens included (default {TIKTOKEN_VOCAB_SIZE})")
    group.add_argument("--null-tokenizer-eod-id", type=int,
                       help="NullTokenizer: the EOD id (default: --vocab-size - 1)")
    group.add_argument("--tiktoken-pattern", help="TikTokenizer: Megatron's text split pattern, v1 or v2 "
                       "(default v2); other tokenizer types ignore it, as Megatron does")
    group.add_argument("--tiktoken-num-special-tokens", type=int, help="TikTokenizer: the ids reserved for special "
                       f"tokens before the BPE's (default {TIKTOKEN_NUM_SPECIAL_TOKENS}); others ignore it")
    group.add_argument("--tokenizer-special-tokens", "--tiktoken-special-tokens", dest="tokenizer_special_tokens",
                       nargs="+", metavar="TOKEN", help="TikTokenizer only: the special tokens, ids 0, 1, ... in "
                       f"order; must hold {' '.join(TIKTOKEN_SPECIAL_TOKENS)} (the default); the rest of the reserved "
                       "ids are <SPECIAL_id> (--tiktoken-special-tokens: Megatron's older name)")


def _require_flag(value, flag: str, tokenizer_type: str, what: str) -> None:
    if not value:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag} ({what})")


def _require_file(path: str, flag: str, tokenizer_type: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tokenizer_type}: {path} ({flag}) does not exist or is not a file")


def _read_json(path: str, flag: str, kind: type, what: str):
    """The JSON value in `path`, which must be a `kind`; errors name the file, its flag and what it should hold."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} ({flag}) is not {what}: {e}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} ({flag}) must hold {what}")
    return value


def _read_tokenizer_config(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(token) -> str | None:
    """tokenizer_config.json writes special tokens either as text or as {"content": text, ...}."""
    return token.get("content") if isinstance(token, dict) else token
