"""Finding the implementation a tensor should use: the CUDA extension built from kernels/, apex, or PyTorch.

The extension is compiled with torch.utils.cpp_extension (ninja) the first time a CUDA tensor reaches
an op (or at `initialize_kernels()`), into a cache folder keyed by torch version, CUDA version, GPU
architecture and a hash of the sources, under a file lock so that the ranks of one node build it once.
In one process a failed build is reported by one warning and every op falls back to PyTorch.

In a job of several ranks the fallback must not be per rank: a rank on the PyTorch path draws other
dropout masks than its peers on the kernel path, and replicated activations would silently differ
across TP ranks. So a distributed job calls `initialize_kernels()` on every rank before its first op
(pretrain does): the ranks agree, and if the extension is missing on any of them none uses it. A job
that skipped that step and whose build fails on a rank stops with an error instead of falling back.
"""

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from megatronish.cache import cache_root, file_lock

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
EXTENSION_NAME = "megatronish_kernels"
ENV_SWITCH = "MEGATRONISH_KERNELS"  # "0" forces the PyTorch paths
ENV_CACHE = "MEGATRONISH_KERNEL_CACHE"  # overrides the build cache folder
TORCH_BUILD_LOCK = "lock"  # the file torch.utils.cpp_extension creates in the build folder while it builds

_enabled = os.environ.get(ENV_SWITCH, "1") != "0"
_build_tried = False
_module = None
_failure = None  # why the extension is not available, once a build was tried (one line)
_failure_detail = None  # the same with the whole compiler output
_agreed = False  # initialize_kernels() made every rank of the job take the same path


def set_kernels_enabled(enabled: bool) -> None:
    """Turn the CUDA kernels (and apex) on or off for this process; off means every op runs its PyTorch path."""
    global _enabled
    _enabled = bool(enabled)


def kernels_enabled() -> bool:
    return _enabled


def cuda_module_for(tensor: torch.Tensor):
    """The loaded extension if `tensor` should take the CUDA path, else None (CPU, switched off, build failed)."""
    if not (tensor.is_cuda and _enabled):
        return None
    return load()


def load():
    """Build (once per process, once per node and source version) and import the extension; None on failure."""
    if not _build_tried:
        _try_build()
        if _module is None and not (_in_distributed_job() and not _agreed):
            _warn_fallback(_failure)
    if _module is None and _in_distributed_job() and not _agreed:
        raise RuntimeError(
            f"megatronish.ops: the CUDA kernels failed to build on rank {dist.get_rank()} ({_failure}), and other "
            "ranks may be using them: their dropout masks would differ from this rank's. Call "
            f"megatronish.ops.initialize_kernels() on every rank before the first op, or set {ENV_SWITCH}=0")
    return _module


def _try_build() -> None:
    global _build_tried, _module, _failure, _failure_detail
    _build_tried = True
    try:
        _module = _build()
    except Exception as error:  # a broken build must never break training: the caller falls back
        _failure, _failure_detail = _summarize(error), f"{type(error).__name__}: {error}"


def initialize_kernels() -> str:
    """Build the extension where this rank would use it and make every rank of the job take the same path.

    A collective over the world group: call it on every rank, after torch.distributed is initialized
    and before the first op (in one process it just builds). If the kernels are unusable on some ranks
    (no GPU, switched off, build failed), every rank switches them off and warns, naming those ranks
    and why. Returns what the ops will run, in words.
    """
    global _agreed, _enabled, _module, _failure
    if torch.cuda.is_available() and _enabled and not _build_tried:
        _try_build()
    usable = torch.cuda.is_available() and _enabled and _module is not None
    why_not = None if usable else (_failure or ("switched off" if not _enabled else "no CUDA device"))
    if _in_distributed_job():
        reasons = [None] * dist.get_world_size()
        dist.all_gather_object(reasons, why_not)
        missing = {rank: why for rank, why in enumerate(reasons) if why is not None}
        if missing and len(missing) < len(reasons):  # usable on some ranks only: used on none
            listed = "; ".join(f"rank {rank}: {why}" for rank, why in missing.items())
            why_not = f"unusable on {len(missing)} of {len(reasons)} ranks ({listed}), so off on every rank"
            _enabled, _module, _failure, usable = False, None, why_not, False
        _agreed = True
    if usable:
        return "fused CUDA kernels (kernels/)"
    if _failure is not None:
        _warn_fallback(_failure)
    return f"PyTorch paths ({why_not})"


def _in_distributed_job() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _warn_fallback(why: str) -> None:
    warnings.warn(
        f"megatronish.ops: the CUDA kernels are not available ({why}); every op falls back to its PyTorch "
        f"path. Set {ENV_SWITCH}=0 to choose that explicitly.",
        RuntimeWarning,
        stacklevel=3,
    )


def build_failure(full: bool = False):
    """Why the extension could not be built (full=True: with the whole compiler output), or None if it
    was built or not tried yet."""
    return _failure_detail if full else _failure


def _summarize(error: Exception, max_chars: int = 600) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    summary = " | ".join((errors or lines)[:4])
    return summary if len(summary) <= max_chars else summary[:max_chars] + " ..."


def source_files():
    return sorted(KERNEL_DIR.glob("*.cu")) + sorted(KERNEL_DIR.glob("*.cpp"))


def header_files():
    return sorted(path for pattern in ("*.h", "*.cuh") for path in KERNEL_DIR.glob(pattern))


def build_dir_for(arch: str) -> Path:
    """Cache folder of one build: a different torch, CUDA, GPU architecture, source or header gets its own."""
    digest = hashlib.sha256()
    for path in source_files() + header_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    root = os.environ.get(ENV_CACHE) or cache_root() / "kernels"
    key = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{arch}-{digest.hexdigest()[:12]}"
    return Path(root) / key


def _build():
    from torch.utils import cpp_extension

    if not KERNEL_DIR.is_dir() or not any(KERNEL_DIR.glob("*.cu")):
        raise RuntimeError(f"kernel sources not found in {KERNEL_DIR}; install megatronish from a source checkout")
    if torch.version.cuda is None:
        raise RuntimeError(f"this torch ({torch.__version__}) was built without CUDA")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found; set CUDA_HOME to the toolkit root (the folder holding bin/nvcc)")
    major, minor = torch.cuda.get_device_capability()
    build_dir = build_dir_for(f"{major}{minor}")
    build_dir.mkdir(parents=True, exist_ok=True)
    # The binding includes ATen's CUDA headers, which include cusparse.h / cublas.h; a toolkit without
    # them (a minimal nvcc install) gets them from pip's CUDA wheels, searched after the toolkit's own.
    host_flags = ["-O3"]
    if not (Path(cpp_extension.CUDA_HOME) / "include" / "cusparse.h").exists():
        host_flags += [f"-idirafter{folder}" for folder in _pip_cuda_include_dirs()]
    previous_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # only this GPU's architecture: one pass, less time
    try:
        return build_under_lock(build_dir, lambda: cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(path) for path in source_files()],
            extra_include_paths=[str(KERNEL_DIR)],
            extra_cflags=host_flags,
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(build_dir),
            verbose=os.environ.get("MEGATRONISH_KERNELS_VERBOSE") == "1",
        ))
    finally:
        if previous_arch_list is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous_arch_list


def build_under_lock(build_dir: Path, build):
    """Run `build()` holding the build folder's flock, so that the ranks of a node build once.

    torch's cpp_extension guards a build with a lock *file* of its own (`lock` in the folder) and a
    second builder waits until that file is gone; a build killed half-way leaves it behind and every
    later build would wait forever. Our flock dies with its holder, and while we hold it no other
    build of this folder runs: a `lock` file found here is such a leftover and is removed.
    """
    with file_lock(build_dir / "build.lock"):
        (build_dir / TORCH_BUILD_LOCK).unlink(missing_ok=True)
        return build()


def _pip_cuda_include_dirs():
    """Header folders of pip's CUDA wheels (site-packages/nvidia/*/include) next to this torch."""
    root = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(str(folder) for folder in root.glob("*/include") if folder.is_dir())


# --- apex: used only when it is already installed, and only while the kernels are switched on ---

def apex_installed() -> bool:
    return importlib.util.find_spec("apex") is not None


def apex_norms():
    """apex.normalization.fused_layer_norm if apex is installed (with its CUDA parts) and kernels are on, else None."""
    if not (_enabled and apex_installed()):
        return None
    try:
        from apex.normalization import fused_layer_norm
    except Exception:  # apex installed without its CUDA extensions
        return None
    return fused_layer_norm


def apex_norms_for(tensor: torch.Tensor):
    """apex's fused norms for a CUDA tensor (used where our extension is missing), else None."""
    return apex_norms() if tensor.is_cuda else None


def apex_fused_adam_class():
    """apex.optimizers.FusedAdam if apex is installed with its CUDA extensions and kernels are on, else None."""
    if not (_enabled and apex_installed()):
        return None
    try:
        from apex.optimizers import FusedAdam
    except Exception:
        return None
    return FusedAdam
