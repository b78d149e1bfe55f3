#!/usr/bin/env bash
# kv-offload simulate end to end: the table and the JSON agree, the page and byte accounting holds
# (hits + fetches = selected, f16 page bytes, the link model's stall), the error follows the
# budget, stdin works, query-aware fetch beats SnapKV eviction at equal budget on a real
# stories260K cache, and bad requests fail with one line and a sysexits code.
source "$(dirname "$0")/lib.sh"
model="$KV_MODELS_DIR/stories260K.gguf"
text="$KV_DATA_DIR/tinystories_val.txt"

# stories260k: 5 layers, 8 query heads, 4 KV heads, head_dim 8; 400 tokens = 25 full pages of 16.
kv-synth --preset stories260k -n 400 --probe 16 -o s.kv.h5 || fail "synth"

# The table: four lines, the figures the JSON gives.
kv-offload simulate -b 64 s.kv.h5 > t.txt || fail "simulate (table)"
kv-offload simulate --json -b 64 s.kv.h5 > t.json || fail "simulate (json)"
[ "$(wc -l < t.txt)" = 4 ] && pass "table: four lines" || fail "table: $(cat t.txt)"
grep -q "^simulate    s.kv.h5: 16 probe steps, pages of 16, budget 64 tokens per KV head, score quest$" t.txt \
  && pass "table: simulate line" || fail "simulate line: $(grep ^simulate t.txt)"
grep -q "^link        pcie5: 50.0 GB/s, 10.0 us per transfer (one per layer and step)$" t.txt \
  && pass "table: link line" || fail "link line: $(grep ^link t.txt)"
grep -qE "^attention   rel\. error 0\.[0-9]{6} over 640 \(layer, query head, step\) rows; 20480 tokens attended$" t.txt \
  && pass "table: attention line" || fail "attention line: $(grep ^attention t.txt)"
grep -qE "^fetch       [0-9]+ of 1280 selected pages fetched \(hit rate 0\.[0-9]{3}\), [0-9.]+ [KMG]?i?B moved, stall [0-9.]+ ms$" t.txt \
  && pass "table: fetch line" || fail "fetch line: $(grep ^fetch t.txt)"
/usr/bin/python3 - t.json t.txt <<'PY' && pass "JSON: keys, layers, totals = sum of layers = table" || fail "JSON: $(head -c 600 t.json)"
import json, re, sys
j = json.load(open(sys.argv[1]))
t = open(sys.argv[2]).read()
keys = ("rel_error", "pages_selected", "pages_hit", "pages_fetched", "bytes_fetched", "hit_rate",
        "stall_seconds", "tokens_attended")
for k in keys + ("steps", "layers", "budget", "page", "score", "link", "link_gbps", "link_latency_us"):
    assert k in j, k
assert "per_step" not in j
assert j["steps"] == 16 and j["budget"] == 64 and j["page"] == 16 and j["score"] == "quest"
assert j["link"] == "pcie5" and j["link_gbps"] == 50 and j["link_latency_us"] == 10
# 5 layers x 4 KV heads x 16 steps x 4 pages of 16 tokens.
assert j["pages_selected"] == 1280 and j["tokens_attended"] == 1280 * 16, j
assert j["pages_hit"] + j["pages_fetched"] == j["pages_selected"]
assert 0 < j["pages_fetched"] < j["pages_selected"], "some pages must move, not all"
assert abs(j["hit_rate"] - j["pages_hit"] / j["pages_selected"]) < 1e-8
assert 0 < j["rel_error"] < 1
assert [l["layer"] for l in j["layers"]] == [0, 1, 2, 3, 4]
for l in j["layers"]:
    for k in keys: assert k in l, (k, l)
    assert l["pages_hit"] + l["pages_fetched"] == l["pages_selected"] == 256, l
    assert abs(l["hit_rate"] - l["pages_hit"] / l["pages_selected"]) < 1e-8
for k in ("pages_selected", "pages_hit", "pages_fetched", "bytes_fetched", "tokens_attended"):
    assert sum(l[k] for l in j["layers"]) == j[k], k
assert abs(sum(l["stall_seconds"] for l in j["layers"]) - j["stall_seconds"]) <= 1e-8 * j["stall_seconds"]
assert abs(sum(l["rel_error"] for l in j["layers"]) / 5 - j["rel_error"]) < 1e-8  # equal rows per layer
m = re.search(r"rel\. error ([0-9.]+) over", t)
assert abs(float(m.group(1)) - j["rel_error"]) <= 5e-7, m.group(1)
m = re.search(r"fetch +(\d+) of (\d+) selected pages fetched \(hit rate ([0-9.]+)\), .* stall ([0-9.]+) ms", t)
assert int(m.group(1)) == j["pages_fetched"] and int(m.group(2)) == j["pages_selected"]
assert abs(float(m.group(3)) - j["hit_rate"]) <= 5e-4 and abs(float(m.group(4)) - j["stall_seconds"] * 1e3) <= 5e-4
PY

# Bytes: a full f16 page is 16 rows x head_dim 8 x 2 bytes x (k and v) = 512 bytes; the link model
# charges latency + bytes / bandwidth once per layer and step that moved anything.
kv-offload simulate --json -b 64 --link 25,5 --per-step s.kv.h5 > ps.json || fail "per-step"
/usr/bin/python3 - ps.json <<'PY' && pass "per-step: sums to the totals, 512 B per page, stall whole transfers" || fail "per-step: $(head -c 600 ps.json)"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["link"] == "25,5" and j["link_gbps"] == 25 and j["link_latency_us"] == 5
assert j["bytes_fetched"] == j["pages_fetched"] * 512, (j["bytes_fetched"], j["pages_fetched"])
ps = j["per_step"]
assert len(ps) == j["steps"] == 16
for k in ("pages_selected", "pages_hit", "pages_fetched", "bytes_fetched", "tokens_attended"):
    assert sum(s[k] for s in ps) == j[k], k
assert abs(sum(s["stall_seconds"] for s in ps) - j["stall_seconds"]) <= 1e-8 * j["stall_seconds"]
assert abs(sum(s["rel_error"] for s in ps) / 16 - j["rel_error"]) < 1e-8
for s in ps:
    assert s["pages_selected"] == 5 * 4 * 4 and s["pages_hit"] + s["pages_fetched"] == s["pages_selected"]
    assert s["bytes_fetched"] == s["pages_fetched"] * 512
    assert abs(s["hit_rate"] - s["pages_hit"] / s["pages_selected"]) < 1e-8
    # per_step sums all 5 layers: the stall is bytes / 25e9 plus 5 us for each of 0..5 transfers.
    n = (s["stall_seconds"] - s["bytes_fetched"] / 25e9) / 5e-6
    assert abs(n - round(n)) < 1e-3 and (1 if s["bytes_fetched"] else 0) <= round(n) <= 5, (s, n)
PY
kv-offload simulate -b 64 --link 25,5 --per-step s.kv.h5 > ps.txt || fail "per-step table"
grep -q "^  step  rel.error  selected  fetched  hit rate  bytes moved  stall(us)$" ps.txt \
  && [ "$(grep -cE '^ +[0-9]+ +[0-9.]+ +80 +[0-9]+ +[01]\.[0-9]{3} +[0-9]+ +[0-9.]+$' ps.txt)" = 16 ] \
  && pass "per-step table: header and 16 rows" || fail "per-step table: $(tail -17 ps.txt)"

# One layer: the stall is exactly the link model summed over the steps that fetched.
kv-synth --preset stories260k --layers 1 -n 400 --probe 16 -o l1.kv.h5 || fail "synth 1 layer"
kv-offload simulate --json -b 64 --link 25,5 --per-step l1.kv.h5 > l1.json || fail "simulate 1 layer"
/usr/bin/python3 - l1.json <<'PY' && pass "1 layer: stall = sum of 5 us + bytes / 25 GB/s per fetching step" || fail "1 layer stall: $(head -c 400 l1.json)"
import json, sys
j = json.load(open(sys.argv[1]))
want = sum(5e-6 + s["bytes_fetched"] / 25e9 for s in j["per_step"] if s["bytes_fetched"] > 0)
assert want > 0 and abs(j["stall_seconds"] - want) <= 1e-7 * want, (j["stall_seconds"], want)
for s in j["per_step"]:
    w = 5e-6 + s["bytes_fetched"] / 25e9 if s["bytes_fetched"] > 0 else 0
    assert abs(s["stall_seconds"] - w) <= 1e-7 * w, (s, w)
assert len(j["layers"]) == 1
PY

# Link presets: accepted and reported with their figures.
for spec in "pcie5 50.0 10.0" "c2c 400.0 2.0" "nvme 6.0 80.0"; do
  set -- $spec
  kv-offload simulate -b 64 --link $1 s.kv.h5 > link.txt \
    && grep -q "^link        $1: $2 GB/s, $3 us per transfer" link.txt \
    && pass "--link $1" || fail "--link $1: $(grep ^link link.txt)"
done
kv-offload simulate --json -b 64 --link nvme s.kv.h5 > nvme.json || fail "nvme json"
kv-offload simulate --json -b 64 --link c2c s.kv.h5 > c2c.json || fail "c2c json"
/usr/bin/python3 -c "
import json; n, c = json.load(open('nvme.json')), json.load(open('c2c.json'))
assert n['link'] == 'nvme' and c['link'] == 'c2c' and n['pages_fetched'] == c['pages_fetched']
assert n['stall_seconds'] > 10 * c['stall_seconds'] > 0
" && pass "nvme stalls longer than c2c for the same pages" || fail "nvme vs c2c"

# Everything fits: no error, nothing fetched; and the sink + recent pages alone are window eviction.
kv-offload simulate --json -b 400 s.kv.h5 > all.json || fail "budget 400"
/usr/bin/python3 -c "
import json; j = json.load(open('all.json'))
assert j['rel_error'] < 1e-5 and j['pages_fetched'] == 0 and j['bytes_fetched'] == 0, j
assert j['stall_seconds'] == 0 and j['hit_rate'] == 1 and j['tokens_attended'] == 5 * 4 * 16 * 400
" && pass "budget = all tokens: exact, nothing fetched" || fail "budget 400: $(head -c 300 all.json)"
kv-synth --preset stories260k -n 400 --window 16 --attn-stats --probe 16 -o sw.kv.h5 || fail "synth window"
kv-offload simulate --json -b 32 sw.kv.h5 > w32.json || fail "budget 32"
kv-evict -s window -b 32 --sink 16 --recent 16 sw.kv.h5 | kv-eval -r sw.kv.h5 --json > w32eval.json || fail "window eval"
/usr/bin/python3 -c "
import json; s, e = json.load(open('w32.json')), json.load(open('w32eval.json'))
assert s['pages_fetched'] == 0 and s['tokens_attended'] == 5 * 4 * 16 * 32
assert abs(s['rel_error'] - e['rel_error']) < 1e-6, (s['rel_error'], e['rel_error'])
" && pass "sink + recent pages only = kv-evict window 16+16, same rel. error as kv-eval" || fail "window cross-check"

# A larger fast tier fetches no more and selects the same pages; one holding everything fetches nothing.
for c in 64 128 400; do kv-offload simulate --json -b 64 --fast-capacity $c s.kv.h5 > cap$c.json || fail "capacity $c"; done
/usr/bin/python3 -c "
import json; a, b, c = (json.load(open('cap%d.json' % n)) for n in (64, 128, 400))
assert a['rel_error'] == b['rel_error'] == c['rel_error'] and a['pages_selected'] == b['pages_selected'] == c['pages_selected']
assert a['pages_fetched'] > b['pages_fetched'] > c['pages_fetched'] == 0, (a['pages_fetched'], b['pages_fetched'])
" && pass "--fast-capacity: LRU fetches fall with capacity, selection unchanged" || fail "fast capacity"

# stdin: the same figures as the file.
kv-synth --preset stories260k -n 400 --probe 16 | kv-offload simulate --json -b 64 - > in.json || fail "stdin"
kv-synth --preset stories260k -n 400 --probe 16 | kv-offload simulate -b 64 > in.txt || fail "stdin (default)"
/usr/bin/python3 -c "
import json; a, b = json.load(open('in.json')), json.load(open('t.json'))
assert a.pop('file') == '-' and b.pop('file') == 's.kv.h5' and a == b
" && pass "stdin gives the file's figures" || fail "stdin vs file"
grep -q "^simulate    stdin: 16 probe steps" in.txt && pass "stdin named in the table" || fail "stdin table: $(head -1 in.txt)"

# Bad requests: one line, sysexits code.
expect_code 64 kv-offload simulate -b 31 s.kv.h5
expect_err_line "^kv-offload: --budget 31 cannot hold the 1 sink and 1 recent pages of 16 tokens \(32\)$"
expect_code 64 kv-offload simulate -b 64 --fast-capacity 48 s.kv.h5
expect_err_line "^kv-offload: --fast-capacity 48 cannot hold the attended budget of 64 tokens$"
expect_code 64 kv-offload simulate -b 64 --page 8 s.kv.h5
expect_err_line "^kv-offload: --page 8 is outside 16\.\.256$"
expect_code 64 kv-offload simulate -b 512 --page 512 s.kv.h5
expect_err_line "^kv-offload: --page 512 is outside 16\.\.256$"
for bad in foo 25 0,5 25,-1 25,5x; do
  expect_code 64 kv-offload simulate -b 64 --link $bad s.kv.h5
  expect_err_line "^kv-offload: link '$bad' is not pcie5, c2c, nvme or GBPS,LATENCY_US"
done
expect_code 64 kv-offload simulate -b 64 --score other s.kv.h5
expect_err_line "^kv-offload: --score: other not in \{quest,landmark\}"
expect_code 64 kv-offload simulate -b 64 --sink-pages -1 s.kv.h5
expect_err_line "cannot be negative"
expect_code 64 kv-offload simulate s.kv.h5
expect_err_line "--budget is required"
expect_code 64 kv-offload
expect_err_line "^kv-offload: a subcommand is required \(simulate, tier, restore, share\)"
kv-synth --preset stories260k -n 100 -o plain.kv.h5
expect_code 65 kv-offload simulate -b 64 plain.kv.h5
expect_err_line "^kv-offload: simulate needs probe queries \(kv-capture --probe N\)$"
expect_code 66 kv-offload simulate -b 64 missing.kv.h5
expect_err_line "^kv-offload: cannot open 'missing\.kv\.h5'"
[ ! -s out ] && pass "no output on errors" || fail "stdout on error: $(head -c 200 out)"

# Edges (man/kv-offload.1): the budget counts whole pages of P, rounded down, a short last page
# included, and is at least one page even without sink and recent pages; an encoded k/v counts as
# read, decoded f32.
kv-offload simulate --json -b 100 s.kv.h5 > b100.json || fail "budget 100"
expect_code 64 kv-offload simulate --json -b 10 --sink-pages 0 --recent-pages 0 s.kv.h5
expect_err_line "^kv-offload: --budget 10 .*16"
kv-synth --preset stories260k -n 410 --probe 8 -o s410.kv.h5 || fail "synth 410"
kv-offload simulate --json -b 410 s410.kv.h5 > b410.json || fail "budget 410"
kv-offload simulate --json -b 416 s410.kv.h5 > b416.json || fail "budget 416"
kv-compress -s uniform -b 2 s.kv.h5 -o u2.kv.h5 || fail "compress"
kv-offload simulate --json -b 64 u2.kv.h5 > u2.json || fail "simulate encoded"
/usr/bin/python3 - <<'PY2' && pass "whole pages: 100 -> 96 tokens, short last page; encoded = f32 bytes" || fail "page edges"
import json
j = {n: json.load(open(n + ".json")) for n in ("b100", "b410", "b416", "u2")}
assert j["b100"]["tokens_attended"] == 5 * 4 * 16 * 96 and j["b100"]["pages_selected"] == 5 * 4 * 16 * 6
# 410 tokens: 26 pages, the last of 10; a budget of 410 is 25 pages = 24 full + the short recent one.
b = j["b410"]
assert b["tokens_attended"] == 5 * 4 * 8 * (24 * 16 + 10) and b["rel_error"] > 0 and b["pages_fetched"] > 0, b
b = j["b416"]
assert b["tokens_attended"] == 5 * 4 * 8 * 410 and b["rel_error"] < 1e-5 and b["pages_fetched"] == 0, b
u = j["u2"]
assert u["pages_fetched"] > 0 and u["bytes_fetched"] == u["pages_fetched"] * 16 * 8 * 4 * 2, u
PY2

# A real cache: the error falls with the budget, and Quest-selected pages beat SnapKV eviction.
if [ ! -f "$model" ] || [ ! -f "$text" ]; then
  echo "skip: no model or text for the real-cache checks"
  [ "$failures" = 0 ] && exit 77
  finish
fi
kv-capture -m "$model" -f "$text" --ctx 400 --window 32 --attn-stats --probe 64 -o cap.kv.h5 || fail "capture"
for score in quest landmark; do
  for b in 32 64 160 400; do
    kv-offload simulate --json -b $b --score $score cap.kv.h5 > cap-$score-$b.json || fail "$score $b"
  done
done
kv-evict -s snapkv -b 160 cap.kv.h5 | kv-eval -r cap.kv.h5 --json > snap160.json || fail "snapkv 160"
/usr/bin/python3 - <<'PY' && pass "real cache: error monotone in the budget, exact at 400, quest < snapkv at 160" || fail "real cache"
import json
for score in ("quest", "landmark"):
    r = [json.load(open("cap-%s-%d.json" % (score, b))) for b in (32, 64, 160, 400)]
    errs = [x["rel_error"] for x in r]
    print(score, errs)
    assert all(x["score"] == score and x["steps"] == 64 for x in r)
    assert all(a >= b for a, b in zip(errs, errs[1:])) and errs[0] > errs[1] > errs[2] > 0, errs
    assert errs[3] < 1e-5 and r[3]["pages_fetched"] == 0
    for x in r:
        assert x["pages_hit"] + x["pages_fetched"] == x["pages_selected"]
        assert x["bytes_fetched"] == x["pages_fetched"] * 512
quest = json.load(open("cap-quest-160.json"))["rel_error"]
snap = json.load(open("snap160.json"))
assert snap["entries"] == 5 * 4 * 160
print("quest", quest, "snapkv", snap["rel_error"])
assert quest < snap["rel_error"], (quest, snap["rel_error"])
PY

# The man page's example (the same 400 tokens and 64-token probe) prints these figures.
kv-offload simulate -b 160 cap.kv.h5 > ex.txt || fail "man example"
grep -q "^attention   rel. error 0.036701 over 2560 (layer, query head, step) rows; 204800 tokens attended$" ex.txt \
  && grep -q "^fetch       1607 of 12800 selected pages fetched (hit rate 0.874), 803.50 KiB moved, stall 3.216 ms$" ex.txt \
  && pass "man page example figures" || fail "man page example: $(tail -2 ex.txt)"

finish
