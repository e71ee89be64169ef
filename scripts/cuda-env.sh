# Source me: `source scripts/cuda-env.sh`. Sets up what a `--features cuda` build needs on a
# machine without a CUDA toolkit (or a GPU): the CUDA 13.0 compiler, headers and runtime from
# PyPI wheels, in a venv cached under ${XDG_CACHE_HOME:-~/.cache}/rupantor/cuda-venv, then
# exports CUDA_HOME, PATH (nvcc), LIBRARY_PATH (libcudart.so at link time) and LD_LIBRARY_PATH
# (libcudart.so.13 for the binaries and tests it builds).
#
# 13.0.x because nvcc 13.1+ writes PTX a 580 (CUDA 13.0) driver cannot JIT; cccl because nvcc
# includes <nv/target>. Env: PYTHON (interpreter for the venv, default python3).
_rupantor_cuda_env() {
    local py="${PYTHON:-python3}"
    local venv="${XDG_CACHE_HOME:-$HOME/.cache}/rupantor/cuda-venv"
    local wheels=(
        "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88"
        "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85"
    )
    if [ ! -x "$venv/bin/python" ]; then
        echo "cuda-env: creating $venv" >&2
        mkdir -p "$(dirname "$venv")" && "$py" -m venv "$venv" || return 1
    fi
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[@]}"; then
        echo "cuda-env: could not install ${wheels[*]}" >&2
        return 1
    fi
    local home
    home="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')" || return 1
    if [ ! -x "$home/bin/nvcc" ] || [ ! -f "$home/lib/libcudart.so.13" ]; then
        echo "cuda-env: no nvcc or libcudart.so.13 under $home" >&2
        return 1
    fi
    # candle-kernels links `-lcudart`; the wheel ships only the versioned name.
    ln -sf libcudart.so.13 "$home/lib/libcudart.so"
    export CUDA_HOME="$home"
    export PATH="$home/bin:$PATH"
    export LIBRARY_PATH="$home/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
    export LD_LIBRARY_PATH="$home/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "cuda-env: nvcc $("$home/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') in $home" >&2
}
_rupantor_cuda_env
