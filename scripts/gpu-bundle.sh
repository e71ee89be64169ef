#!/usr/bin/env bash
# Builds the GPU bundle: a self-contained folder (under 60 MiB) that checks and measures
# rupantor on a GPU host with only the NVIDIA driver and python3 (no Rust toolchain, network
# or root), in one call:
#
#   scripts/gpu-bundle.sh DIR          # here: build (scripts/cuda-env.sh), test, pack
#   bash DIR/run.sh OUTDIR             # there: every GPU test, the benchmarks, the smoke run,
#                                      # the HF baseline; report.md, report.json, logs.tar.gz
#
# DIR holds:
#   bin.tar.xz     rupantor (release, --features cuda) and every GPU test binary, stripped;
#   tests.tsv      the test binaries: package, crate folder, test name, file in bin.tar.xz;
#   lib/           libcudart.so.13 (from the nvidia-cuda-runtime wheel the build used);
#   tree/          the repository's fixtures/, configs/ and data/samples/, which the tests read
#                  (run.sh points RUPANTOR_FIXTURES at tree/fixtures);
#   smoke/         the smoke run's config and problems (trial.jsonl, dev.jsonl);
#   run.sh, report.py, hf_gpu.py, BUILD.txt (commit, toolchain, sizes).
#
# GPU tests are the `crates/*/tests/*.rs` files gated with `#![cfg(feature = "cuda")]`, and
# any named gpu_*.rs or cuda_*.rs. At the end the bundle is checked here with
# RUPANTOR_BUNDLE_DRY=1 DIR/run.sh, which lists the steps and their time limits.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu-bundle.sh DIR" >&2
    exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$1"
limit_bytes=$((60 << 20))
say() { echo "gpu-bundle: $*" >&2; }

if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ ! -f "$dir/BUILD.txt" ]; then
    say "$dir exists and is not a bundle; give an empty or new folder"
    exit 1
fi
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
cd "$repo"
# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin"

say "building rupantor (release, --features cuda)"
cargo build --release -p rupantor-cli --features cuda
cp target/release/rupantor "$stage/bin/rupantor"

printf 'package\tcrate\ttest\tfile\n' >"$stage/tests.tsv"
for crate in crates/*; do
    [ -d "$crate/tests" ] || continue
    names=()
    for f in "$crate"/tests/*.rs; do
        [ -f "$f" ] || continue
        base="$(basename "$f" .rs)"
        if grep -q '^#!\[cfg(feature = "cuda")\]' "$f" || [[ $base == gpu_* || $base == cuda_* ]]; then
            names+=("$base")
        fi
    done
    [ ${#names[@]} -gt 0 ] || continue
    pkg="$(sed -n 's/^name = "\(.*\)"$/\1/p' "$crate/Cargo.toml" | head -n 1)"
    args=()
    for n in "${names[@]}"; do
        args+=(--test "$n")
    done
    say "building the GPU tests of $pkg: ${names[*]}"
    cargo test --release -p "$pkg" --features cuda --no-run --message-format=json "${args[@]}" \
        >"$stage/$pkg.json"
    # The executable of each named test target, from cargo's JSON messages.
    python3 - "$stage/$pkg.json" "${names[@]}" >"$stage/$pkg.tsv" <<'PY'
import json, sys
path, *names = sys.argv[1:]
found = {}
with open(path) as f:
    for line in f:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        t = m.get("target", {})
        if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in t.get("kind", []) and t.get("name") in names:
            found[t["name"]] = m["executable"]
missing = [n for n in names if n not in found]
if missing:
    sys.exit(f"gpu-bundle: cargo built no executable for {missing} ({path})")
for n in names:
    print(f"{n}\t{found[n]}")
PY
    while IFS=$'\t' read -r name exe; do
        cp "$exe" "$stage/bin/$pkg--$name"
        printf '%s\t%s\t%s\t%s\n' "$pkg" "$crate" "$name" "$pkg--$name" >>"$stage/tests.tsv"
    done <"$stage/$pkg.tsv"
done

say "stripping and compressing $(find "$stage/bin" -type f | wc -l) binaries"
strip "$stage"/bin/*
# One xz stream over all binaries (they share candle's kernels and most of their code), with a
# dictionary large enough to see the repeats.
tar -C "$stage/bin" -cf - . | xz -T1 --lzma2=preset=9,dict=256MiB >"$stage/bin.tar.xz"

rm -rf "${dir:?}"/*
mv "$stage/bin.tar.xz" "$stage/tests.tsv" "$dir/"
mkdir -p "$dir/lib" "$dir/tree/data" "$dir/smoke"
cp -L "$CUDA_HOME/lib/libcudart.so.13" "$dir/lib/"
cp -r fixtures configs "$dir/tree/"
cp -r data/samples "$dir/tree/data/"
cp scripts/gpu-bundle/run.sh scripts/gpu-bundle/report.py scripts/bench/hf_gpu.py "$dir/"
cp scripts/gpu-bundle/smoke.toml "$dir/smoke/"
# The smoke run's problems: the loop samples, repeated under new ids (24 to train on, 16 to
# generate for).
python3 - data/samples/loop "$dir/smoke" <<'PY'
import json, pathlib, sys
src, dst = map(pathlib.Path, sys.argv[1:])
for split, copies in (("trial", 3), ("dev", 4)):
    rows = [json.loads(l) for l in (src / f"{split}.jsonl").read_text().splitlines() if l.strip()]
    with (dst / f"{split}.jsonl").open("w") as f:
        for k in range(copies):
            for r in rows:
                f.write(json.dumps({**r, "id": r["id"] + 1000 * k}, ensure_ascii=False) + "\n")
PY
{
    echo "rupantor $(git describe --always --dirty 2>/dev/null || echo unknown), built $(date -u +%Y-%m-%dT%H:%MZ) with nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDARC_CUDA_VERSION ${CUDARC_CUDA_VERSION:-13000 (.cargo/config.toml)}, CUDA_COMPUTE_CAP ${CUDA_COMPUTE_CAP:-80 (.cargo/config.toml)}"
    echo "binaries (stripped):"
    find "$stage/bin" -type f -printf '%f %s\n' | sort |
        awk '{ printf "  %-48s %6.1f MiB\n", $1, $2 / 1048576 }'
} >"$dir/BUILD.txt"
chmod +x "$dir/run.sh"

size="$(du -sb "$dir" | cut -f1)"
say "$dir: $(awk -v b="$size" 'BEGIN { printf "%.1f MiB", b / 1048576 }') (limit 60 MiB)"
if [ "$size" -gt "$limit_bytes" ]; then
    say "the bundle is over 60 MiB"
    exit 1
fi
say "checking the bundle (RUPANTOR_BUNDLE_DRY=1 run.sh)"
RUPANTOR_BUNDLE_DRY=1 bash "$dir/run.sh" "$stage/dry-report"
say "done: on the GPU host run  bash $dir/run.sh OUTDIR"
