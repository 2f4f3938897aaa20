"""tools/generate.py from its command line: training checkpoints whose saved arguments name the tokenizer,
plain, Sequoia-tree and chain decoding (TP = 1, and TP = 2 under torchrun) print the same greedy text as
the library; bad options exit 2 with one line naming the fix."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatronish import parallel_state
from megatronish.data.tokenizers import ByteTokenizer
from megatronish.inference import Request, SamplingParams, generate
from megatronish.testing import run_distributed

from .conftest import TARGET, build_model

REPO = Path(__file__).resolve().parents[2]
PROMPT = "the cat "
NEW_TOKENS = 30


def _library_greedy(states) -> str:
    parallel_state.initialize_model_parallel(1)
    request = Request(list(PROMPT.encode()), NEW_TOKENS, SamplingParams(temperature=0))
    return ByteTokenizer().detokenize(generate(build_model(TARGET, states[0]), [request]).completions[0].tokens)


@pytest.fixture(scope="module")
def expected_text(trained_pair):
    return run_distributed(_library_greedy, 1, args=(trained_pair,))[0]


def _run(argv, launcher=(sys.executable,)):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, str(REPO / "tools" / "generate.py"), *argv], capture_output=True, text=True,
                          env=env, timeout=300)


def _common(checkpoints):
    return ["--load", checkpoints[0], "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0"]


@pytest.mark.parametrize("speculation", [
    [], ["--draft-load", "DRAFT", "--tree-size", "8", "--tree-depth", "4", "--fixed-tree-size"],
    ["--draft-load", "DRAFT", "--tree-size", "6", "--tree-depth", "3"]], ids=["plain", "sequoia_tree", "timed_tree"])
def test_generate_prints_the_greedy_continuation(trained_checkpoints, expected_text, speculation):
    argv = _common(trained_checkpoints) + [trained_checkpoints[1] if a == "DRAFT" else a for a in speculation]
    proc = _run(argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text + "\n"
    assert "tokens/s" in proc.stderr and "finish reason: length" in proc.stderr
    if "--fixed-tree-size" in speculation:
        assert "Sequoia tree of 8 nodes" in proc.stderr and "acceptance by depth" in proc.stderr
    elif speculation:  # the size depends on this machine's timings: the root alone (plain decoding) is possible
        assert "predicted for this machine" in proc.stderr


@pytest.mark.slow
def test_generate_at_tp2_with_a_draft_chain(trained_checkpoints, expected_text):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    argv = _common(trained_checkpoints) + ["--tp", "2", "--draft-load", trained_checkpoints[1], "--speculate", "chain"]
    proc = _run(argv, launcher=(torchrun, "--standalone", "--nproc_per_node", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == expected_text + "\n"
    assert "chain of 4 draft tokens" in proc.stderr


@pytest.mark.parametrize("extra,message", [
    (["--draft-load", "DRAFT", "--acceptance", "0.9,0.5"], "--acceptance '0.9,0.5' must be comma-separated rates"),
    (["--max-new-tokens", "500"], "plus max_new_tokens 500 exceed the model's 96 positions"),
    (["--tp", "2"], "1 ranks for --tp 2: launch --tp ranks (torchrun --nproc_per_node 2)"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "--vocab-file"),
])
def test_generate_rejects_bad_options(trained_checkpoints, extra, message):
    argv = _common(trained_checkpoints) + [trained_checkpoints[1] if a == "DRAFT" else a for a in extra]
    proc = _run(argv)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.startswith("generate.py: error:"), proc.stderr


def test_generate_from_a_hugging_face_export(trained_pair, expected_text, tmp_path):
    import torch

    from megatronish.model import TransformerConfig
    from megatronish.model.hf_gpt2 import save_hf_gpt2

    save_hf_gpt2(tmp_path, TransformerConfig(**TARGET), {k: torch.from_numpy(v) for k, v in trained_pair[0].items()})
    proc = _run(["--hf-model", str(tmp_path), "--tokenizer-type", "ByteTokenizer", "--prompt", PROMPT,
                 "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text + "\n"
