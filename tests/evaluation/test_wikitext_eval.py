"""WikiText evaluation through the tool's library entry against a direct transformers computation.

The tiny random GPT-2 (conftest.py) is evaluated through megatronish.evaluation.cli.run_wikitext
(what tools/eval_wikitext103.py runs) at TP=1 from the Hugging Face directory, at TP=2 from its
conversion by tools/convert_checkpoint.py, and at TP=1 x DP=2 from a training checkpoint saved
at TP=2; the same windows are scored here with transformers in float64, written out
independently of windows.py. Tolerance: 1e-5 relative on avg_loss and adjusted_ppl
(megatronish runs in float32).
"""

import contextlib
import io
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatronish import parallel_state
from megatronish.data.tokenizers import build_tokenizer
from megatronish.evaluation.cli import run_wikitext
from megatronish.evaluation.detokenizer import wikitext_detokenize
from megatronish.model import GPTModel, load_full_state_dict
from megatronish.model.hf_gpt2 import load_hf_gpt2
from megatronish.testing import load_tool, run_distributed
from megatronish.training.checkpointing import save_model_only

from .conftest import wikitext_text

transformers = pytest.importorskip("transformers")



def _run_wikitext(argv):
    return run_wikitext(argv).to_dict()


def _reference(hf_dir, raw_text, seq_length, stride):
    """avg_loss and adjusted_ppl computed directly: each window's scored targets, float64 transformers."""
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).double().eval()
    tokenizer = build_tokenizer("GPT2BPETokenizer", str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt"))
    tokens = torch.tensor(tokenizer.tokenize(wikitext_detokenize(raw_text)))
    total, scored, start = 0.0, 0, 0
    while scored < tokens.numel() - 1:  # window 0, then one window per `stride` new targets
        chunk = tokens[start:start + seq_length + 1]
        with torch.no_grad():
            logits = model(chunk[None, :-1]).logits[0]
        losses = F.cross_entropy(logits, chunk[1:], reduction="none")
        new = losses if start == 0 else losses[seq_length - stride:]
        total, scored, start = total + new.sum().item(), scored + new.numel(), start + stride
    assert scored == tokens.numel() - 1
    avg_loss = total / scored
    num_original_tokens = len(raw_text.strip().split(" "))
    return avg_loss, math.exp(avg_loss * scored / (num_original_tokens - 1)), tokens.numel(), num_original_tokens


@pytest.fixture(scope="module")
def wikitext_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wikitext") / "wiki.test.tokens"
    path.write_text(wikitext_text(seed=0), encoding="utf-8")
    return path


def _save_training_checkpoint(hf_dir, save_dir, tp):
    parallel_state.initialize_model_parallel(tp)
    config, state = load_hf_gpt2(hf_dir)
    model = GPTModel(config)
    load_full_state_dict(model, state)
    save_model_only(str(save_dir), model)


@pytest.fixture(scope="module")
def checkpoints(hf_gpt2_dir, tmp_path_factory):
    """{source: the model flags}: the HF directory, its conversion, a training checkpoint saved at TP=2."""
    root = tmp_path_factory.mktemp("checkpoints")
    convert_tool = load_tool("convert_checkpoint")
    convert_tool.convert("hf", hf_gpt2_dir, "megatronish", root / "converted")
    run_distributed(_save_training_checkpoint, 2, args=(hf_gpt2_dir, root / "trained", 2))
    tokenizer = ["--vocab-file", str(hf_gpt2_dir / "vocab.json"), "--merge-file", str(hf_gpt2_dir / "merges.txt")]
    return {"hf": ["--hf-model", str(hf_gpt2_dir)], "converted": ["--load", str(root / "converted")],
            "training": ["--load", str(root / "trained")] + tokenizer}


@pytest.mark.parametrize("world_size, tp, source", [(1, 1, "hf"), (2, 2, "converted"), (2, 1, "training")],
                         ids=["tp1-hf", "tp2-converted", "tp1-dp2-training-saved-at-tp2"])
def test_matches_transformers(hf_gpt2_dir, checkpoints, wikitext_file, world_size, tp, source):
    argv = checkpoints[source] + ["--data", str(wikitext_file), "--seq-length", "16", "--overlapping-eval", "4",
                                  "--micro-batch-size", "3", "--tp", str(tp), "--no-progress"]
    results = run_distributed(_run_wikitext, world_size, args=(argv,))
    avg_loss, adjusted_ppl, num_tokens, num_original = _reference(hf_gpt2_dir, wikitext_file.read_text(), 16, 4)
    for rank, result in enumerate(results):
        assert result["num_tokenized_tokens"] == num_tokens and result["num_original_tokens"] == num_original
        assert result["avg_loss"] == pytest.approx(avg_loss, rel=1e-5), f"rank {rank}"
        assert result["adjusted_ppl"] == pytest.approx(adjusted_ppl, rel=1e-5), f"rank {rank}"
        assert result["ppl"] == pytest.approx(math.exp(avg_loss), rel=1e-5)
        assert result["token_ratio"] == pytest.approx((num_tokens - 1) / (num_original - 1), rel=1e-12)


def test_defaults_use_the_models_length_and_stride_32(hf_gpt2_dir, wikitext_file):
    # n_positions 32 and --overlapping-eval 32: windows that do not overlap.
    result = run_distributed(_run_wikitext, 1, args=(["--hf-model", str(hf_gpt2_dir), "--data", str(wikitext_file),
                                                      "--no-progress"],))[0]
    avg_loss, adjusted_ppl, _, _ = _reference(hf_gpt2_dir, wikitext_file.read_text(), 32, 32)
    assert result["avg_loss"] == pytest.approx(avg_loss, rel=1e-5)
    assert result["adjusted_ppl"] == pytest.approx(adjusted_ppl, rel=1e-5)


def _tool_main(argv):
    """tools/eval_wikitext103.py's main() in this rank: (exit code, stdout, stderr)."""
    tool = load_tool("eval_wikitext103")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = tool.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def test_tool_prints_one_line_and_writes_json(hf_gpt2_dir, wikitext_file, tmp_path):
    output = tmp_path / "result.json"
    code, stdout, stderr = run_distributed(_tool_main, 1, args=([
        "--hf-model", str(hf_gpt2_dir), "--data", str(wikitext_file), "--seq-length", "16",
        "--overlapping-eval", "8", "--output", str(output)],))[0]
    assert code == 0, stderr
    result = json.loads(output.read_text())
    assert sorted(result) == sorted(["avg_loss", "ppl", "adjusted_ppl", "token_ratio", "num_original_tokens",
                                     "num_tokenized_tokens"])
    assert result["avg_loss"] == pytest.approx(_reference(hf_gpt2_dir, wikitext_file.read_text(), 16, 8)[0], rel=1e-5)
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and f"adjusted_ppl {result['adjusted_ppl']:.4f}" in lines[0]
    assert "wikitext windows" in stderr  # the progress bar


def test_tool_reports_bad_input_in_one_line(tmp_path):
    code, _, stderr = _tool_main(["--hf-model", str(tmp_path), "--data", str(tmp_path / "missing.tokens")])
    assert code == 2 and stderr.startswith("eval_wikitext103.py: error: input ") and stderr.count("\n") == 1
    assert not dist.is_initialized()


@pytest.mark.parametrize("extra, match", [
    (["--tokenizer-type", "ByteTokenizer"], "vocabulary has 553 tokens, the tokenizer's 258"),
    (["--seq-length", "64"], "--seq-length 64 is larger than the model's max_position_embeddings 32"),
    (["--seq-length", "8", "--overlapping-eval", "16"], "--overlapping-eval 16 must be between 1 and --seq-length 8"),
])
def test_bad_options_fail_before_any_work(hf_gpt2_dir, wikitext_file, extra, match):
    with pytest.raises(ValueError, match=match):
        run_wikitext(["--hf-model", str(hf_gpt2_dir), "--data", str(wikitext_file)] + extra)
    assert not dist.is_initialized()


def test_missing_or_empty_input(hf_gpt2_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.tokens .--data. does not exist"):
        run_wikitext(["--hf-model", str(hf_gpt2_dir), "--data", str(tmp_path / "nothing.tokens")])
    (tmp_path / "empty.tokens").write_text(" \n \n")
    with pytest.raises(ValueError, match="empty.tokens holds no text"):
        run_wikitext(["--hf-model", str(hf_gpt2_dir), "--data", str(tmp_path / "empty.tokens")])
    assert not dist.is_initialized()


def test_not_a_checkpoint(hf_gpt2_dir, wikitext_file, tmp_path):
    data = ["--data", str(wikitext_file), "--vocab-file", str(hf_gpt2_dir / "vocab.json"),
            "--merge-file", str(hf_gpt2_dir / "merges.txt")]
    with pytest.raises(FileNotFoundError, match="is not a megatronish checkpoint: expected latest_checkpointed"):
        run_wikitext(["--load", str(tmp_path)] + data)
    with pytest.raises(FileNotFoundError, match="--hf-model .* has no config.json"):
        run_wikitext(["--hf-model", str(tmp_path)] + data)
    with pytest.raises(FileNotFoundError, match="--load .*missing is not a directory"):
        run_wikitext(["--load", str(tmp_path / "missing")] + data)
    assert not dist.is_initialized()
