#!/usr/bin/env bash
# Fills data/blp25/ (gitignored) with the BLP-2025 Task 2 splits as JSONL:
# trial.jsonl (74 problems), dev.jsonl (400), test.jsonl (500).
#
# Source, the first that is there:
#   1. $RUPANTOR_DATA           a folder with trial/dev/test as .jsonl, .json or .csv
#   2. ../shared/data/blp25     next to the repository
#   3. the public release       the task's CSV files as mirrored in the BanglaForge
#                               repository, pinned to one commit ($BLP25_BASE_URL overrides)
# .json/.csv files are converted (and validated) with the rupantor-data loader.
#
# Safe to run again: a local source is copied afresh each time; the download is skipped
# when data/blp25 is already complete, unless --force is given. Works from any directory.
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    echo "usage: scripts/fetch-data.sh [--force]"
}

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "fetch-data: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "fetch-data: $*"; }
die() { echo "fetch-data: error: $*" >&2; exit 1; }

repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/data/blp25"
shared="$(cd -- "$repo/.." && pwd)/shared/data/blp25"
splits=(trial dev test)
declare -A expected=([trial]=74 [dev]=400 [test]=500)
base_url="${BLP25_BASE_URL:-https://raw.githubusercontent.com/mahirlabibdihan/BanglaForge/87fe14eb566e1c7fb4e7c9fcdb3e59895a0447f3}"
# The mirror's file for each split. Its dev file also carries a model's answers in a
# `response` column; those are not references and are dropped.
declare -A remote=([trial]=trial_with_en_v1.csv [dev]=dev_with_sols.csv [test]=test_v1.csv)
declare -A remote_flags=([trial]="" [dev]="--drop-response" [test]="")

tmp="$(mktemp -d)"
trap 'rm -rf -- "$tmp"' EXIT

# The first of DIR/SPLIT.{jsonl,json,csv} that exists.
split_file() {
    local ext
    for ext in jsonl json csv; do
        if [[ -f "$1/$2.$ext" ]]; then
            echo "$1/$2.$ext"
            return 0
        fi
    done
    return 1
}

# IN OUT.jsonl [--drop-response]: load with the crate's own loader and write JSONL.
convert() {
    command -v cargo >/dev/null || die "cargo is needed to convert $1 to JSONL"
    cargo run --quiet --manifest-path "$repo/Cargo.toml" -p rupantor-data \
        --example to_jsonl -- "$@"
}

# Stages SPLIT from FILE into $tmp/SPLIT.jsonl, converting unless it already is JSONL.
stage() {
    local file=$1 split=$2
    shift 2
    if [[ "$file" == *.jsonl && $# -eq 0 ]]; then
        cp -- "$file" "$tmp/$split.jsonl"
        chmod 0644 -- "$tmp/$split.jsonl"
    else
        convert "$file" "$tmp/$split.jsonl" "$@"
    fi
}

from_dir() {
    local dir=$1 split file
    for split in "${splits[@]}"; do
        file="$(split_file "$dir" "$split")" ||
            die "$dir has no $split.jsonl, $split.json or $split.csv"
        stage "$file" "$split"
    done
}

complete() {
    local split
    for split in "${splits[@]}"; do
        [[ -s "$dest/$split.jsonl" ]] || return 1
    done
}

download() {
    command -v curl >/dev/null || die "curl is not installed and there is no local copy; set RUPANTOR_DATA=DIR (a folder with trial/dev/test as .jsonl, .json or .csv)"
    local split url
    for split in "${splits[@]}"; do
        url="$base_url/${remote[$split]}"
        say "downloading $url"
        if ! curl -fsSL --retry 2 --connect-timeout 20 -o "$tmp/$split.csv" "$url"; then
            die "could not download $url.
  There is no local copy either. Set RUPANTOR_DATA=DIR to a folder holding trial, dev and
  test as .jsonl, .json or .csv (or put them in $shared) and run this script again."
        fi
        # shellcheck disable=SC2086 # the flag list is meant to split
        stage "$tmp/$split.csv" "$split" ${remote_flags[$split]}
    done
}

if [[ -n "${RUPANTOR_DATA:-}" ]]; then
    [[ -d "$RUPANTOR_DATA" ]] || die "RUPANTOR_DATA=$RUPANTOR_DATA is not a folder"
    say "source: \$RUPANTOR_DATA ($RUPANTOR_DATA)"
    from_dir "$RUPANTOR_DATA"
elif [[ -d "$shared" ]]; then
    say "source: $shared (next to the repository)"
    from_dir "$shared"
elif complete && ((force == 0)); then
    say "source: none needed; $dest is already complete (--force downloads it again)"
else
    say "source: the public release ($base_url)"
    download
fi

mkdir -p -- "$dest"
for split in "${splits[@]}"; do
    if [[ -f "$tmp/$split.jsonl" ]]; then
        mv -f -- "$tmp/$split.jsonl" "$dest/$split.jsonl"
    fi
done

status=0
for split in "${splits[@]}"; do
    file="$dest/$split.jsonl"
    if [[ ! -s "$file" ]]; then
        echo "fetch-data: error: $file is missing or empty" >&2
        status=1
        continue
    fi
    n="$(grep -c '[^[:space:]]' "$file" || true)"
    if [[ "$n" == "${expected[$split]}" ]]; then
        say "$split.jsonl: $n problems"
    else
        say "warning: $split.jsonl has $n problems; the release has ${expected[$split]}"
    fi
done
((status == 0)) || exit "$status"
say "data is in $dest"
