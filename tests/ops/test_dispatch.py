"""Path choice, the kernel switch, the one-warning fallback, the build cache key and input checks."""

import importlib
import os
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatronish import ops
from megatronish.ops import extension


@pytest.fixture
def fresh_extension_state(monkeypatch):
    """Forget any build attempt for the duration of a test."""
    monkeypatch.setattr(extension, "_build_tried", False)
    monkeypatch.setattr(extension, "_module", None)
    monkeypatch.setattr(extension, "_failure", None)
    monkeypatch.setattr(extension, "_failure_detail", None)
    monkeypatch.setattr(extension, "_enabled", True)
    monkeypatch.setattr(extension, "_agreed", False)


def test_cpu_tensors_take_the_pytorch_path_without_building_or_warning(fresh_extension_state, monkeypatch):
    monkeypatch.setattr(extension, "_build", lambda: pytest.fail("a CPU tensor must not trigger a build"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.layer_norm(torch.randn(2, 3), torch.ones(3), None, 1e-5)
        ops.scaled_causal_softmax(torch.randn(1, 1, 2, 2), 1.0)


def test_failed_build_warns_once_and_falls_back(fresh_extension_state, monkeypatch):
    def broken_build():
        raise RuntimeError("Error building extension 'megatronish_kernels':\nsoftmax.cu(3): error: expected a ';'")

    monkeypatch.setattr(extension, "_build", broken_build)
    with pytest.warns(RuntimeWarning, match="expected a ';'") as caught:
        assert extension.load() is None
        assert extension.load() is None
    assert len(caught) == 1
    assert "softmax.cu" in extension.build_failure()
    assert "Error building extension" in extension.build_failure(full=True)


def test_switch_off_means_no_extension(fresh_extension_state, monkeypatch):
    monkeypatch.setattr(extension, "_build", lambda: pytest.fail("switched off: nothing may be built"))

    class FakeCudaTensor:
        is_cuda = True

    ops.set_kernels_enabled(False)
    assert not ops.kernels_enabled()
    assert extension.cuda_module_for(FakeCudaTensor()) is None


def test_apex_norms_serve_when_our_extension_is_missing(monkeypatch):
    calls = []

    class FakeApexNorms:
        @staticmethod
        def fused_layer_norm_affine(x, weight, bias, shape, eps):
            calls.append("layer_norm")
            return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)

        @staticmethod
        def fused_rms_norm_affine(x, weight, shape, eps):
            calls.append("rms_norm")
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    monkeypatch.setattr(extension, "cuda_module_for", lambda tensor: None)
    monkeypatch.setattr(extension, "apex_norms_for", lambda tensor: FakeApexNorms)
    x = torch.randn(3, 8)
    ops.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)
    ops.rms_norm(x, torch.ones(8), 1e-5)
    ops.layer_norm(x.bfloat16(), torch.ones(8), torch.zeros(8), 1e-5)  # fp32 weights, bf16 input: not apex's case
    assert calls == ["layer_norm", "rms_norm"]


def test_environment_variable_switches_kernels_off(monkeypatch):
    monkeypatch.setenv("MEGATRONISH_KERNELS", "0")
    try:
        importlib.reload(extension)  # the switch is read at import
        assert not extension.kernels_enabled() and not ops.kernels_enabled()
    finally:
        monkeypatch.delenv("MEGATRONISH_KERNELS")
        importlib.reload(extension)
    assert extension.kernels_enabled()


def test_kernel_status_names_every_op_and_a_reason():
    status = ops.kernel_status()
    for op in ("scaled_causal_softmax", "layer_norm", "bias_dropout_add", "cross_entropy_backward_", "fused_adam"):
        assert status[op]
    if not torch.cuda.is_available():
        assert status["layer_norm"].startswith("pytorch (no CUDA device")


def test_python_dash_m_prints_the_status(capsys):
    runpy.run_module("megatronish.ops", run_name="__main__")
    out = capsys.readouterr().out
    assert "apply_rotary_pos_emb" in out and "kernels enabled" in out


def test_build_cache_key_names_torch_cuda_arch_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path))
    folder = extension.build_dir_for("90")
    assert folder.parent == tmp_path
    assert f"torch{torch.__version__}" in folder.name and "sm90" in folder.name and f"cuda{torch.version.cuda}" in folder.name
    assert extension.build_dir_for("80") != folder


def test_build_cache_key_covers_every_source_and_header(monkeypatch, tmp_path):
    kernels = tmp_path / "kernels"
    shutil.copytree(extension.KERNEL_DIR, kernels)
    monkeypatch.setattr(extension, "KERNEL_DIR", kernels)
    monkeypatch.setenv(extension.ENV_CACHE, str(tmp_path / "cache"))
    seen = {extension.build_dir_for("90")}
    for name in ("common.cuh", "ops.h", "softmax.cu", "binding.cpp"):
        with open(kernels / name, "a") as f:
            f.write("\n// changed\n")
        seen.add(extension.build_dir_for("90"))
    assert len(seen) == 5, "a change to any kernel source or header must give a new build folder"


# A build that takes torch's lock file as cpp_extension.load does (torch.utils.file_baton.FileBaton),
# run in a child process under build_under_lock: "hold" stops inside the build, "build" finishes.
_BUILD_CHILD = """
import sys, time
from pathlib import Path
from torch.utils.file_baton import FileBaton
from megatronish.ops import extension

build_dir, mode = Path(sys.argv[1]), sys.argv[2]

def torch_like_build():
    baton = FileBaton(str(build_dir / extension.TORCH_BUILD_LOCK))
    if not baton.try_acquire():
        baton.wait()  # what torch does when another build holds the lock file: wait until it is gone
        return "waited"
    if mode == "hold":
        print("building", flush=True)
        time.sleep(600)  # killed here, half-way
    baton.release()
    return "built"

print(extension.build_under_lock(build_dir, torch_like_build), flush=True)
"""


def test_a_build_killed_half_way_does_not_block_the_next(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-c", _BUILD_CHILD, str(tmp_path)]
    killed = subprocess.Popen(command + ["hold"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert killed.stdout.readline().strip() == "building"
        assert (tmp_path / extension.TORCH_BUILD_LOCK).exists()
    finally:
        killed.kill()
        killed.wait()
    after = subprocess.run(command + ["build"], capture_output=True, text=True, env=env, timeout=60)
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == "built"
    assert not (tmp_path / extension.TORCH_BUILD_LOCK).exists()


def test_kernel_sources_are_where_the_build_looks():
    names = {path.name for path in extension.source_files()}
    assert "binding.cpp" in names and any(name.endswith(".cu") for name in names)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.scaled_causal_softmax(torch.randn(1, 1, 2, 3), 1.0), "sq == sk"),
        (lambda: ops.scaled_masked_softmax(torch.randn(1, 1, 2, 3), torch.zeros(2, 3), 1.0), "bool"),
        (lambda: ops.scaled_masked_softmax(torch.randn(1, 1, 2, 3), torch.zeros(4, 3, dtype=torch.bool), 1.0), "does not broadcast"),
        (lambda: ops.layer_norm(torch.randn(2, 4), torch.ones(5), None, 1e-5), r"weight must have shape \[4\]"),
        (lambda: ops.rms_norm(torch.randint(0, 3, (2, 4)), torch.ones(4), 1e-5), "floating-point"),
        (lambda: ops.bias_swiglu(torch.randn(2, 5), None), "even last dim"),
        (lambda: ops.bias_dropout_add(torch.randn(2, 4), None, torch.randn(2, 4), 1.5, True), r"prob must be in \[0, 1\]"),
        (lambda: ops.bias_dropout_add(torch.randn(2, 4), None, torch.randn(3, 4), 0.1, True), "residual shape"),
        (lambda: ops.apply_rotary_pos_emb(torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4), torch.ones(4, 2), torch.ones(4, 2)), "cos must be"),
        (lambda: ops.apply_rotary_pos_emb(torch.randn(3, 1, 1, 5), torch.randn(3, 1, 1, 5), torch.ones(3, 2), torch.ones(3, 2)), "even"),
        (lambda: ops.cross_entropy_stats(torch.randn(3, 4), torch.zeros(3, dtype=torch.int32), 0, 4), "int64"),
        (lambda: ops.cross_entropy_stats(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), 0, 0), "vocab_size"),
        (lambda: ops.cross_entropy_backward_(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), 0, 4, torch.zeros(3), torch.zeros(2), 0.0), "grad_loss must be torch.float32"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
