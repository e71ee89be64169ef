#!/usr/bin/env bash
# The issue-7 ablation: dev pass@1 of each inference strategy with a trained adapter, beside
# the pass rate on the assert the prompt showed (repair sees that one only, so the gap between
# the two shows how much a strategy fits the visible assert), and the base model zero-shot and
# few-shot for comparison. Every row is one `rupantor generate` run; a row whose files exist is
# not run again, so an interrupted ablation continues where it stopped.
#
#   scripts/ablation.sh [ADAPTER_DIR] [LIMIT] [OUT_DIR]
#
# Defaults: out/r32/iter2, the first 100 dev problems, ADAPTER_DIR/ablation. Environment:
# RUPANTOR_BIN (default target/release/rupantor), RUPANTOR_DATA / DATA (the data folder),
# FEWSHOT (K, default 3), REPAIR (N, default 2), CONFIG (the base model's preset for the
# base rows, default configs/gemma3-270m-cpu.toml), ROWS (space-separated row names to run).
# Writes OUT_DIR/ablation.md (the table) and OUT_DIR/ablation.jsonl (one object per row).
set -euo pipefail
cd "$(dirname "$0")/.."

ADAPTER=${1:-out/r32/iter2}
LIMIT=${2:-100}
OUT=${3:-$ADAPTER/ablation}
BIN=${RUPANTOR_BIN:-target/release/rupantor}
DATA=${DATA:-${RUPANTOR_DATA:-data/blp25}}
K=${FEWSHOT:-3}
N=${REPAIR:-2}
CONFIG=${CONFIG:-configs/gemma3-270m-cpu.toml}
ROWS=${ROWS:-"plain fewshot repair fewshot+repair review translate all base-zero-shot base-fewshot"}

[[ -x $BIN ]] || { echo "ablation: $BIN not found; build with cargo build --release -p rupantor-cli" >&2; exit 1; }
[[ -f $ADAPTER/adapter_config.json ]] || { echo "ablation: no adapter in $ADAPTER" >&2; exit 1; }
mkdir -p "$OUT"

flags_of() {
    case $1 in
        plain) echo "" ;;
        fewshot) echo "--fewshot $K" ;;
        repair) echo "--repair $N" ;;
        fewshot+repair) echo "--fewshot $K --repair $N" ;;
        review) echo "--review" ;;
        translate) echo "--translate" ;;
        all) echo "--fewshot $K --repair $N --review --translate" ;;
        base-zero-shot) echo "" ;;
        base-fewshot) echo "--fewshot $K" ;;
        *) echo "ablation: unknown row $1" >&2; exit 1 ;;
    esac
}

for row in $ROWS; do
    if [[ -f $OUT/$row.verdicts.jsonl && -f $OUT/$row.secs ]]; then
        echo "ablation: $row done earlier, kept" >&2
        continue
    fi
    # shellcheck disable=SC2046
    if [[ $row == base-* ]]; then
        model=(--config "$CONFIG")
    else
        model=(--adapter "$ADAPTER")
    fi
    echo "ablation: $row: $(flags_of "$row")" >&2
    start=$(date +%s.%N)
    # shellcheck disable=SC2046
    "$BIN" generate "${model[@]}" --data "$DATA" --split dev --limit "$LIMIT" \
        --out "$OUT/$row.jsonl" $(flags_of "$row") > "$OUT/$row.log" 2>&1 \
        || { echo "ablation: $row failed, see $OUT/$row.log" >&2; exit 1; }
    end=$(date +%s.%N)
    python3 -c "print(round($end - $start, 1))" > "$OUT/$row.secs"
done

python3 - "$OUT" "$ADAPTER" "$LIMIT" "$K" "$N" $ROWS <<'PY'
import json, sys, pathlib
out, adapter, limit, k, n, *rows = sys.argv[1:]
out = pathlib.Path(out)
lines = [
    f"Dev pass@1 on the first {limit} dev problems; adapter `{adapter}`; few-shot K = {k}, "
    f"repair N = {n}. *visible*: the assert the prompt showed (the one repair and review "
    "run); *full*: all three asserts (what the score is).",
    "",
    "| configuration | full pass@1 | visible-assert pass@1 | gap | time (s) |",
    "|---|---|---|---|---|",
]
records = []
for row in rows:
    verdicts = out / f"{row}.verdicts.jsonl"
    if not verdicts.exists():
        continue
    v = [json.loads(l) for l in verdicts.read_text().splitlines() if l.strip()]
    full = sum(r["passed"] for r in v) / len(v)
    stats = json.loads((out / f"{row}.strategies.json").read_text())
    vis = stats["visible"]
    visible = vis["passed"] / vis["n"] if vis else None
    secs = float((out / f"{row}.secs").read_text())
    rec = {"row": row, "n": len(v), "full": full, "visible": visible, "secs": secs,
           "tokens": stats["tokens"], "repaired": stats["repaired"],
           "review_kept": stats["review_kept"], "translated": stats["translated"]}
    records.append(rec)
    vs = f"{visible:.3f}" if visible is not None else "-"
    gap = f"{visible - full:+.3f}" if visible is not None else "-"
    lines.append(f"| {row} | {full:.3f} ({sum(r['passed'] for r in v)}/{len(v)}) | {vs} | {gap} | {secs:.0f} |")
(out / "ablation.md").write_text("\n".join(lines) + "\n")
(out / "ablation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
print("\n".join(lines))
PY
