"""TikTokenizer: Megatron's tiktoken vocabulary files, ids, special tokens and sizes, through build_tokenizer,
tools/preprocess_data.py, pretrain_gpt.py and the inference tools' tokenizer-from-checkpoint; and, where
$MEGATRONISH_MEGATRON_PYTHON names a Python with megatron-core, the same ids as Megatron's own TikTokenizer.

Each vocabulary is learned here from fresh text: the 256 byte tokens, then byte-pair merges, most frequent first.
The expected ids come from a plain-Python statement of Megatron's definition (reference_ids), not from tiktoken.
"""

import base64
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatronish.data.indexed_dataset import IndexedDataset
from megatronish.data.tokenizers import (TIKTOKEN_PATTERNS, TIKTOKEN_SPECIAL_TOKENS, build_tokenizer,
                                         tokenizer_from_args)
from megatronish.training.arguments import parse_args

REPO = Path(__file__).resolve().parents[2]
MEGATRON_IDS = Path(__file__).parent / "megatron_tiktoken_ids.py"
NUM_SPECIAL = 16  # small enough that a test vocabulary fills --vocab-size
HAVE_TIKTOKEN = importlib.util.find_spec("tiktoken") is not None
needs_tiktoken = pytest.mark.skipif(not HAVE_TIKTOKEN, reason="tiktoken is not installed: "
                                    "pip install 'megatronish[tiktoken]' to test TikTokenizer")
WORDS = ["tensor", "parallel", "Tensor", "GPT", "pipeline", "naïve", "café", "東京", "über", "data", "42", "3.14",
         "x", "don't", "HelloWorld", "snake_case", "a/b", "!!", "...", "🙂", "<s>"]
SPACES = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n"]


def random_text(rng, words: int, specials=()) -> str:
    pieces = [str(rng.choice(WORDS + list(specials))) + str(rng.choice(SPACES)) for _ in range(words)]
    return "".join(pieces)


def learned_tokens(corpus: str, merges: int) -> list[bytes]:
    """The 256 byte tokens, then up to `merges` byte-pair merges learned greedily from `corpus`'s space-led words
    (coarser than both split patterns, so that merges cross their boundaries and the patterns tell apart)."""
    words = [[bytes([b]) for b in piece.encode()] for piece in re.findall(r"\s*\S+", corpus)]
    tokens, known = [bytes([i]) for i in range(256)], set()
    for _ in range(merges):
        pairs = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        if a + b not in known:
            known.add(a + b)
            tokens.append(a + b)
        words = [_merge(word, a, b) for word in words]
    return tokens


def _merge(word: list[bytes], a: bytes, b: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def write_vocabulary(path, tokens: list[bytes]) -> str:
    """Megatron's tiktoken vocabulary file: [{"rank", "token_bytes" (base64), "token_str"}, ...] in rank order."""
    entries = [{"rank": rank, "token_bytes": base64.b64encode(token).decode("ascii"),
                "token_str": token.decode("utf-8", errors="replace")} for rank, token in enumerate(tokens)]
    Path(path).write_text(json.dumps(entries))
    return str(path)


def reference_ids(text: str, tokens: list[bytes], special_tokens: list[str], pattern: str = "v2") -> list[int]:
    """Megatron's TikTokenizer ids by its definition: a special token written in the text is its position in
    `special_tokens`; other text is split by the pattern, each piece's bytes are merged pairwise, the pair whose
    join has the lowest rank first (the leftmost on a tie), and rank r becomes id len(special_tokens) + r."""
    import regex

    rank = {token: r for r, token in enumerate(tokens)}
    special_id = {token: i for i, token in enumerate(special_tokens)}
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, special_tokens)) + ")", text):
        if part in special_id:
            ids.append(special_id[part])
            continue
        for piece in regex.findall(TIKTOKEN_PATTERNS[pattern], part):
            parts = [bytes([b]) for b in piece.encode()]
            while len(parts) > 1:
                joins = [rank.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
                best = joins.index(min(joins))
                if joins[best] == math.inf:
                    break
                parts[best:best + 2] = [parts[best] + parts[best + 1]]
            ids += [len(special_tokens) + rank[p] for p in parts]
    return ids


def fillers(first: int, last: int) -> list[str]:
    return [f"<SPECIAL_{i}>" for i in range(first, last)]


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    rng = np.random.default_rng(0)
    tokens = learned_tokens("".join(random_text(rng, 40) for _ in range(60)), merges=200)
    return {"tokens": tokens, "path": write_vocabulary(tmp_path_factory.mktemp("tiktoken") / "vocab.json", tokens)}


def tiktokenizer(vocabulary, **options):
    options = {"vocab_size": NUM_SPECIAL + len(vocabulary["tokens"]), "tiktoken_num_special_tokens": NUM_SPECIAL,
               **options}
    return build_tokenizer("TikTokenizer", tokenizer_model=vocabulary["path"], **options)


@needs_tiktoken
@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_ids_are_the_bpe_ranks_after_the_special_tokens(vocabulary, pattern):
    tok = tiktokenizer(vocabulary, tiktoken_pattern=pattern)
    special_tokens = list(TIKTOKEN_SPECIAL_TOKENS) + fillers(7, NUM_SPECIAL)
    assert tok.special_tokens == special_tokens
    assert (tok.vocab_size, tok.bos, tok.eod, tok.pad) == (NUM_SPECIAL + len(vocabulary["tokens"]), 1, 2, 4)
    rng = np.random.default_rng(1)
    texts = [random_text(rng, 30, specials=["</s>", "<pad>", "<SPECIAL_9>"]) for _ in range(20)] + ["", "a"]
    ids = [tok.tokenize(text) for text in texts]
    assert ids == [reference_ids(text, vocabulary["tokens"], special_tokens, pattern) for text in texts]
    other = {"v1": "v2", "v2": "v1"}[pattern]  # the texts tell the patterns apart ("HelloWorld": one piece in v1)
    assert ids != [reference_ids(text, vocabulary["tokens"], special_tokens, other) for text in texts]
    assert tok.tokenize_batch(texts) == ids
    assert all(0 <= i < tok.vocab_size for seq in ids for i in seq)
    assert sum(i >= NUM_SPECIAL + 256 for seq in ids for i in seq) > 100  # the merges are used
    assert tok.tokenize("a</s>b") == [NUM_SPECIAL + ord("a"), 2, NUM_SPECIAL + ord("b")]


@needs_tiktoken
def test_vocab_size_keeps_only_the_first_ranks_of_the_file(vocabulary):
    kept = 256 + 20
    tok = tiktokenizer(vocabulary, vocab_size=NUM_SPECIAL + kept)
    rng = np.random.default_rng(2)
    texts = [random_text(rng, 30) for _ in range(10)]
    special_tokens = list(TIKTOKEN_SPECIAL_TOKENS) + fillers(7, NUM_SPECIAL)
    truncated = [reference_ids(t, vocabulary["tokens"][:kept], special_tokens) for t in texts]
    assert [tok.tokenize(t) for t in texts] == truncated
    assert max(max(seq) for seq in truncated) < NUM_SPECIAL + kept == tok.vocab_size
    assert truncated != [reference_ids(t, vocabulary["tokens"], special_tokens) for t in texts]


@needs_tiktoken
def test_detokenize_round_trips_and_writes_special_tokens_as_text(vocabulary):
    tok = tiktokenizer(vocabulary)
    rng = np.random.default_rng(3)
    texts = [random_text(rng, 25, specials=["<s>", "</s>", "<SPECIAL_11>"]) for _ in range(20)]
    assert [tok.detokenize(tok.tokenize(t)) for t in texts] == texts
    assert tok.detokenize([tok.bos, NUM_SPECIAL + ord("h"), NUM_SPECIAL + ord("i"), tok.eod, 12]) == \
        "<s>hi</s><SPECIAL_12>"
    assert tok.detokenize(np.array(tok.tokenize("東京"))) == "東京"  # bytes of one character across tokens
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is outside the TikTokenizer vocabulary"):
        tok.detokenize([0, tok.vocab_size])


@needs_tiktoken
def test_given_special_tokens_take_the_first_ids_in_their_order(vocabulary):
    given = ["<s>", "</s>", "<|im_start|>", "<unk>", "<pad>", "<mask>", "<cls>", "<sep>", "<|im_end|>"]
    tok = tiktokenizer(vocabulary, tokenizer_special_tokens=given)
    assert tok.special_tokens == given + fillers(len(given), NUM_SPECIAL)
    assert (tok.bos, tok.eod, tok.pad) == (0, 1, 4)
    assert tok.tokenize("<|im_start|>hi<|im_end|>") == [2, NUM_SPECIAL + ord("h"), NUM_SPECIAL + ord("i"), 8]


@needs_tiktoken
def test_bad_options_and_files_are_named_with_the_fix(vocabulary, tmp_path):
    size = {"vocab_size": NUM_SPECIAL + 300, "tiktoken_num_special_tokens": NUM_SPECIAL}
    cases = [
        ({}, f"holds {len(vocabulary['tokens'])} tokens, fewer than the 130072 that --vocab-size 131072 minus "
             f"--tiktoken-num-special-tokens 1000 asks for: give --vocab-size {len(vocabulary['tokens']) + 1000} "
             "or less"),
        ({"tiktoken_pattern": "v3"}, "--tiktoken-pattern v3: choose one of v1, v2"),
        ({"tokenizer_special_tokens": ["<s>", "</s>"], **size}, "--tokenizer-special-tokens lacks <unk> <mask>"),
        ({"tokenizer_special_tokens": list(TIKTOKEN_SPECIAL_TOKENS) + ["<s>"], **size}, "names <s> more than once"),
        ({"tokenizer_special_tokens": list(TIKTOKEN_SPECIAL_TOKENS) + ["<SPECIAL_9>"], **size},
         "names <SPECIAL_9>, the filler name of another id"),
        ({"vocab_size": 300, "tiktoken_num_special_tokens": 300}, "--tiktoken-num-special-tokens 300 must be at least "
         "the 7 special tokens and below --vocab-size 300"),
        ({"vocab_size": 200, "tiktoken_num_special_tokens": 8}, "the 256 byte tokens need at least --vocab-size 264"),
    ]
    for options, expected in cases:
        with pytest.raises(ValueError) as info:
            build_tokenizer("TikTokenizer", tokenizer_model=vocabulary["path"], **options)
        assert expected in str(info.value), (options, str(info.value))
    entries = json.loads(Path(vocabulary["path"]).read_text())
    swapped = entries[:3] + [entries[4], entries[3]] + entries[5:]
    files = [
        ("not json", "is not a JSON list of {rank, token_bytes, token_str}: Expecting value"),
        ({"a": 0}, "must hold a JSON list of {rank, token_bytes, token_str}"),
        (entries[:10] + [{"rank": 10, "token_bytes": "Cg=="}] + entries[11:], "entry 10 is {'rank': 10, "),
        (entries[:3] + [{**entries[4], "rank": 3}, {**entries[3], "rank": 4}] + entries[5:],
         "entry 3 is b'\\x04': the first 256 entries must be the bytes 0..255 in order"),
        (swapped, "entry 3 has rank 4: entries are listed in rank order"),
        (entries[:299] + [{**entries[260], "rank": 299}] + entries[300:], "entry 299 repeats the token of entry 260"),
        (entries[:270] + [{**entries[270], "token_bytes": "%%"}] + entries[271:], "token_bytes '%%' is not base64"),
    ]
    for content, expected in files:
        path = tmp_path / "bad.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match=re.escape(expected)):
            build_tokenizer("TikTokenizer", tokenizer_model=str(path), **size)
        assert f"{path} (--tokenizer-model)" in str(pytest.raises(ValueError, build_tokenizer, "TikTokenizer",
                                                                  tokenizer_model=str(path), **size).value)
    with pytest.raises(FileNotFoundError, match=r"TikTokenizer: /no/vocab\.json \(--tokenizer-model\) does not exist"):
        build_tokenizer("TikTokenizer", tokenizer_model="/no/vocab.json")
    with pytest.raises(ValueError, match="--tokenizer-type TikTokenizer needs --tokenizer-model"):
        build_tokenizer("TikTokenizer")


def test_without_tiktoken_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # what `import tiktoken` meets where it is not installed
    path = write_vocabulary(tmp_path / "vocab.json", [bytes([i]) for i in range(256)])
    with pytest.raises(ImportError, match=re.escape("needs the tiktoken package: pip install 'megatronish[tiktoken]'")):
        build_tokenizer("TikTokenizer", tokenizer_model=path, vocab_size=300, tiktoken_num_special_tokens=44)


def run_tool(tool: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / tool), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@needs_tiktoken
def test_preprocess_pretrain_and_the_checkpoints_tokenizer(vocabulary, tmp_path):
    """tools/preprocess_data.py writes tokenize(text) + eod per document; pretrain_gpt.py trains on it with the
    same flags; inference rebuilds the same tokenizer from the checkpoint's saved arguments."""
    from megatronish.inference.loading import load_tokenizer

    rng = np.random.default_rng(4)
    texts = [random_text(rng, int(rng.integers(5, 40)), specials=["</s>"]) for _ in range(40)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", vocabulary["path"], "--tiktoken-pattern", "v1",
             "--vocab-size", NUM_SPECIAL + 256 + 100, "--tiktoken-num-special-tokens", NUM_SPECIAL,
             "--tokenizer-special-tokens", *TIKTOKEN_SPECIAL_TOKENS, "<|im_start|>"]
    run_tool("tools/preprocess_data.py", "--input", tmp_path / "corpus.jsonl", "--output-prefix", tmp_path / "tt",
             *flags, "--append-eod", "--workers", "2")
    tok = build_tokenizer("TikTokenizer", tokenizer_model=vocabulary["path"], tiktoken_pattern="v1",
                          vocab_size=NUM_SPECIAL + 256 + 100, tiktoken_num_special_tokens=NUM_SPECIAL,
                          tokenizer_special_tokens=list(TIKTOKEN_SPECIAL_TOKENS) + ["<|im_start|>"])
    dataset = IndexedDataset(str(tmp_path / "tt_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [tok.tokenize(t) + [tok.eod] for t in texts]
    assert dataset[0].dtype == np.uint16

    save = tmp_path / "ckpt"
    done = run_tool("pretrain_gpt.py", "--data-path", tmp_path / "tt_text_document", *flags, "--num-layers", "1",
                    "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size",
                    "2", "--train-iters", "3", "--lr", "1e-3", "--eval-iters", "0", "--log-interval", "1",
                    "--split", "90,10,0", "--num-workers", "0", "--save", save, "--data-cache-path", tmp_path / "cache",
                    cwd=tmp_path)
    losses = [float(x) for x in re.findall(r"lm loss: (\S+) \|", done.stdout + done.stderr)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(tok.vocab_size)) < 1.0  # starts near uniform over the tokenizer's vocabulary
    loaded = load_tokenizer(str(save), None, {})
    assert (loaded.vocab_size, loaded.eod, loaded.special_tokens) == (tok.vocab_size, tok.eod, tok.special_tokens)
    assert [loaded.tokenize(t) for t in texts] == [tok.tokenize(t) for t in texts]


@needs_tiktoken
@pytest.mark.slow
def test_same_ids_as_megatrons_own_tiktokenizer(megatron_python, vocabulary, tmp_path):
    """Megatron's TikTokenizer, built by megatron-core's build_tokenizer from its own argument parser's reading of
    the same flags, gives the same ids, sizes, special ids and detokenized text as ours."""
    has = subprocess.run([megatron_python, "-c", "import tiktoken"], capture_output=True, text=True)
    if has.returncode:
        pytest.fail(f"{megatron_python} has no tiktoken: {megatron_python} -m pip install 'tiktoken>=0.9'")
    rng = np.random.default_rng(5)
    texts = [random_text(rng, 40, specials=["</s>", "<SPECIAL_12>", "<|im_end|>"]) for _ in range(30)] + [""]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    variants = {
        "defaults but the sizes": ["--vocab-size", NUM_SPECIAL + len(vocabulary["tokens"]),
                                   "--tiktoken-num-special-tokens", NUM_SPECIAL],
        "v1, cut vocabulary, given special tokens": [
            "--tiktoken-pattern", "v1", "--vocab-size", NUM_SPECIAL + 256 + 50, "--tiktoken-num-special-tokens",
            NUM_SPECIAL, "--tokenizer-special-tokens", "<s>", "</s>", "<|im_end|>", "<mask>", "<pad>", "<cls>",
            "<sep>", "<unk>"],
    }
    for name, flags in variants.items():
        flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", vocabulary["path"], *map(str, flags)]
        done = subprocess.run([megatron_python, "-W", "ignore", str(MEGATRON_IDS), str(tmp_path / "texts.json"),
                               *flags], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        megatron = json.loads(done.stdout.strip().splitlines()[-1])
        tok = tokenizer_from_args(parse_args(flags))  # pretrain_gpt.py's reading of the same flags
        ids = [tok.tokenize(text) for text in texts]
        ours = {"ids": ids, "detokenized": [tok.detokenize(seq) for seq in ids], "vocab_size": tok.vocab_size,
                "bos": tok.bos, "eod": tok.eod, "pad": tok.pad}
        assert ours == megatron, name
        assert sum(len(seq) for seq in ids) > 500 and sum(seq.count(tok.eod) for seq in ids) > 5, name
        print(f"{name}: {sum(map(len, ids))} ids of {len(texts)} texts equal Megatron's")
