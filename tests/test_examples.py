"""The README's example runs as written under torchrun and matches the dense model."""

import os
import subprocess
import sys
from pathlib import Path

from megatronish.testing import find_free_port

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tp_mlp_example_matches_dense_model_at_4_ranks():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
           str(find_free_port()), str(ROOT / "examples" / "tp_mlp.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("TP=4"))
    out_diff = float(line.split("max |output - dense| = ")[1].split(",")[0])
    assert out_diff < 1e-5
