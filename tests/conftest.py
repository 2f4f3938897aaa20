import os
import subprocess

import pytest

# A hub lookup stalls 20+ s before failing on a machine without network; tests never download.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MEGATRON_SETUP = (
    "set MEGATRONISH_MEGATRON_PYTHON to a Python >= 3.12 with megatron-core 0.19.2, e.g.: "
    "python3.12 -m venv /tmp/venv-mcore312 && /tmp/venv-mcore312/bin/pip install torch==2.13.0 && "
    "/tmp/venv-mcore312/bin/pip install --no-deps megatron-core==0.19.2 && /tmp/venv-mcore312/bin/pip install "
    "numpy packaging einops tokenizers sentencepiece psutil tiktoken && "
    "export MEGATRONISH_MEGATRON_PYTHON=/tmp/venv-mcore312/bin/python")


@pytest.fixture(scope="session")
def megatron_python() -> str:
    """The Python that $MEGATRONISH_MEGATRON_PYTHON names, checked to have megatron-core 0.19.2; the tests that
    compare with Megatron's own code skip without it. megatron-core 0.19.2's wheel is for Python 3.12 only and
    needs a CUDA build of torch (several GB with its nvidia-* libraries, though it runs on CPU here), so CI does
    not install it; MEGATRON_SETUP says how."""
    python = os.environ.get("MEGATRONISH_MEGATRON_PYTHON")
    if not python:
        pytest.skip(f"needs megatron-core 0.19.2: {MEGATRON_SETUP}")
    found = subprocess.run([python, "-W", "ignore", "-c", "import megatron.core; print(megatron.core.__version__)"],
                           capture_output=True, text=True)
    if found.returncode or found.stdout.strip().splitlines()[-1:] != ["0.19.2"]:
        pytest.fail(f"MEGATRONISH_MEGATRON_PYTHON={python} has no megatron-core 0.19.2 "
                    f"({(found.stdout + found.stderr).strip()[-500:]}): {MEGATRON_SETUP}")
    return python
