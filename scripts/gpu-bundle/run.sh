#!/usr/bin/env bash
# The GPU bundle's driver (scripts/gpu-bundle.sh copies it into the bundle as run.sh):
#
#   bash BUNDLE/run.sh [OUTDIR]        # OUTDIR: $1, else $OUT, else ./gpu-report
#
# On a host with the NVIDIA driver and python3 (whose site-packages hold the pip CUDA libraries
# torch brings: cuBLAS, cuRAND), with no Rust toolchain, network or root: unpacks the binaries
# into a temporary folder, then runs each step below with a time limit, its output in a log of
# its own, and goes on when a step fails. The steps share one budget
# ($RUPANTOR_BUNDLE_BUDGET_S, default 465 s, under 8 minutes with unpacking and the report):
# each step's limit is cut to what is left, and a step that would start with under 10 s left
# is recorded as skipped. The order is by importance: the GPU tests, the kernel benchmark, the
# 9B-shaped train step and decode, the end-to-end smoke run, then the HF baseline.
#
# OUTDIR receives report.md, report.json (report.py) and logs.tar.gz (every step's log, the
# smoke run's files).
#
# RUPANTOR_BUNDLE_SKIP="name ...": steps not to run (recorded as skipped), e.g. a rerun that
# only needs what changed.
#
# RUPANTOR_BUNDLE_DRY=1: check the bundle and list the steps with their commands and limits,
# run nothing on a GPU, and write the report of that (what scripts/gpu-bundle.sh checks).
#
# The GPU tests run with RUPANTOR_REQUIRE_GPU=1 (a missing GPU fails them), each in its crate's
# folder of a copy of the repository's layout (tree/: fixtures/, configs/, data/samples/, and
# crates/<crate>/), with RUPANTOR_FIXTURES naming tree/fixtures and RUPANTOR_BIN the rupantor
# binary (the tests read these in place of their build-time paths).
set -u -o pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-${OUT:-$PWD/gpu-report}}"
dry="${RUPANTOR_BUNDLE_DRY:-0}"
budget="${RUPANTOR_BUNDLE_BUDGET_S:-465}"
start="$(date +%s)"

mkdir -p "$out" || { echo "run.sh: cannot create $out" >&2; exit 1; }
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/rupantor-gpu.XXXXXX")" || exit 1
trap 'rm -rf "$work"' EXIT
logs="$work/logs"
mkdir -p "$logs"
steps="$logs/steps.tsv"
printf 'name\tstatus\tseconds\trc\tlimit_s\tcommand\n' >"$steps"

say() { echo "run.sh: $*" >&2; }

# record NAME STATUS SECONDS RC LIMIT COMMAND
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$steps"
}

# Seconds after the start by which the current group of steps must end (the tests get a
# share of the budget, so a slow test binary cannot starve the benchmarks).
phase_end="$budget"

# step NAME LIMIT_S [--cwd DIR] CMD...: runs CMD under `timeout` with LIMIT_S (or what is
# left of the budget and of the group's share) in DIR, output to logs/NAME.log.
step() {
    local name="$1" limit="$2" cwd="$work"
    shift 2
    if [ "${1:-}" = "--cwd" ]; then
        cwd="$2"
        shift 2
    fi
    local now left
    case " ${RUPANTOR_BUNDLE_SKIP:-} " in
        *" $name "*)
            say "$name: skipped (RUPANTOR_BUNDLE_SKIP)"
            record "$name" skipped 0 - "$limit" "$*"
            return 0
            ;;
    esac
    now="$(date +%s)"
    left=$((phase_end - (now - start)))
    if [ "$left" -lt 10 ]; then
        say "$name: skipped, the time for it (${phase_end}s of the ${budget}s budget) is spent"
        record "$name" skipped 0 - "$limit" "$*"
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then
        limit="$left"
    fi
    if [ "$dry" = 1 ]; then
        printf '%-22s %4ss  (cd %s && %s)\n' "$name" "$limit" "$cwd" "$*"
        record "$name" dry 0 - "$limit" "$*"
        return 0
    fi
    say "$name (limit ${limit}s): $*"
    local t0 rc status
    t0="$(date +%s)"
    (cd "$cwd" && exec timeout -k 10 "$limit" "$@") >"$logs/$name.log" 2>&1
    rc=$?
    case "$rc" in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    local secs=$(($(date +%s) - t0))
    say "$name: $status after ${secs}s (exit $rc)"
    record "$name" "$status" "$secs" "$rc" "$limit" "$*"
}

finish() {
    local rc=0
    python3 "$here/report.py" --logs "$logs" --bundle "$here" --out "$out" || rc=$?
    # Each log's last 2 MB at most, so the archive stays small whatever a step printed.
    local keep="$work/keep"
    mkdir -p "$keep"
    for f in "$logs"/*; do
        [ -f "$f" ] && tail -c 2000000 "$f" >"$keep/$(basename "$f")"
    done
    if [ -d "$work/smoke" ]; then
        for f in run.toml metrics.jsonl dev.jsonl; do
            [ -f "$work/smoke/$f" ] && cp "$work/smoke/$f" "$keep/smoke-$f"
        done
    fi
    tar -czf "$out/logs.tar.gz" -C "$keep" . || rc=$?
    say "report in $out (report.md, report.json, logs.tar.gz); $(($(date +%s) - start))s in all"
    return "$rc"
}

# --- the bundle, unpacked ----------------------------------------------------------------
for f in bin.tar.xz tests.tsv report.py hf_gpu.py lib/libcudart.so.13 tree/fixtures smoke; do
    if [ ! -e "$here/$f" ]; then
        say "the bundle lacks $f; rebuild it with scripts/gpu-bundle.sh"
        exit 1
    fi
done
bin="$work/bin"
mkdir -p "$bin"
# Python's lzma, not the xz tool: python3 is the one thing the host is sure to have.
if ! python3 - "$here/bin.tar.xz" "$bin" "$dry" <<'PY'; then
import sys, tarfile
archive, dest, dry = sys.argv[1:]
with tarfile.open(archive, "r:xz") as t:
    if dry == "1":
        for m in t:  # reading every member checks the whole archive
            t.extractfile(m).read() if m.isfile() else None
    else:
        t.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(dest)
PY
    say "cannot unpack $here/bin.tar.xz"
    exit 1
fi
tree="$work/tree"
cp -r "$here/tree" "$tree"

# --- CUDA libraries: the bundle's libcudart, cuBLAS/cuRAND from python3's pip packages ------
libdirs="$(python3 - <<'PY'
import glob, os, site
roots = list(site.getsitepackages()) + [site.getusersitepackages()]
dirs = []
for root in roots:
    # CUDA 13 wheels put every library in nvidia/cu13/lib; 12.x ones one folder per library.
    for d in [os.path.join(root, "nvidia", "cu13", "lib")] + sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PY
)"
if [ "$dry" != 1 ]; then
    found=""
    IFS=: read -r -a dirs <<<"$libdirs"
    for d in "${dirs[@]}"; do
        if compgen -G "$d/libcublas.so.*" >/dev/null; then
            found="$d"
            break
        fi
    done
    if [ -z "$found" ]; then
        say "cuBLAS not found: no libcublas.so.* under nvidia/*/lib in python3's site-packages ($(command -v python3)); install torch's CUDA wheels (nvidia-cublas) for this python3"
        exit 1
    fi
fi
export LD_LIBRARY_PATH="$here/lib${libdirs:+:$libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The driver compiles the embedded PTX once per process; a cache big enough for candle's
# kernels lets later processes reuse it.
export CUDA_CACHE_MAXSIZE=4294967296
export RUPANTOR_REQUIRE_GPU=1
export RUPANTOR_FIXTURES="$tree/fixtures"
export RUPANTOR_BIN="$bin/rupantor"
export RUPANTOR_CACHE="$work/cache"
export PYTHONUNBUFFERED=1

if [ "$dry" != 1 ]; then
    if gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"; then
        echo "$gpu" >"$logs/gpu.txt"
    else
        say "nvidia-smi failed: $gpu"
    fi
    nvidia-smi >"$logs/nvidia-smi.txt" 2>&1
fi
{
    echo "bundle: $(cat "$here/BUILD.txt" 2>/dev/null | head -1)"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "python3: $(command -v python3)"
} >"$logs/environment.txt"

r="$bin/rupantor"

# --- 1. every GPU test (together at most 40% of the budget) -------------------------------
phase_end=$((budget * 2 / 5))
while IFS=$'\t' read -r package crate test file; do
    [ "$package" = package ] && continue
    mkdir -p "$tree/$crate"
    step "test-$package-$test" 120 --cwd "$tree/$crate" "$bin/$file" --show-output
done <"$here/tests.tsv"
phase_end="$budget"

# --- 2. kernels: dequant and GEMV against a device copy ----------------------------------
step bench-quant 60 "$r" bench quant --device cuda --json

# --- 3. the 9B-shaped QLoRA train step, recompute off and on (a child process each) -------
step bench-train-step 170 "$r" bench train-step --device cuda --dtype bf16 \
    --model random:gemma2-9b --batch 2 --seq 512 --rank 32 --steps 3 --warmup 1 \
    --recompute both --json

# --- 4. decode at batch 1 and 8 ----------------------------------------------------------
step bench-decode 90 "$r" bench decode --device cuda --dtype bf16 --model random:gemma2-9b \
    --batch 1,8 --prompt-tokens 128 --new-tokens 64 --json

# --- 5. end to end on the 9B shape: train 20 steps, generate with the adapter -------------
step smoke-train 110 "$r" train --config "$here/smoke/smoke.toml" --data "$here/smoke" \
    --max-steps 20 --out "$work/smoke"
step smoke-generate 75 "$r" generate --adapter "$work/smoke" --data "$here/smoke" \
    --split dev --limit 16 --max-new-tokens 64 --batch 8 --out "$work/smoke/dev.jsonl"

# --- 6. the HF baseline on the same GPU --------------------------------------------------
hf="$here/hf_gpu.py"
if [ "$dry" = 1 ] || python3 -c 'import torch, transformers, peft; assert torch.cuda.is_available()' \
    >"$logs/hf-imports.log" 2>&1; then
    step hf-train-gc-on 100 python3 "$hf" train --gradient-checkpointing on --json
    step hf-decode 90 python3 "$hf" decode --batch 1,8 --prompt-tokens 128 --new-tokens 64 --json
    step hf-train-gc-off 90 python3 "$hf" train --gradient-checkpointing off --json
    step hf-gemv 45 python3 "$hf" gemv --json
else
    say "HF baseline skipped: torch, transformers or peft does not import, or torch sees no GPU (logs/hf-imports.log)"
    record hf-baseline skipped 0 - 0 "python3 -c 'import torch, transformers, peft'"
fi

finish
