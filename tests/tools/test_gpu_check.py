"""tools/gpu_check.py --dry-run: the GPU check's Python runs end to end on CPU and writes its report.

(The model step is left out here to keep the test short; `python tools/gpu_check.py --dry-run` runs it.)
"""

import json

from megatronish.testing import load_tool



def _load_tool():
    return load_tool("gpu_check")


def test_dry_run_checks_every_op_and_writes_the_report(tmp_path, capsys):
    gpu_check = _load_tool()
    assert gpu_check.main(["--dry-run", "--no-model", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checked = {row["op"] for row in report["checks"]}
    assert checked == {case.name for case in gpu_check.CASES if case.check_shapes}
    assert {row["dtype"] for row in report["checks"]} == {"float32", "float16", "bfloat16"}
    assert report["dropout_mask"]["passed"]
    assert all("kernel_fwd_ms" in row and "eager_fwd_ms" in row for row in report["timings"])
    assert "## Timing" in (tmp_path / "gpu_check.md").read_text()
    assert "correctness:" in capsys.readouterr().out


def test_max_error_flags_nan_and_scales_by_the_reference():
    gpu_check = _load_tool()
    import torch

    assert gpu_check._max_error(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])) == float("inf")
    assert abs(gpu_check._max_error(torch.tensor([10.0, 1.1]), torch.tensor([10.0, 1.0])) - 0.01) < 1e-6
    assert gpu_check._max_error(torch.tensor([float("-inf")]), torch.tensor([float("-inf")])) == 0.0
