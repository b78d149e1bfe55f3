#!/usr/bin/env bash
# kv-merge end to end: nearest, cam and cluster (files and pipes, the mass h5py reads back, the
# rules of merge.h recomputed in numpy), heads (GQA mean-pool, kv-eval on its output), errors.
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

# cam and cluster: files and pipes, the selection kv-evict makes, the mass h5py reads back.
kv-evict -s h2o -b 50 s.kv.h5 -o e.kv.h5 || fail "evict"
for m in cam cluster; do
  kv-merge -m $m -s h2o -b 50 s.kv.h5 -o $m.kv.h5 || fail "$m: file"
  kv-synth --preset stories260k -n 200 --window 16 --attn-stats | kv-merge -m $m -s h2o -b 50 > $m.p.kv.h5 \
    || fail "$m: pipe"
  kv-inspect $m.kv.h5 | grep -q "mass: yes" && pass "$m: kv-inspect shows the mass" || fail "$m: inspect"
done
/usr/bin/python3 - e.kv.h5 cam.kv.h5 cam.p.kv.h5 cluster.kv.h5 cluster.p.kv.h5 <<'PY' \
  && pass "cam, cluster (files, pipes): kv-evict's entries, budget, mass in [1, tokens], merged, rest untouched" \
  || fail "cam/cluster mass"
import sys
import h5py, numpy as np
e = h5py.File(sys.argv[1], "r")
for path in sys.argv[2:]:
    f = h5py.File(path, "r")
    merged = 0
    for l in range(5):
        g, ge = f["layers/%03d" % l], e["layers/%03d" % l]
        off, mass = g["head_offsets"][:], g["mass"][:]
        assert list(off) == [0, 50, 100, 150, 200], (path, l, off)
        assert np.array_equal(g["positions"][:], ge["positions"][:]), (path, l)
        for x in ("attn_acc", "attn_last", "window_q"):
            assert np.array_equal(g[x][:], ge[x][:]), (path, l, x)
        assert mass.dtype == np.float32 and np.all(mass >= 1), (path, l, mass.min())
        k, v, k0, v0 = (a[:].astype(np.float32) for a in (g["k"], g["v"], ge["k"], ge["v"]))
        one = mass == 1  # absorbed nothing: the evicted entry as it was
        assert np.array_equal(k[one], k0[one]) and np.array_equal(v[one], v0[one]), (path, l)
        if path.startswith("cam"):  # cam keeps the kept entry's key
            np.testing.assert_allclose(k, k0, rtol=2e-3, atol=1e-3, err_msg=path)
        for h in range(4):
            total = mass[off[h]:off[h + 1]].sum()
            assert 50 < total <= 200 + 1e-3, (path, l, h, total)
            merged += int((mass[off[h]:off[h + 1]] > 1).sum())
    assert merged > 0, path
    if ".p." in path:  # the pipe gives what the file gives
        q = h5py.File(path.replace(".p.", "."), "r")
        for l in range(5):
            for x in ("k", "v", "mass", "positions", "head_offsets"):
                a, b = f["layers/%03d/%s" % (l, x)][:], q["layers/%03d/%s" % (l, x)][:]
                assert np.array_equal(a, b), (path, l, x)
PY

# The rules of merge.h recomputed in numpy from an f32 input (scores h2o, tova, knorm as
# kv-evict defines them), also on an input that already carries a mass (a merge of a merge).
kv-synth --preset stories260k -n 200 --window 16 --attn-stats --probe 8 --dtype f32 -o f.kv.h5 || fail "synth f32"
cp s.kv.h5 s.orig && cp f.kv.h5 f.orig
kv-merge -m cluster -s h2o -b 100 --tau 0.5 f.kv.h5 -o c100.kv.h5 || fail "cluster -b 100"
refs=""
while read -r src m s tau; do
  tag=$m.$s.${src%%.*}
  tau_option=(--tau "$tau")
  [ "$m" = cam ] && tau_option=()  # cam takes no --tau
  kv-merge -m $m -s $s -b 50 "${tau_option[@]}" $src -o r.$tag.kv.h5 && kv-evict -s $s -b 50 $src -o e.$tag.kv.h5 \
    || fail "reference run $tag"
  refs+="$src $m $s $tau e.$tag.kv.h5 r.$tag.kv.h5"$'\n'
done <<'CASES'
f.kv.h5 cam h2o 0
f.kv.h5 cam tova 0
c100.kv.h5 cam h2o 0
f.kv.h5 cluster h2o 0.9
f.kv.h5 cluster knorm 0.5
c100.kv.h5 cluster tova 0.3
CASES
cat > ref.py <<'PY'
import sys
import h5py, numpy as np
G = 2
for line in open(sys.argv[1]):
    src, method, score, tau, evicted, merged = line.split()
    tau = float(tau)
    fin, fe, fm = (h5py.File(p, "r") for p in (src, evicted, merged))
    for l in range(5):
        gi, ge, gm = (f["layers/%03d" % l] for f in (fin, fe, fm))
        k, v, pos, off = gi["k"][:], gi["v"][:], gi["positions"][:], gi["head_offsets"][:]
        m_in = gi["mass"][:].astype(np.float64) if "mass" in gi else np.ones(len(pos))
        assert np.array_equal(gm["positions"][:], ge["positions"][:]), "selection is not kv-evict's"
        moff = gm["head_offsets"][:]
        for h in range(4):
            rows = np.arange(off[h], off[h + 1]); T = len(rows); B = moff[h + 1] - moff[h]
            kh, vh, mh = k[rows].astype(np.float64), v[rows].astype(np.float64), m_in[rows]
            if score in ("h2o", "tova"):  # the group's mean statistic; h2o keeps B/2 recent
                st = gi["attn_acc" if score == "h2o" else "attn_last"][:]
                s = ((np.float32(0) + st[h * G] / np.float32(G)) + st[h * G + 1] / np.float32(G))[pos[rows]]
                if score == "h2o":
                    s[T - B // 2:] = np.inf
            else:
                s = -np.sqrt((kh ** 2).sum(1)).astype(np.float32)
            kept = np.searchsorted(pos[rows], ge["positions"][moff[h]:moff[h + 1]])
            is_kept = np.zeros(T, bool); is_kept[kept] = True
            slot = -np.ones(T, int); slot[kept] = np.arange(B)
            mm = mh[kept].copy(); mk = kh[kept] * mm[:, None]; mv = vh[kept] * mm[:, None]
            if method == "cam":  # the next kept entry (else the last), weight s_i / s_j in [0, 1]
                thr = min(x for x in s[kept] if np.isfinite(x))
                for i in np.flatnonzero(~is_kept):
                    j = min(np.searchsorted(kept, i, side="right"), B - 1)
                    sj = s[kept[j]] if np.isfinite(s[kept[j]]) else thr
                    w = float(np.clip(np.float32(s[i]) / np.float32(sj), 0, 1)) * mh[i] if sj > 0 else 0.0
                    mv[j] += w * vh[i]; mk[j] += w * kh[kept[j]]; mm[j] += w
            else:  # runs of neighbouring keys with cosine >= tau, Gaussian weights to the pivot
                kn = kh / np.sqrt((kh ** 2).sum(1, keepdims=True))
                a = 0
                while a < T:
                    b = a + 1
                    while b < T and (kn[b - 1] * kn[b]).sum() >= tau:
                        b += 1
                    mem = np.arange(a, b); km = mem[is_kept[mem]]
                    if len(km) and b - a > 1:
                        p = km[np.argmax(s[km])]
                        d2 = ((kh[mem] - kh[p]) ** 2).sum(1); s2 = d2.sum() / (b - a - 1)
                        for i in mem[~is_kept[mem]]:
                            w = (np.exp(-d2[i - a] / (2 * s2)) if s2 > 0 else 1.0) * mh[i]
                            mk[slot[p]] += w * kh[i]; mv[slot[p]] += w * vh[i]; mm[slot[p]] += w
                    a = b
            sl, at = slice(moff[h], moff[h + 1]), "%s layer %d head %d" % (merged, l, h)
            assert mm.sum() > B, "nothing merged: " + at
            np.testing.assert_allclose(gm["mass"][sl], mm, rtol=1e-5, err_msg="mass " + at)
            np.testing.assert_allclose(gm["k"][sl], mk / mm[:, None], rtol=1e-4, atol=1e-5, err_msg="k " + at)
            np.testing.assert_allclose(gm["v"][sl], mv / mm[:, None], rtol=1e-4, atol=1e-5, err_msg="v " + at)
PY
printf '%s' "$refs" > cases.txt
/usr/bin/python3 ref.py cases.txt && pass "cam and cluster follow merge.h (6 cases, 2 on a merged input)" || fail "reference"

# cluster with no set of more than one entry is plain eviction; tau is a cosine; cam needs attention.
kv-merge -m cluster -s h2o -b 50 --tau 1 s.kv.h5 -o t1.kv.h5 || fail "cluster --tau 1"
/usr/bin/python3 - t1.kv.h5 e.kv.h5 <<'PY' && pass "cluster --tau 1 = kv-evict (k, v, positions), mass all 1" || fail "cluster --tau 1"
import sys
import h5py, numpy as np
a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
for l in range(5):
    for x in ("k", "v", "positions", "head_offsets"):
        assert np.array_equal(a["layers/%03d/%s" % (l, x)][:], b["layers/%03d/%s" % (l, x)][:]), (l, x)
    assert np.all(a["layers/%03d/mass" % l][:] == 1), l
PY
expect_code 64 kv-merge -m cluster -s h2o -b 50 --tau 1.01 s.kv.h5 -o y1.kv.h5
expect_err_line "^kv-merge: --tau 1.01 must be a cosine"
expect_code 64 kv-merge -m cam -s knorm -b 50 s.kv.h5
expect_err_line "^kv-merge: cam weighs merges by attention: use --score h2o, tova or snapkv$"
[ -s "$WORK/out" ] && fail "cam --score knorm wrote to stdout" || pass "cam --score knorm: nothing on stdout"
expect_code 64 kv-merge -m cam -s window -b 50 s.kv.h5 -o y2.kv.h5
expect_code 65 kv-merge -m cluster -s h2o -b 50 plain.kv.h5 -o y3.kv.h5

# heads: the GQA mean-pool, exact in f32, to f16 rounding in f16; files and pipes.
kv-merge -m heads --groups 2 f.kv.h5 -o h.kv.h5 || fail "heads"
kv-merge -m heads --groups 2 < s.kv.h5 > h16.kv.h5 || fail "heads pipe"
kv-inspect h.kv.h5 | grep -q "8 query heads, 2 KV heads (group 4)" && pass "heads: kv-inspect shows 2 KV heads" \
  || fail "heads inspect: $(kv-inspect h.kv.h5 | grep shape)"
/usr/bin/python3 - f.kv.h5 h.kv.h5 s.kv.h5 h16.kv.h5 <<'PY' && pass "heads: k, v the mean of heads 2g, 2g+1; positions and side data kept" || fail "heads"
import sys
import h5py, numpy as np
for src, dst in ((sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])):
    a, b = h5py.File(src, "r"), h5py.File(dst, "r")
    assert a.attrs["n_kv_heads"] == 4 and b.attrs["n_kv_heads"] == 2 and b.attrs["n_q_heads"] == 8
    for l in range(5):
        ga, gb = a["layers/%03d" % l], b["layers/%03d" % l]
        assert list(gb["head_offsets"][:]) == [0, 200, 400] and "mass" not in gb, (dst, l)
        pos = ga["positions"][:]
        assert np.array_equal(gb["positions"][:], np.concatenate([pos[0:200], pos[400:600]])), (dst, l)
        for x in ("k", "v"):
            old, new = ga[x][:], gb[x][:]
            assert new.dtype == old.dtype and new.shape == (400, 8), (dst, x, new.dtype, new.shape)
            want = np.concatenate([(old[0:200].astype(np.float64) + old[200:400]) / 2,
                                   (old[400:600].astype(np.float64) + old[600:800]) / 2])
            if old.dtype == np.float32:
                assert np.array_equal(new, want.astype(np.float32)), (dst, l, x)
            else:  # within half an f16 step of the exact mean
                err = np.abs(new.astype(np.float64) - want)
                assert np.all(err <= np.spacing(np.abs(new)).astype(np.float64) / 2), (dst, l, x, err.max())
        for x in ("attn_acc", "attn_last", "window_q", "probe_q"):
            assert (x in ga) == (x in gb), (dst, l, x)
            if x in ga:
                assert np.array_equal(ga[x][:], gb[x][:]), (dst, l, x)
    for x in ("tokens", "window/positions", "probe/positions", "probe/tokens"):
        assert (x in a) == (x in b), (dst, x)
        if x in a:
            assert np.array_equal(a[x][:], b[x][:]), (dst, x)
PY

# kv-eval compares a heads-merged candidate by attention: query head j reads merged head j / 4.
kv-eval -r f.kv.h5 --csv h.kv.h5 > h.csv || fail "eval heads"
kv-merge -m heads --groups 4 f.kv.h5 | kv-eval -r f.kv.h5 --csv > h4.csv || fail "eval --groups 4"
/usr/bin/python3 - <<'PY' || fail "dup.kv.h5"
import h5py, shutil
shutil.copy("f.kv.h5", "dup.kv.h5")  # heads 1 and 3 made copies of heads 0 and 2
f = h5py.File("dup.kv.h5", "r+")
for l in range(5):
    for x in ("k", "v"):
        d = f["layers/%03d/%s" % (l, x)]; a = d[:]
        a[200:400] = a[0:200]; a[600:800] = a[400:600]; d[...] = a
PY
kv-merge -m heads --groups 2 dup.kv.h5 | kv-eval -r dup.kv.h5 --csv > dup.csv || fail "eval dup"
/usr/bin/python3 - h.csv h4.csv dup.csv <<'PY' && pass "kv-eval --csv: heads candidate measured; identity and equal heads give 0" || fail "eval heads: $(cat h.csv h4.csv dup.csv)"
import csv, sys
h, h4, dup = (list(csv.DictReader(open(p))) for p in sys.argv[1:])
assert len(h) == len(h4) == len(dup) == 1
h, h4, dup = h[0], h4[0], dup[0]
assert h["entries"] == "2000" and float(h["ratio_to_reference"]) == 0.5 and float(h["rel_error"]) > 0.1, h
assert h4["entries"] == "4000" and float(h4["rel_error"]) == 0 and float(h4["cosine"]) == 1, h4
assert dup["entries"] == "2000" and float(dup["rel_error"]) < 1e-5 and float(dup["cosine"]) > 0.99999, dup
PY
model="$KV_MODELS_DIR/stories260K.gguf"
text="$KV_DATA_DIR/tinystories_val.txt"
if [ -f "$model" ] && [ -f "$text" ]; then
  kv-capture -m "$model" -f "$text" --ctx 120 --probe 8 -o cap.kv.h5 || fail "capture"
  kv-merge -m heads --groups 2 cap.kv.h5 -o caph.kv.h5 || fail "heads on a capture"
  kv-eval -r cap.kv.h5 --csv caph.kv.h5 | grep -q "^,caph.kv.h5,1200,[0-9]*,[0-9.]*,0.500000," && pass "kv-eval: captured cache, heads merged" \
    || fail "eval capture heads: $(kv-eval -r cap.kv.h5 --csv caph.kv.h5 2>&1)"
  expect_code 64 kv-eval -r cap.kv.h5 -m "$model" caph.kv.h5
  expect_err_line "^kv-eval: --model runs the model's own 4 KV heads; this candidate has 2"
  [ -s "$WORK/out" ] && fail "kv-eval --model wrote a result" || pass "kv-eval --model: no result"
else
  echo "skip: no model or text for kv-eval --model"
fi

# heads refusals: one line, exit 64, nothing written.
expect_code 64 kv-merge -m heads --groups 3 f.kv.h5 -o y4.kv.h5
expect_err_line "^kv-merge: --groups 3 must divide the 4 KV heads$"
expect_code 64 kv-merge -m cam -s h2o -b 50 --groups 2 f.kv.h5 -o y5.kv.h5
expect_err_line "^kv-merge: --groups is for --method heads; this run would ignore it$"
expect_code 64 kv-merge --groups 2 -s h2o -b 50 f.kv.h5 -o y5.kv.h5
expect_code 64 kv-merge -m heads --groups 2 -b 50 f.kv.h5 -o y6.kv.h5
expect_err_line "no --score, --budget"
expect_code 64 kv-merge -m heads --groups 2 --tau 0.5 f.kv.h5 -o y6.kv.h5
expect_code 64 kv-merge -m heads f.kv.h5 -o y7.kv.h5
expect_err_line "heads needs --groups"
kv-evict -s h2o -a adaptive -b 50 f.kv.h5 -o ad.kv.h5 || fail "adaptive"
cp ad.kv.h5 ad.orig
expect_code 64 kv-merge -m heads --groups 2 ad.kv.h5 -o y8.kv.h5
expect_err_line "^kv-merge: heads 0 and 1 hold different positions"
expect_code 64 kv-merge -m heads --groups 2 ad.kv.h5
[ -s "$WORK/out" ] && fail "heads on ragged heads wrote to stdout" || pass "ragged heads: nothing on stdout"
# Heads that hold the same entries in every layer but the last: refused after four layers.
kv-evict -s window -b 50 f.kv.h5 -o w.kv.h5 && kv-evict -s h2o -b 50 f.kv.h5 -o e50.kv.h5 || fail "evict w, e50"
kv-merge -m heads --groups 2 w.kv.h5 -o wh.kv.h5 && pass "heads after window eviction (same entries per head)" \
  || fail "heads after window eviction"
/usr/bin/python3 - <<'PY' || fail "late.kv.h5"
import h5py, shutil
shutil.copy("w.kv.h5", "late.kv.h5")
f, e = h5py.File("late.kv.h5", "r+"), h5py.File("e50.kv.h5", "r")
for x in ("k", "v", "positions"):
    f["layers/004/" + x][...] = e["layers/004/" + x][:]
PY
expect_code 64 kv-merge -m heads --groups 2 late.kv.h5 -o y9.kv.h5
expect_err_line "heads 0 and 1 hold different positions"
expect_code 64 kv-merge -m heads --groups 2 late.kv.h5
[ -s "$WORK/out" ] && fail "late refusal wrote to stdout" || pass "late refusal: nothing on stdout"

ls -A | grep -E '^y[0-9]|\.tmp' && fail "output left after failures" || pass "no output or temporary file after failures"
cmp -s s.kv.h5 s.orig && cmp -s f.kv.h5 f.orig && cmp -s ad.kv.h5 ad.orig && pass "inputs unchanged" \
  || fail "an input changed"
# minicache: pairs from --start share directions; the later layer of a pair stores norms only.
kv-synth --preset stories260k -n 200 --probe 8 -o mc_in.kv.h5 || fail "synth minicache input"
kv-merge -m minicache --start 1 --tau -1 mc_in.kv.h5 -o mc.kv.h5 || fail "minicache"
/usr/bin/python3 - mc_in.kv.h5 mc.kv.h5 <<'PY' && pass "minicache: layer 2 stores norms for layer 1's directions" || fail "minicache layout"
import sys
import h5py, numpy as np
a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
assert isinstance(b["layers/000/k"], h5py.Dataset) and isinstance(b["layers/001/k"], h5py.Dataset)
g = b["layers/002/k"]
assert g.attrs["scheme"] in (b"minicache", "minicache") and int(g.attrs["partner"]) == 1
n = a["layers/002/k"].shape[0]
assert g["merged"].shape[0] == (n + 7) // 8 and g["norms"].shape[0] == n and g["rows"].shape[0] == 0
# Layer 0 is before --start: untouched; pairs (1, 2) and (3, 4).
assert np.array_equal(a["layers/000/k"][:], b["layers/000/k"][:])
assert isinstance(b["layers/003/v"], h5py.Dataset) and int(b["layers/004/v"].attrs["partner"]) == 3
PY
kv-merge -m minicache --tau 1 mc_in.kv.h5 -o mc1.kv.h5 && kv-eval -r mc_in.kv.h5 --csv mc1.kv.h5 | tail -1 > mc1.csv \
  && awk -F, '{ exit !($7 < 1e-3) }' mc1.csv && pass "minicache at tau 1 changes (almost) nothing" || fail "minicache tau 1: $(cat mc1.csv)"
expect_code 64 kv-merge -m minicache -s h2o -b 50 mc_in.kv.h5 -o y6.kv.h5
expect_err_line "minicache merges across layers"
expect_code 64 kv-merge -m minicache --start 9 mc_in.kv.h5 -o y6.kv.h5
expect_err_line "--start 9 is not a layer"
expect_code 64 kv-merge -m cam -s h2o -b 50 --tau 0.5 f.kv.h5 -o y6.kv.h5
expect_err_line "cam weighs merges by attention: it takes no --tau"
# heads refuses heads that carry different masses (after token merging).
kv-merge -s window -b 50 f.kv.h5 -o wn.kv.h5 || fail "window merge"
expect_code 64 kv-merge -m heads --groups 2 wn.kv.h5 -o y6.kv.h5
expect_err_line "carry different masses"
[ ! -e y6.kv.h5 ] && pass "no output after minicache/heads refusals" || fail "y6.kv.h5 left behind"

finish
