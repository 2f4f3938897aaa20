"""Real megatron-core 0.19.2 loads the torch_dist checkpoints megatronish writes and computes megatronish's logits.

Runs tests/megatron/megatron_loads_ours.py (its docstring says what it checks) in the Python that
$MEGATRONISH_MEGATRON_PYTHON names. megatron-core 0.19.2's wheel is for Python 3.12 only and needs a CUDA build of
torch (several GB with its nvidia-* libraries, though it runs on CPU here), so CI does not install it; SETUP says how.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "megatron_loads_ours.py"
TOLERANCE = 1e-5  # fp32 logits; measured ~3e-7
SETUP = ("set MEGATRONISH_MEGATRON_PYTHON to a Python >= 3.12 with megatron-core 0.19.2, e.g.: "
         "python3.12 -m venv /tmp/venv-mcore312 && /tmp/venv-mcore312/bin/pip install torch==2.13.0 && "
         "/tmp/venv-mcore312/bin/pip install --no-deps megatron-core==0.19.2 && /tmp/venv-mcore312/bin/pip install "
         "numpy packaging einops tokenizers sentencepiece psutil && "
         "export MEGATRONISH_MEGATRON_PYTHON=/tmp/venv-mcore312/bin/python")


def _megatron_python() -> str:
    python = os.environ.get("MEGATRONISH_MEGATRON_PYTHON")
    if not python:
        pytest.skip(f"needs megatron-core 0.19.2: {SETUP}")
    found = subprocess.run([python, "-W", "ignore", "-c", "import megatron.core; print(megatron.core.__version__)"],
                           capture_output=True, text=True)
    if found.returncode or found.stdout.strip().splitlines()[-1:] != ["0.19.2"]:
        pytest.fail(f"MEGATRONISH_MEGATRON_PYTHON={python} has no megatron-core 0.19.2 "
                    f"({(found.stdout + found.stderr).strip()[-500:]}): {SETUP}")
    return python


@pytest.mark.slow
def test_megatron_core_loads_our_torch_dist_checkpoints_with_our_logits():
    done = subprocess.run([_megatron_python(), str(SCRIPT), "--megatronish-python", sys.executable,
                           "--tolerance", str(TOLERANCE)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["results"]) == 4 and not summary["failures"]  # 2 models x (training save, converter)
    for result in summary["results"].values():
        assert result["max_abs_logit_difference"] <= TOLERANCE
        assert (result["iteration"], result["consumed_train_samples"], result["padded_vocab_size"]) == (3, 12, 768)
