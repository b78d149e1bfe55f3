#!/usr/bin/env bash
# The README's sweep, small: GNU parallel runs kv-evict | kv-eval for 2 scores x 2 budgets, one
# JSON line each, and kv-eval report summarizes them with the Pareto front and a chart.
source "$(dirname "$0")/lib.sh"
model="$KV_MODELS_DIR/stories260K.gguf"
text="$KV_DATA_DIR/tinystories_val.txt"
if [ ! -f "$model" ] || [ ! -f "$text" ]; then echo "skip: no model or text"; exit 77; fi
if ! command -v parallel >/dev/null 2>&1; then echo "skip: GNU parallel is not installed"; exit 77; fi

kv-capture -m "$model" -f "$text" --ctx 200 --window 16 --attn-stats --probe 16 -o full.kv.h5 || fail "capture"
export model
parallel --will-cite -j 2 \
  'kv-evict -s {1} -r {2} full.kv.h5 | kv-eval --ref full.kv.h5 -m "$model" --label {1}-{2} --json' \
  ::: snapkv random ::: 0.5 0.25 > results.jsonl 2> parallel.err || fail "parallel sweep: $(cat parallel.err)"
[ "$(wc -l < results.jsonl)" = 4 ] && pass "four JSON lines" || fail "results: $(cat results.jsonl)"
kv-eval report results.jsonl --plot pareto.svg > report.txt || fail "report"
# Rows sorted by bytes per token: both 25% runs (80 bytes/token) come before both 50% runs.
/usr/bin/python3 - report.txt <<'PY' && pass "report sorted by bytes, snapkv on the front at each budget" || fail "report: $(cat report.txt)"
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip().split()[0] in ("snapkv-0.25", "snapkv-0.5", "random-0.25", "random-0.5")]
labels = [r[0] for r in rows]
assert sorted(labels[:2]) == ["random-0.25", "snapkv-0.25"] and sorted(labels[2:]) == ["random-0.5", "snapkv-0.5"], labels
front = {r[0] for r in rows if r[-1] == "*"}
assert "snapkv-0.25" in front and "random-0.25" not in front and "random-0.5" not in front, front
PY
grep -q "<circle" pareto.svg && pass "chart written" || fail "pareto.svg"
finish
