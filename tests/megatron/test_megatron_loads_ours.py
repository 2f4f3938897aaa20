"""Real megatron-core 0.19.2 loads the torch_dist checkpoints megatronish writes and computes megatronish's logits.

Runs tests/megatron/megatron_loads_ours.py (its docstring says what it checks) in the Python that
$MEGATRONISH_MEGATRON_PYTHON names (the megatron_python fixture of tests/conftest.py says how to make one).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "megatron_loads_ours.py"
TOLERANCE = 1e-5  # fp32 logits; measured ~3e-7


@pytest.mark.slow
def test_megatron_core_loads_our_torch_dist_checkpoints_with_our_logits(megatron_python):
    done = subprocess.run([megatron_python, str(SCRIPT), "--megatronish-python", sys.executable,
                           "--tolerance", str(TOLERANCE)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["results"]) == 4 and not summary["failures"]  # 2 models x (training save, converter)
    for result in summary["results"].values():
        assert result["max_abs_logit_difference"] <= TOLERANCE
        assert (result["iteration"], result["consumed_train_samples"], result["padded_vocab_size"]) == (3, 12, 768)
