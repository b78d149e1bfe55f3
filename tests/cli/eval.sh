#!/usr/bin/env bash
# kv-eval end to end on stories260K: identity gives zero, eviction costs accuracy, the outputs
# (table, JSON, CSV, JSON Lines) agree, and bad requests fail with one line and a sysexits code.
source "$(dirname "$0")/lib.sh"
model="$KV_MODELS_DIR/stories260K.gguf"
text="$KV_DATA_DIR/tinystories_val.txt"
if [ ! -f "$model" ] || [ ! -f "$text" ]; then echo "skip: no model or text"; exit 77; fi

kv-capture -m "$model" -f "$text" --ctx 300 --window 16 --attn-stats --probe 32 -o full.kv.h5 || fail "capture"

kv-eval --ref full.kv.h5 -m "$model" --json full.kv.h5 > same.json || fail "eval identity"
/usr/bin/python3 - same.json <<'PY' && pass "identity: zero error, zero KL, equal perplexity" || fail "identity: $(cat same.json)"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["rel_error"] == 0 and j["kl"] == 0 and j["ppl_delta"] == 0, j
assert abs(j["cosine"] - 1) < 1e-9 and abs(j["mass_recall"] - 1) < 1e-5 and j["topk_recall"] == 1, j
assert j["ratio_to_reference"] == 1 and j["top1_agreement"] == 1
PY

kv-evict -s snapkv -r 0.25 full.kv.h5 | kv-eval --ref full.kv.h5 -m "$model" --label snap25 \
  --append results.jsonl --per-layer > table.txt || fail "evict | eval"
grep -q "^entries     1500 of 6000 (25.0%)" table.txt && pass "table: entries" || fail "table: $(cat table.txt)"
grep -qE "^attention   rel. error 0\.[0-9]+, cosine 0\.9" table.txt && pass "table: attention" || fail "attention line: $(grep attention table.txt)"
grep -qE "^model       perplexity [0-9.]+ \(reference [0-9.]+, \+?-?[0-9.]+\), KL 0\.[0-9]+" table.txt \
  && pass "table: model" || fail "model line: $(grep model table.txt)"
[ "$(grep -cE '^ +[0-4] +300 ' table.txt)" = 5 ] && pass "per-layer rows" || fail "per-layer: $(tail -6 table.txt)"

kv-evict -s random -r 0.25 full.kv.h5 -o random.kv.h5 || fail "random"
kv-eval --ref full.kv.h5 -m "$model" --label rand25 --append results.jsonl --csv random.kv.h5 > r.csv || fail "csv"
[ "$(wc -l < r.csv)" = 2 ] && head -1 r.csv | grep -q "^label,candidate,entries,kv_bytes" && pass "csv: header + one row" || fail "csv: $(cat r.csv)"
/usr/bin/python3 - results.jsonl <<'PY' && pass "JSON Lines: two runs, snapkv beats random, provenance kept" || fail "results.jsonl: $(cat results.jsonl)"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [r["label"] for r in rows] == ["snap25", "rand25"]
snap, rand = rows
assert snap["kv_bytes"] == rand["kv_bytes"] == 1500 * 8 * 2 * 2
assert snap["rel_error"] < rand["rel_error"] and snap["kl"] < rand["kl"], (snap, rand)
assert snap["mass_recall"] > rand["mass_recall"]
assert "kv-evict -s snapkv -r 0.25 full.kv.h5" in snap["provenance"][-1]
assert len(snap["layers"]) == 5 and "layers" not in rand
PY

# Generation and the recall task: identical caches agree exactly.
kv-eval --ref full.kv.h5 -m "$model" --generate 8 --task recall --json full.kv.h5 > gen.json || fail "generate"
/usr/bin/python3 - gen.json <<'PY' && pass "identity: same greedy continuation, same recall" || fail "generate/recall: $(cat gen.json)"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["generate_common_prefix"] == 8 and j["generate_reference"] == j["generate_candidate"] != ""
assert j["recall_items"] > 0 and j["recall_candidate"] == j["recall_reference"]
PY

# Decode timing: fields present and positive (speed itself is for benchmarks, not tests).
kv-evict -s h2o -r 0.5 full.kv.h5 | kv-eval --ref full.kv.h5 --speed --json > speed.json || fail "speed"
/usr/bin/python3 - speed.json <<'PY' && pass "--speed reports step times and bandwidth" || fail "speed: $(cat speed.json)"
import json, sys
j = json.load(open(sys.argv[1]))
for k in ("decode_ms_reference", "decode_ms_candidate", "decode_speedup", "decode_gbps_candidate", "bandwidth_gbps"):
    assert j[k] > 0, k
PY

# q4_0 and KIVI-2 candidates are timed on their codes (head_dim a multiple of 32), others on their values;
# the accuracy metrics are the same either way (computed on decoded values).
kv-synth --preset stories260k --layers 2 --head-dim 64 -n 256 --probe 4 -o d64.kv.h5 || fail "synth d64"
for s in q4_0 q8_0 kivi; do
  kv-compress -q -s $s d64.kv.h5 -o $s.kv.h5 && kv-eval -q --ref d64.kv.h5 --speed --json $s.kv.h5 > $s.speed.json \
    && kv-eval -q --ref d64.kv.h5 --json $s.kv.h5 > $s.plain.json || fail "eval --speed $s"
done
/usr/bin/python3 - <<'PY' && pass "--speed: q4_0 and KIVI-2 timed on their codes where the CPU has the kernels (decode_on_codes), q8_0 on values; same accuracy" || fail "codes speed: $(cat q4_0.speed.json kivi.speed.json)"
import json
flags = open("/proc/cpuinfo").read()
vnni = " avx512_vnni" in flags and " avx512vbmi" in flags
q4_0 = "q4_0" if vnni else None  # else values
kivi2 = "kivi2" if vnni else None
for s, want in (("q4_0", q4_0), ("q8_0", None), ("kivi", kivi2)):
    a, b = json.load(open(s + ".speed.json")), json.load(open(s + ".plain.json"))
    assert a["decode_on_codes"] == want and a["decode_ms_candidate"] > 0, (s, a)
    assert a["rel_error"] == b["rel_error"] and a["rel_error"] > 0, (s, a["rel_error"], b["rel_error"])
PY

# Synthetic caches with a probe (kv-synth --probe): attention metrics and timing for any shape.
kv-synth --preset tiny -n 300 --window 8 --probe 4 -o synth.kv.h5 || fail "synth --probe"
kv-evict -s snapkv -r 0.25 synth.kv.h5 | kv-eval --ref synth.kv.h5 --speed --json > synth.json || fail "eval synth"
/usr/bin/python3 -c "
import json; j = json.load(open('synth.json'))
assert j['probe_rows'] == 2 * 4 * 4 and 0 < j['rel_error'] < 1 and j['decode_ms_candidate'] > 0, j
" && pass "kv-eval on a synthetic cache with a probe" || fail "synth eval: $(cat synth.json)"

# The report: sorted by bytes, Pareto front marked, an SVG chart.
kv-eval report results.jsonl --plot pareto.svg > report.txt || fail "report"
grep -qE "^  snap25 +[0-9.]+ +0\.2500 +[0-9.]+  \*$" report.txt && grep -qE "^  rand25 .*[0-9]  $" report.txt \
  && pass "report: snapkv on the front, random off it (same bytes, worse KL)" || fail "report: $(cat report.txt)"
/usr/bin/python3 -c "
import xml.dom.minidom as m; d = m.parse('pareto.svg')
assert len(d.getElementsByTagName('circle')) == 2
assert 'snap25' in d.toxml() and 'rand25' in d.toxml()
" && pass "report: SVG with both points" || fail "pareto.svg"
kv-eval report results.jsonl --metric mass_recall | grep -q "mass_recall (higher is better)" && pass "report --metric" || fail "report --metric"
expect_code 64 kv-eval report results.jsonl --metric speed
echo '{"label": "x", "kv_bytes": 1' > broken.jsonl
expect_code 65 kv-eval report broken.jsonl
expect_err_line "broken.jsonl line 1: JSON"
expect_code 66 kv-eval report missing.jsonl

# Bad requests.
expect_code 64 kv-eval --ref full.kv.h5 --generate 4 random.kv.h5
expect_err_line "need --model"
expect_code 64 kv-eval random.kv.h5
expect_code 64 kv-eval --ref full.kv.h5 --json --csv random.kv.h5
kv-capture -m "$model" -f "$text" --ctx 200 --probe 8 -o short.kv.h5
expect_code 65 kv-eval --ref full.kv.h5 short.kv.h5
expect_err_line "^kv-eval: reference and candidate differ in n_tokens \(300 vs 200\)"
kv-capture -m "$model" -f "$text" --ctx 300 -o noprobe.kv.h5
expect_code 65 kv-eval --ref noprobe.kv.h5 noprobe.kv.h5
expect_err_line "kv-capture --probe"
expect_code 66 kv-eval --ref missing.kv.h5 random.kv.h5
expect_code 73 kv-eval --ref full.kv.h5 --append no/such/dir/r.jsonl random.kv.h5
if ! nvidia-smi >/dev/null 2>&1; then
  expect_code 69 kv-eval --ref full.kv.h5 --device cuda random.kv.h5
  expect_err_line "no usable GPU|built without CUDA"
fi

finish
