#!/usr/bin/env bash
# kv-merge end to end: files and pipes, the mass h5py reads back, shared selection options, errors.
source "$(dirname "$0")/lib.sh"

kv-synth --preset stories260k -n 200 --window 16 --attn-stats -o s.kv.h5 || fail "synth"
kv-merge -s h2o -b 50 s.kv.h5 -o m.kv.h5 || fail "merge"
kv-synth --preset stories260k -n 200 --window 16 --attn-stats | kv-merge -s h2o -b 50 --no-provenance > p.kv.h5 || fail "pipe"
/usr/bin/python3 - m.kv.h5 <<'PY' && pass "mass written, conserved per head, budget kept" || fail "mass"
import sys
import h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
for l in range(5):
    g = f["layers/%03d" % l]
    off, mass = g["head_offsets"][:], g["mass"][:]
    for h in range(4):
        assert off[h + 1] - off[h] == 50
        assert abs(mass[off[h]:off[h + 1]].sum() - 200) < 1e-3, mass[off[h]:off[h + 1]].sum()
PY
kv-inspect m.kv.h5 | grep -q "mass: yes" && pass "kv-inspect shows the mass" || fail "inspect: $(kv-inspect m.kv.h5 | grep encoding)"
expect_code 64 kv-merge -s h2o -b 50 --tau 2 s.kv.h5 -o x.kv.h5
expect_err_line "--tau 2 must be a cosine"
expect_code 64 kv-merge -s h2o s.kv.h5 -o x.kv.h5
kv-synth --preset stories260k -n 100 -o plain.kv.h5
expect_code 65 kv-merge -s snapkv -b 50 plain.kv.h5 -o x.kv.h5
expect_err_line "kv-capture --window W"
[ ! -e x.kv.h5 ] && pass "no partial output" || fail "x.kv.h5 left behind"
finish
