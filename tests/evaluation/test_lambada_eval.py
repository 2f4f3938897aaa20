"""LAMBADA accuracy on an example set whose answers are known by construction.

For random contexts, the tiny GPT-2 (float64, transformers) gives its greedy next token g1 and,
after g1, its greedy g2. Where g1 is a whole word (" word", one token) three examples follow:
    context + g1                      correct: every token of the last word is the greedy one
    context + g1 + a wrong 2nd token  wrong, although its first token is right
    context + a word not starting g1  wrong
so the expected accuracy is known. Only tokens whose logit leads the one compared with by more
than 1e-3 are used, so float32 megatronish at TP 1/2 and DP 2 must agree exactly.
"""

import json
import random

import pytest
import torch

from megatronish.data.tokenizers import build_tokenizer
from megatronish.evaluation.cli import run_lambada
from megatronish.evaluation.lambada import make_example, tokenize_lambada
from megatronish.testing import run_distributed

from .conftest import WORDS

transformers = pytest.importorskip("transformers")

MARGIN = 1e-3
SUFFIXES = ("q", "z", "x", "k", "j", "v")


def _run_lambada(argv):
    return run_lambada(argv).to_dict()


def _is_word(text: str) -> bool:
    return text.startswith(" ") and len(text) > 1 and not any(c.isspace() for c in text[1:])


@torch.no_grad()
def _last_logits(model, sequences):
    """Logits after the last token of each sequence (right padding, which a causal model ignores)."""
    length = max(map(len, sequences))
    batch = torch.tensor([s + [0] * (length - len(s)) for s in sequences])
    logits = model(batch).logits
    return logits[torch.arange(len(sequences)), torch.tensor([len(s) - 1 for s in sequences])]


def _leads(logits, token, other) -> bool:
    return bool(logits[token] - logits[other] > MARGIN) and int(logits.argmax()) == token


def _build_examples(hf_dir):
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).double().eval()
    tokenizer = build_tokenizer("GPT2BPETokenizer", str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt"))
    rng = random.Random(0)
    contexts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(24)]
    context_ids = [tokenizer.tokenize(c) for c in contexts]
    first = _last_logits(model, context_ids)
    greedy = first.argmax(-1).tolist()
    second = _last_logits(model, [ids + [g] for ids, g in zip(context_ids, greedy)])
    texts, correct = [], 0
    for context, logits, g1, after in zip(contexts, first, greedy, second):
        word = tokenizer.detokenize([g1])
        runner_up = int(logits.topk(2).indices[1])
        if not (_is_word(word) and tokenizer.tokenize(word) == [g1] and _leads(logits, g1, runner_up)):
            continue
        texts.append(context + word)
        correct += 1
        g2 = int(after.argmax())
        for suffix in SUFFIXES:  # right first token, wrong second one
            ids = tokenizer.tokenize(word + suffix)
            if len(ids) == 2 and ids[0] == g1 and ids[1] != g2 and _leads(after, g2, ids[1]):
                texts.append(context + word + suffix)
                break
        other = next(w for w in WORDS if _leads(logits, g1, tokenizer.tokenize(" " + w)[0]))
        texts.append(f"{context} {other}")
    assert correct >= 4 and len(texts) - correct >= 8, "too few usable examples: change the seed"
    return texts, correct


@pytest.fixture(scope="module")
def lambada_set(hf_gpt2_dir, tmp_path_factory):
    texts, correct = _build_examples(hf_gpt2_dir)
    path = tmp_path_factory.mktemp("lambada") / "lambada_test.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, len(texts), correct


@pytest.mark.parametrize("world_size, tp", [(1, 1), (2, 2), (2, 1)], ids=["tp1", "tp2", "tp1-dp2"])
def test_accuracy_on_a_set_with_known_answers(hf_gpt2_dir, lambada_set, world_size, tp):
    path, total, correct = lambada_set
    argv = ["--hf-model", str(hf_gpt2_dir), "--data", str(path), "--micro-batch-size", "3", "--tp", str(tp),
            "--no-progress"]
    for result in run_distributed(_run_lambada, world_size, args=(argv,)):
        assert result == {"accuracy": correct / total, "num_correct": correct, "num_examples": total}


class _CharTokenizer:
    """One token per character: makes token positions easy to read in the tests below."""

    def tokenize(self, text):
        return [ord(c) for c in text]


def test_last_word_split_and_context_truncation():
    context, answer = tokenize_lambada("  the cat sat on the  mat ", _CharTokenizer())
    assert context == [ord(c) for c in "the cat sat on the"] and answer == [ord(c) for c in " mat"]
    tokens, answer_length = make_example(list(range(10)), [100, 101], seq_length=5)
    assert tokens.tolist() == [6, 7, 8, 9, 100, 101] and answer_length == 2  # oldest context dropped


def test_bad_examples():
    with pytest.raises(ValueError, match="needs a context before its last word"):
        tokenize_lambada("  lonely ", _CharTokenizer())
    with pytest.raises(ValueError, match="a last word of 6 tokens does not fit in --seq-length 5"):
        make_example([1, 2], list(range(6)), seq_length=5)


def test_malformed_jsonl(hf_gpt2_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine here"}\n{"txt": "no text key"}\n')
    with pytest.raises(ValueError, match='bad.jsonl line 2 has no "text" string'):
        run_lambada(["--hf-model", str(hf_gpt2_dir), "--data", str(path)])
    path.write_text('{"text": "fine here"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2 is not JSON"):
        run_lambada(["--hf-model", str(hf_gpt2_dir), "--data", str(path)])
