#!/usr/bin/env bash
# Compile every kernels/*.cu for sm_90 with nvcc and fail on any error; needs no GPU and no torch. Then
# build and run tests/kernels/host_checks.cu (helpers checked on the CPU).
# The .cu files include only CUDA headers, so this catches every kernel/launcher compile error; the
# binding (binding.cpp) needs a CUDA build of torch and is compiled by the real build only, or here
# when BINDING_PYTHON names a python whose torch is a CUDA build (syntax check, no link).
#
#   kernels/check_compile.sh                       # CI: all .cu files, in parallel
#   BINDING_PYTHON=/path/to/python kernels/check_compile.sh   # also binding.cpp
set -euo pipefail

KERNELS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NVCC="${NVCC:-/usr/local/bin/nvcc}"
ARCH="${ARCH:-sm_90}"
JOBS="${JOBS:-$(nproc)}"
OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT

if [[ ! -x "$NVCC" ]]; then
  echo "check_compile: nvcc not found at $NVCC (set NVCC=...)" >&2
  exit 1
fi

compile_one() {
  local source="$1"
  local name
  name="$(basename "$source" .cu)"
  # The flags torch.utils.cpp_extension passes to nvcc in the real build (no implicit half/bf16 conversions).
  if "$NVCC" -c -arch="$ARCH" -std=c++20 -O3 -I"$KERNELS_DIR" --expt-relaxed-constexpr \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ "$source" -o "$OUT_DIR/$name.o" >"$OUT_DIR/$name.log" 2>&1; then
    echo "ok      $name.cu"
  else
    echo "FAILED  $name.cu"
    cat "$OUT_DIR/$name.log"
    return 1
  fi
}
export -f compile_one
export NVCC ARCH KERNELS_DIR OUT_DIR

status=0
find "$KERNELS_DIR" -maxdepth 1 -name '*.cu' -print0 | sort -z \
  | xargs -0 -n 1 -P "$JOBS" bash -c 'compile_one "$0"' || status=1

# Host-side checks of the launch helpers and the cross-entropy accumulation (tests/kernels): built like a
# kernel, run on the CPU; the timeout turns a helper that never returns into a failure.
HOST_CHECKS="$KERNELS_DIR/../tests/kernels/host_checks.cu"
if [[ -f "$HOST_CHECKS" ]]; then
  if "$NVCC" -arch="$ARCH" -std=c++20 -O2 -I"$KERNELS_DIR" --expt-relaxed-constexpr \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ "$HOST_CHECKS" -o "$OUT_DIR/host_checks" >"$OUT_DIR/host_checks.log" 2>&1 \
      && timeout 60 "$OUT_DIR/host_checks" >>"$OUT_DIR/host_checks.log" 2>&1; then
    echo "ok      host checks (tests/kernels/host_checks.cu)"
  else
    echo "FAILED  host checks (tests/kernels/host_checks.cu)"
    cat "$OUT_DIR/host_checks.log"
    status=1
  fi
fi

if [[ -n "${BINDING_PYTHON:-}" ]]; then
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  includes="$("$BINDING_PYTHON" - 2>/dev/null <<'PY'
import os, sysconfig
import torch
from torch.utils import cpp_extension
# The toolkit's own headers first: pip's nvidia/cu13/include lacks some (crt/host_defines.h).
paths = [os.path.join(os.environ["CUDA_HOME"], "include")]
paths += cpp_extension.include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]
# pip's CUDA torch ships some CUDA headers (cusparse.h, ...) in site-packages/nvidia/*/include.
nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
for root, dirs, _ in os.walk(nvidia):
    if os.path.basename(root) == "include":
        paths.append(root)
        dirs.clear()
print(" ".join("-I" + p for p in paths))
PY
)"
  # shellcheck disable=SC2086
  if g++ -std=c++20 -fsyntax-only -DTORCH_EXTENSION_NAME=megatronish_kernels -DTORCH_API_INCLUDE_EXTENSION_H \
      $includes -I"$KERNELS_DIR" "$KERNELS_DIR/binding.cpp" >"$OUT_DIR/binding.log" 2>&1; then
    echo "ok      binding.cpp (syntax, against $("$BINDING_PYTHON" -c 'import torch; print(torch.__version__)'))"
  else
    echo "FAILED  binding.cpp"
    cat "$OUT_DIR/binding.log"
    status=1
  fi
fi

exit $status
