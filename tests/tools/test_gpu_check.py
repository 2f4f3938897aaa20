"""tools/gpu_check.py --dry-run: the GPU check's Python runs on CPU, section by section, and reports.

A few ops keep the runs short (`python tools/gpu_check.py --dry-run` runs them all, the model step and,
with --pretrain-iters, pretrain_gpt.py: about 5 minutes on 2 busy cores).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatronish.testing import load_tool

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.py"


def _load_tool():
    return load_tool("gpu_check")


def _report(folder: Path) -> dict:
    return json.loads((folder / "gpu_check.json").read_text())


def test_dry_run_checks_and_times_each_op_with_its_own_compiled_graph(tmp_path):
    gpu_check = _load_tool()
    assert gpu_check.main(["--dry-run", "--no-model", "--only", "layer_norm,bias_dropout_add", "--out-dir", str(tmp_path)]) == 0
    report = _report(tmp_path)
    assert {row["op"] for row in report["checks"]["rows"]} == {"layer_norm", "layer_norm[fp32 weights]", "bias_dropout_add[p=0]"}
    assert {row["dtype"] for row in report["checks"]["rows"]} == {"float32", "float16", "bfloat16"}
    assert report["checks"]["dropout_mask"]["passed"]
    rows = report["ops"]["rows"]
    assert [(row["op"], row["dtype"]) for row in rows] == [
        ("layer_norm", "bfloat16"), ("layer_norm", "float32"), ("layer_norm[fp32 weights]", "bfloat16"),
        ("bias_dropout_add[p=0.1]", "bfloat16")]
    for row in rows:
        for label in ("kernel", "pytorch", "reference", "compile"):
            assert row[f"{label}_fwd_ms"] > 0 and row[f"{label}_fwd_bwd_ms"] > 0, (row["op"], label)
        # each op got its own graph, compiled once and reused for every input set: no recompile, no
        # fall-back to eager after Dynamo's recompile limit
        assert row["compile_graphs"] == 1, row
        assert row["input_sets"] >= 2
    assert report["errors"] == {}
    assert "| layer_norm | 64x32 | bfloat16 |" in (tmp_path / "gpu_check.md").read_text()


def test_a_failing_section_is_recorded_and_the_next_ones_still_run(tmp_path, monkeypatch):
    gpu_check = _load_tool()

    def broken(*args):
        raise RuntimeError("no copy today")

    monkeypatch.setattr(gpu_check, "copy_bandwidth_gbs", broken)
    code = gpu_check.main(["--dry-run", "--no-model", "--no-compile", "--only", "bias_gelu", "--out-dir", str(tmp_path)])
    report = _report(tmp_path)
    assert code == 1 and "no copy today" in report["errors"]["bandwidth"]
    assert report["checks"]["rows"] and report["ops"]["rows"][0]["kernel_fwd_ms"] > 0  # before and after it
    assert "Section bandwidth failed" in (tmp_path / "gpu_check.md").read_text()


def test_the_deadline_skips_what_would_not_fit_and_out_defaults_to_the_device_output_folder(tmp_path):
    """With 60 s left the eager training steps run (they fit) and the compiled one is skipped; the results
    go to $OUT, the folder the GPU machine's output carries back."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(SCRIPT.parents[1])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--no-checks", "--no-timing", "--budget-s", "60"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = {v["variant"]: v for v in _report(tmp_path)["model"]["variants"]}
    assert variants["kernels off"]["tokens_per_s"] > 0 and variants["kernels on"]["tokens_per_s"] > 0
    assert "lm loss" in variants["kernels on"]["log_line"]
    assert "not enough time left" in variants["torch.compile"]["skipped"]


def test_max_error_flags_nan_and_scales_by_the_reference():
    gpu_check = _load_tool()
    assert gpu_check._max_error(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])) == float("inf")
    assert abs(gpu_check._max_error(torch.tensor([10.0, 1.1]), torch.tensor([10.0, 1.0])) - 0.01) < 1e-6
    assert gpu_check._max_error(torch.tensor([float("-inf")]), torch.tensor([float("-inf")])) == 0.0
