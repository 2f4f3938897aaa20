"""`torchrun --nproc_per_node 8 pretrain_gpt.py --tp 8` on CPU: the real entry point, 8 gloo ranks,
the demo path (default corpus, byte tokens) with a tiny model and a few iterations."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_8_ranks_tp8_trains_evaluates_saves_and_samples(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRONISH_CACHE=str(tmp_path / "cache"))
    argv = [torchrun, "--standalone", "--nproc_per_node", "8", str(REPO / "pretrain_gpt.py"), "--tp", "8",
            "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "8", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--log-interval", "2",
            "--eval-interval", "4", "--eval-iters", "1", "--save", str(tmp_path / "ckpt"), "--sample-tokens", "8"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    lines = re.findall(r"^ iteration +(\d+)/ +4 \| consumed samples: +(\d+) \|.* lm loss: (\S+) \|.*"
                       r"tokens per second: \S+ \|$", out, flags=re.M)
    assert [(int(i), int(c)) for i, c, _ in lines] == [(2, 8), (4, 16)]
    assert " validation loss at iteration 4 | lm loss value: " in out
    assert "generated sample (8 tokens after the prompt 'def ')" in out
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert len(list((tmp_path / "ckpt" / "iter_0000004").glob("*.distcp"))) == 8  # one DCP data file per rank
