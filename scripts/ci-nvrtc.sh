#!/usr/bin/env bash
# Compile every kernels/*.cu with NVRTC on a CPU-only machine (no GPU, no CUDA toolkit):
# installs the PyPI wheels that carry libnvrtc and the CUDA headers into a cached venv, points
# the loader and the compiler at them, and runs the compile test, which must not skip here.
#
#   scripts/ci-nvrtc.sh            # extra arguments go to the test binary, e.g. --nocapture
#
# Env: PYTHON (interpreter for the venv, default python3), XDG_CACHE_HOME.
set -euo pipefail

NVRTC_WHEEL="nvidia-cuda-nvrtc-cu12==12.9.86"
RUNTIME_WHEEL="nvidia-cuda-runtime-cu12==12.9.79"

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/rupantor/nvrtc-venv"

if [ ! -x "$VENV/bin/python" ]; then
    echo "ci-nvrtc: creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$NVRTC_WHEEL" "$RUNTIME_WHEEL"

NVIDIA_DIR="$("$VENV/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')"
NVRTC_LIB_DIR="$NVIDIA_DIR/cuda_nvrtc/lib"
export CUDA_INCLUDE_DIR="$NVIDIA_DIR/cuda_runtime/include"
[ -f "$CUDA_INCLUDE_DIR/cuda_bf16.h" ] || { echo "ci-nvrtc: no cuda_bf16.h in $CUDA_INCLUDE_DIR" >&2; exit 1; }

# cudarc dlopens libnvrtc by soname (libnvrtc.so, libnvrtc.so.12, ...). The wheel ships
# libnvrtc.so.12; should a release ship only a longer name, link the soname cudarc looks for.
LIB_PATH="$NVRTC_LIB_DIR"
if [ ! -e "$NVRTC_LIB_DIR/libnvrtc.so.12" ] && [ ! -e "$NVRTC_LIB_DIR/libnvrtc.so" ]; then
    real="$(find "$NVRTC_LIB_DIR" -maxdepth 1 -name 'libnvrtc.so.12*' ! -name '*builtins*' ! -name '*.alt.*' | sort | head -n1)"
    [ -n "$real" ] || { echo "ci-nvrtc: no libnvrtc.so.12* in $NVRTC_LIB_DIR" >&2; exit 1; }
    LINKS="$VENV/nvrtc-links"
    mkdir -p "$LINKS"
    ln -sf "$real" "$LINKS/libnvrtc.so.12"
    LIB_PATH="$LINKS:$NVRTC_LIB_DIR"
fi
export LD_LIBRARY_PATH="$LIB_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A missing libnvrtc is a failure here, not a skip.
export RUPANTOR_REQUIRE_NVRTC=1

echo "ci-nvrtc: libnvrtc from $NVRTC_LIB_DIR, headers from $CUDA_INCLUDE_DIR"
exec cargo test -p rupantor-quant --features cuda --test nvrtc_compile -- "$@"
