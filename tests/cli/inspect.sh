#!/usr/bin/env bash
# kv-inspect's summary, narrowing, statistics, JSON and SVG output on known synthetic data.
source "$(dirname "$0")/lib.sh"

kv-synth --preset stories260k -n 400 --window 16 -o s.kv.h5 || fail "synth"
kv-inspect s.kv.h5 > summary.txt || fail "inspect"
grep -q "^shape       5 layers, 8 query heads, 4 KV heads (group 2), head_dim 8" summary.txt && pass "shape line" || fail "shape: $(cat summary.txt)"
grep -q "^entries     8000 of 8000 token slots (100.0%)" summary.txt && pass "entries" || fail "entries"
# 5 layers x 4 heads x 400 tokens x 8 dims x 2 (k, v) x 2 bytes = 256000 bytes.
grep -q "k+v stored 250.00 KiB, as dense f16 250.00 KiB, ratio 1.000" summary.txt && pass "bytes" || fail "bytes: $(grep bytes summary.txt)"
grep -q "window: 16 queries" summary.txt && pass "side data" || fail "side data"
grep -q "^  kv-synth .* kv-synth --preset stories260k -n 400 --window 16 -o s.kv.h5$" summary.txt && pass "provenance" || fail "provenance: $(tail -2 summary.txt)"

kv-inspect --json --layer 2 --head 1 s.kv.h5 > one.json || fail "json"
/usr/bin/python3 - one.json <<'PY' && pass "json narrowed to layer 2 head 1" || fail "json content"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["entries"] == 400, j["entries"]
assert [l["layer"] for l in j["layers"]] == [2]
assert j["kv_bytes_dense_f16"] == 400 * 4 * 8 * 2 * 2
assert j["model"]["n_kv_heads"] == 4 and j["side_data"]["window"] == 16
assert j["provenance"][0]["program"] == "kv-synth"
PY

kv-inspect --stats --json s.kv.h5 > stats.json || fail "stats"
/usr/bin/python3 - stats.json <<'PY' && pass "stats: every head has outlier channels in the slow pairs" || fail "stats content"
import json, sys
j = json.load(open(sys.argv[1]))
for layer in j["layers"]:
    assert len(layer["heads"]) == 4
    for h in layer["heads"]:
        assert len(h["k_channel_abs_mean"]) == 8
        assert h["outlier_channels"] and min(h["outlier_channels"]) >= 4, h["outlier_channels"]
        assert h["k_norm_max"] >= h["k_norm_mean"] > 0
PY
kv-inspect --stats s.kv.h5 | grep -q "outlier channels: 4" && pass "stats table" || fail "stats table"

kv-inspect --plot heat.svg s.kv.h5 > /dev/null || fail "plot"
rects=$(grep -c '<rect' heat.svg)
# 5 layers x (4 heads x 8 channels) cells + 100 legend swatches.
[ "$rects" = $((5 * 32 + 100)) ] && pass "heat map has one cell per layer and channel" || fail "rects $rects"
/usr/bin/python3 -c "import xml.dom.minidom,sys; xml.dom.minidom.parse('heat.svg')" && pass "SVG is well-formed XML" || fail "SVG parse"
# Layers of different encodings (a minicache partner) are all named, and each layer's in JSON.
kv-synth -n 64 --layers 4 -o mixed-src.kv.h5
kv-merge -m minicache mixed-src.kv.h5 -o mixed.kv.h5
kv-inspect mixed.kv.h5 | grep -qE "^encoding    k: dense f16 \| minicache partner=[0-9]+ dtype=f16, v: " \
  && pass "mixed encodings listed" || fail "mixed: $(kv-inspect mixed.kv.h5 | grep ^encoding)"
kv-inspect --json mixed.kv.h5 | /usr/bin/python3 -c "
import json, sys
j = json.load(sys.stdin)
per = [l['k_encoding'] for l in j['layers']]
assert ' | '.join(dict.fromkeys(per)) == j['k_encoding'], (per, j['k_encoding'])
assert any(e.startswith('minicache') for e in per) and 'dense f16' in per, per
" && pass "per-layer encodings in JSON" || fail "per-layer encodings in JSON"

finish
