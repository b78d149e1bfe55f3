#!/usr/bin/env bash
# kv-evict end to end: every score and allocation through files and pipes, the dry run's JSON
# against the written snapshot (read back with h5py), chaining, stored types, and bad requests.
source "$(dirname "$0")/lib.sh"

kv-synth --preset stories260k -n 400 --window 16 --attn-stats -o s.kv.h5 || fail "synth"
sha_before=$(sha256sum s.kv.h5)

for score in window h2o tova snapkv knorm random; do
  for alloc in uniform pyramid adaptive; do
    kv-evict -s $score -a $alloc -b 100 s.kv.h5 -o e-$score-$alloc.kv.h5 \
      && kv-inspect e-$score-$alloc.kv.h5 > i.txt \
      || { fail "$score + $alloc"; continue; }
    # pyramid's schedule rounds each layer down, so its total may fall a few entries short.
    if [ $alloc = pyramid ]; then
      grep -qE "^entries     19[89][0-9] of 8000" i.txt && pass "$score + $alloc: ~2000 entries" \
        || fail "$score + $alloc: $(grep ^entries i.txt)"
    else
      grep -q "^entries     2000 of 8000 token slots (25.0%)" i.txt && pass "$score + $alloc: 2000 entries" \
        || fail "$score + $alloc: $(grep ^entries i.txt)"
    fi
  done
done
[ "$(sha256sum s.kv.h5)" = "$sha_before" ] && pass "input unchanged" || fail "input modified"

# Ragged heads really free memory: adaptive gives heads different counts, bytes follow entries.
grep -qE "^      [0-9]+ +[0-9]+/100\.0/[0-9]+ +16\.00 +12\.50 KiB" <(kv-inspect e-snapkv-adaptive.kv.h5) \
  && pass "adaptive heads are ragged, 12.5 KiB per layer" || fail "ragged: $(kv-inspect e-snapkv-adaptive.kv.h5 | sed -n 12,18p)"

# A pipe gives the same snapshot as files.
kv-synth --preset stories260k -n 400 --window 16 --attn-stats \
  | kv-evict -s snapkv -a adaptive -r 0.25 --no-provenance > piped.kv.h5 || fail "pipe"
kv-evict -s snapkv -a adaptive -r 0.25 --no-provenance s.kv.h5 -o file.kv.h5 || fail "file"
[ "$("$KV_TEST_BIN/snaptool" digest piped.kv.h5)" = "$("$KV_TEST_BIN/snaptool" digest file.kv.h5)" ] \
  && pass "pipe and file outputs hold the same data" || fail "pipe vs file"

# The dry run writes nothing, and its JSON is what the snapshot holds (h5py as the reader).
kv-evict -s h2o -a adaptive -b 60 --dry-run --json s.kv.h5 > sel.json || fail "dry run"
kv-evict -s h2o -a adaptive -b 60 s.kv.h5 -o h2o.kv.h5 || fail "h2o"
[ "$(ls | grep -c '\.tmp')" = 0 ] && pass "no temporary files left" || fail "temporary files: $(ls)"
/usr/bin/python3 - sel.json h2o.kv.h5 s.kv.h5 <<'PY' && pass "dry-run JSON = snapshot (h5py), rows copied, recent kept" || fail "dry-run JSON vs snapshot"
import json, sys
import h5py, numpy as np
sel = json.load(open(sys.argv[1]))
out, src = h5py.File(sys.argv[2], "r"), h5py.File(sys.argv[3], "r")
assert sel["score"] == "h2o" and sel["alloc"] == "adaptive" and sel["budget"] == 60
assert sel["entries_before"] == 8000 and sel["entries_after"] == 5 * 4 * 60
assert sel["kv_bytes_after"] == 1200 * 8 * 2 * 2
for layer in sel["layers"]:
    g = out["layers/%03d" % layer["layer"]]
    s = src["layers/%03d" % layer["layer"]]
    off, pos, k = g["head_offsets"][:], g["positions"][:], g["k"][:]
    assert sum(layer["kept"]) == 240 and layer["entries"] == [400] * 4
    for h, kept in enumerate(layer["positions"]):
        assert list(pos[off[h]:off[h + 1]]) == kept
        assert kept == sorted(set(kept))
        assert set(range(370, 400)) <= set(kept), "h2o keeps the most recent half of the budget"
        assert np.array_equal(k[off[h]:off[h + 1]], s["k"][h * 400 + np.array(kept)])
PY
kv-evict -s window -b 20 --dry-run s.kv.h5 > dry.txt && grep -q "total        8000 -> 400 entries" dry.txt \
  && pass "human dry run" || fail "human dry run: $(tail -1 dry.txt)"
kv-evict -s window --sink 4 --recent 12 --dry-run --json s.kv.h5 > w.json || fail "window without budget"
/usr/bin/python3 -c "
import json; j = json.load(open('w.json'))
assert j['budget'] == 16
assert all(p == [0, 1, 2, 3] + list(range(388, 400)) for l in j['layers'] for p in l['positions'])
" && pass "window: sinks + recent" || fail "window positions"

# Chains: evict an evicted snapshot; the stored type is kept.
kv-synth --preset stories260k -n 200 --window 8 --attn-stats --dtype bf16 \
  | kv-evict -s snapkv -r 0.5 | kv-evict -s tova -a pyramid -r 0.5 -o chain.kv.h5 || fail "chain"
kv-inspect chain.kv.h5 > chain.txt
grep -q "k: dense bf16, v: dense bf16" chain.txt && pass "bf16 kept" || fail "type: $(grep encoding chain.txt)"
[ "$(grep -c '^  kv-evict' chain.txt)" = 2 ] && pass "two provenance records" || fail "provenance: $(tail -4 chain.txt)"

# Bad requests: one line, sysexits code, no output.
expect_code 64 kv-evict -s snapkv s.kv.h5 -o x.kv.h5
expect_err_line "give --budget N or --ratio r"
expect_code 64 kv-evict -s snapkv -b 0 s.kv.h5 -o x.kv.h5
expect_err_line "--budget 0 must be at least 1"
expect_code 64 kv-evict -s snapkv -b 401 s.kv.h5 -o x.kv.h5
expect_err_line "larger than the sequence \(400 tokens\)"
expect_code 64 kv-evict -s snapkv -r -0.5 s.kv.h5 -o x.kv.h5
expect_err_line "--ratio -0.5 must be in \(0, 1\]"
expect_code 64 kv-evict -s snapkv -r 0 s.kv.h5 -o x.kv.h5
expect_code 64 kv-evict -s snapkv -b 10 -r 0.5 s.kv.h5 -o x.kv.h5
expect_code 64 kv-evict -b 10 s.kv.h5 -o x.kv.h5
expect_code 64 kv-evict -s snapkv -b 10 s.kv.h5 -o x.kv.h5
expect_err_line "keeps 10 entries, fewer than the 16 the snapkv score always keeps"
expect_code 64 kv-evict -s snapkv -b 50 --kernel 4 s.kv.h5 -o x.kv.h5
# An option of another score or allocation is refused, not silently ignored.
expect_code 64 kv-evict -s h2o -b 50 --kernel 7 s.kv.h5 -o x.kv.h5
expect_err_line "--kernel is for --score snapkv"
expect_code 64 kv-evict -s h2o -b 50 --alpha 0.5 s.kv.h5 -o x.kv.h5
expect_err_line "--alpha is for --alloc adaptive"
expect_code 64 kv-evict -s window -b 50 --seed 3 s.kv.h5 -o x.kv.h5
expect_code 64 kv-evict -s h2o -b 50 --json s.kv.h5
expect_err_line "--json prints the selection on stdout"
kv-synth --preset stories260k -n 100 -o plain.kv.h5
expect_code 65 kv-evict -s h2o -b 50 plain.kv.h5 -o x.kv.h5
expect_err_line "^kv-evict: --score h2o needs attention statistics.*kv-capture --attn-stats"
expect_code 65 kv-evict -s snapkv -b 50 plain.kv.h5 -o x.kv.h5
expect_err_line "kv-capture --window W"
expect_code 66 kv-evict -s knorm -b 50 missing.kv.h5 -o x.kv.h5
expect_code 73 kv-evict -s knorm -b 50 s.kv.h5 -o no/such/dir/x.kv.h5
[ ! -e x.kv.h5 ] && pass "no partial output" || fail "x.kv.h5 left behind"
expect_code 64 kv-evict -s knorm -b 50 s.kv.h5 -o s.kv.h5
[ "$(sha256sum s.kv.h5)" = "$sha_before" ] && pass "input still unchanged" || fail "input modified"

# Bytes before and after are k+v as stored (before any codec), as kv-inspect counts them: for an
# encoded input they were those of dense f32 (the decoded values), 7x too many for q4_0.
kv-synth -n 200 --window 8 --attn-stats -o byt.kv.h5
for s in q4_0 kivi mikv; do
  kv-compress -s $s byt.kv.h5 -o byt-$s.kv.h5 || fail "compress $s"
  kv-evict -s h2o -r 0.5 --json byt-$s.kv.h5 -o byt-e-$s.kv.h5 > byt.json || fail "evict $s"
  /usr/bin/python3 - "$s" <<'PY' && pass "$s: bytes before/after as kv-inspect reads them" || fail "$s: bytes $(cat byt.json | head -c 200)"
import json, subprocess, sys
s = sys.argv[1]
j = json.load(open("byt.json"))
stored = lambda f: json.loads(subprocess.check_output(["kv-inspect", "--json", f]))["kv_bytes_stored"]
assert j["kv_bytes_before"] == stored("byt-%s.kv.h5" % s), (j["kv_bytes_before"], stored("byt-%s.kv.h5" % s))
assert j["kv_bytes_after"] == stored("byt-e-%s.kv.h5" % s), (j["kv_bytes_after"], stored("byt-e-%s.kv.h5" % s))
PY
done

finish
