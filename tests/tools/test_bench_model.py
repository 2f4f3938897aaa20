"""tools/bench_model.py runs end to end on a tiny shape and rejects settings it cannot report on."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "bench_model.py"
TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--seq", "8", "--batch", "2",
        "--rounds", "2", "--steps", "1", "--warmup", "1"]


def _run(*args):
    # its own process: the benchmark starts torch.distributed and changes process-wide settings
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_tiny_run_times_all_three_and_reports_the_ratios():
    result = _run(*TINY)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(same weights)" in out  # the two models computed the same initial loss
    for clock in ("wall", "cpu"):
        for name in ("baseline", "megatronish", "train_step"):
            assert f"{clock:4s} {name:20s}" in out
        for name in ("megatronish", "train_step"):
            assert f"{clock:4s} speed {name} / baseline: " in out
    assert "compiled" not in out


@pytest.mark.slow
def test_torch_compile_adds_both_compiled_models_and_their_ratios():
    result = _run(*TINY, "--torch-compile")
    assert result.returncode == 0, result.stderr
    for pair in ("baseline_compiled / baseline", "megatronish_compiled / baseline",
                 "megatronish_compiled / baseline_compiled", "megatronish_compiled / megatronish"):
        assert f"wall speed {pair}: " in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--rounds", "1"], "--rounds 1 / --steps 3: need at least 2 rounds"),
    (["--threads", "-2"], "--threads -2: give a thread count >= 1, or 0 for every core"),
])
def test_bad_settings_fail_before_any_timing(args, message):
    result = _run(*args)
    assert result.returncode == 2 and message in result.stderr
