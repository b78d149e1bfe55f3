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
expect_code 64 kv-eval --ref - 
expect_err_line "cannot both be read from stdin"
expect_code 64 kv-eval --ref full.kv.h5 --append '' random.kv.h5
expect_code 64 kv-eval --ref full.kv.h5 --recall-items 3 random.kv.h5
expect_err_line "requires --task"
expect_code 64 kv-eval --ref full.kv.h5 -m "$model" --generate 2000 random.kv.h5
expect_err_line "exceed the model's context of 2048 tokens \(at most 1747 here\)"
expect_code 64 kv-eval --ref full.kv.h5 --json report results.jsonl
expect_err_line "'--ref' is not an option of 'kv-eval report'"
expect_code 66 kv-eval report .
expect_err_line "Is a directory"

# --model must be the model the caches came from: its probe logits after the reference must be
# the captured ones. The llama2.c file holds the same weights as the GGUF (accepted); a copy with
# its layers' attention norms scaled by 1.02 is not.
bin="$KV_MODELS_DIR/stories260K.bin"
kv-eval --ref full.kv.h5 -m "$bin" --json random.kv.h5 > bin.json && pass "--model: the llama2.c file of the same weights" || fail "bin model: $(cat bin.json)"
/usr/bin/python3 - "$bin" <<'PY'
import struct, sys
data = bytearray(open(sys.argv[1], "rb").read())
dim, hidden, layers, heads, kv_heads, vocab, ctx = struct.unpack("7i", data[:28])
at = 28 + abs(vocab) * dim * 4  # rms_att_weight follows the token embeddings
norms = struct.unpack(f"{layers * dim}f", data[at:at + layers * dim * 4])
data[at:at + layers * dim * 4] = struct.pack(f"{layers * dim}f", *(1.02 * x for x in norms))
open("other.bin", "wb").write(data)
PY
expect_code 65 kv-eval --ref full.kv.h5 -m other.bin random.kv.h5
expect_err_line "does not reproduce the reference's captured probe logits"

# Outputs: --append and --plot never write over an input, and a failed write leaves the file as
# it was (a results file never ends in half a line; an old chart stays whole).
cp full.kv.h5 ref.copy
expect_code 64 kv-eval --ref full.kv.h5 --append full.kv.h5 random.kv.h5
expect_err_line "is the reference snapshot"
cmp -s full.kv.h5 ref.copy && pass "--append onto the reference: reference untouched" || fail "reference changed"
cp results.jsonl results.copy
expect_code 64 kv-eval report results.jsonl --plot results.jsonl
cmp -s results.jsonl results.copy && pass "--plot onto the results: results untouched" || fail "results changed"
expect_code 74 kv-eval --ref full.kv.h5 --append /dev/full random.kv.h5
printf 'x\n' > small.jsonl
cp pareto.svg pareto.copy
(
  trap '' XFSZ
  ulimit -f 1  # 1024 bytes: a --per-layer line does not fit, nor does the chart
  kv-eval --ref full.kv.h5 --per-layer --append small.jsonl random.kv.h5 2> append.err
  echo "append $?" > codes
  kv-eval report results.jsonl --plot pareto.svg > /dev/null 2> plot.err
  echo "plot $?" >> codes
)
grep -q "^append 74$" codes && [ "$(cat small.jsonl)" = x ] && [ "$(wc -l < append.err)" = 1 ] \
  && pass "a failed append: 74, one line, the file cut back" || fail "append under a size limit: $(cat codes append.err small.jsonl | head -c 300)"
grep -q "^plot 74$" codes && cmp -s pareto.svg pareto.copy && [ -z "$(ls | grep '\.tmp')" ] \
  && pass "a failed chart: 74, the old chart whole, no temporary file" || fail "plot under a size limit: $(cat codes plot.err; ls)"

# CSV fields with commas and quotes are quoted (RFC 4180); report labels of any length or bytes.
cp random.kv.h5 'my,cand.kv.h5'
kv-eval --ref full.kv.h5 --label 'r, 25% "random"' --csv 'my,cand.kv.h5' > q.csv || fail "csv quoting run"
/usr/bin/python3 - q.csv <<'PY' && pass "csv: quoted fields, as many as the header" || fail "csv quoting: $(cat q.csv)"
import csv, sys
head, row = list(csv.reader(open(sys.argv[1])))
assert len(head) == len(row) and row[0] == 'r, 25% "random"' and row[1] == "my,cand.kv.h5", (head, row)
PY
/usr/bin/python3 - results.jsonl <<'PY' > odd.jsonl
import json, sys
row = json.loads(open(sys.argv[1]).readline())
for label in ("x" * 600, "ctl\u0001 nul\u0000 <&>"):
    row["label"] = label
    print(json.dumps(row))
PY
kv-eval report odd.jsonl --plot odd.svg > odd.txt || fail "report of odd labels"
/usr/bin/python3 -c "
import xml.dom.minidom as m; d = m.parse('odd.svg'); assert len(d.getElementsByTagName('circle')) == 2
lines = open('odd.txt').read().splitlines(); assert sum(l.startswith('  xxxx') for l in lines) == 1 and len(lines) == 4, lines
" && pass "report: long and control-character labels, one table row each, well-formed SVG" || fail "odd labels: $(cat odd.txt)"

if ! nvidia-smi >/dev/null 2>&1; then
  expect_code 69 kv-eval --ref full.kv.h5 --device cuda random.kv.h5
  expect_err_line "no usable GPU|built without CUDA"
fi

# A tiered candidate counts its disk tier: file bytes plus what its page store holds for it, as
# kv-inspect gives them (counting the file alone made a tiered cache look 2x smaller, and put it
# on the Pareto front). An encoded tensor moved whole counts as its object.
kv-synth -n 256 --probe 8 -o tier-ref.kv.h5
kv-offload -q tier -t gpu:16KiB -t disk:tier-store tier-ref.kv.h5 -o tiered.kv.h5 || fail "tier"
kv-compress -s q4_0 tier-ref.kv.h5 -o tier-q4.kv.h5
kv-offload -q tier -t gpu:0 -t disk:tier-store --sink-pages 0 --recent-pages 0 tier-q4.kv.h5 \
  -o tiered-q4.kv.h5 || fail "tier q4_0"
for c in tiered tiered-q4; do
  kv-eval --ref tier-ref.kv.h5 --json $c.kv.h5 > $c.json || fail "eval $c"
  kv-inspect --json $c.kv.h5 > $c.inspect.json
done
kv-inspect --json tier-q4.kv.h5 > tier-q4.inspect.json
/usr/bin/python3 - <<'PY' && pass "tiered candidates: file + page store bytes" || fail "tiered bytes"
import json
e, i = json.load(open("tiered.json")), json.load(open("tiered.inspect.json"))
assert i["kv_bytes_in_page_store"] > 0, i
assert e["kv_bytes"] == i["kv_bytes_stored"] + i["kv_bytes_in_page_store"], (e["kv_bytes"], i)
assert e["kv_bytes"] >= e["kv_bytes_reference"], e  # pages' metadata on top of the same values
e, i = json.load(open("tiered-q4.json")), json.load(open("tiered-q4.inspect.json"))
q4 = json.load(open("tier-q4.inspect.json"))["kv_bytes_stored"]
assert e["kv_bytes"] == i["kv_bytes_stored"] + i["kv_bytes_in_page_store"], (e, i)
assert q4 <= e["kv_bytes"] <= q4 + 2048, (q4, e["kv_bytes"])  # the objects' headers and ids
PY

finish
