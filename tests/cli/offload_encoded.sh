#!/usr/bin/env bash
# kv-offload tier and restore on encoded caches: every kv-compress scheme (and kv-merge's
# minicache, and a cache with only its keys encoded) goes through the tiers and comes back bit
# for bit (h5py: every dataset, type and attribute). Encoded tensors move whole: the tiered file
# holds an "external" group naming one store object whose bytes are the arrays as stored; every
# tool reads the tiered snapshot as the encoded one; a damaged object fails with 65 naming it.
source "$(dirname "$0")/lib.sh"
PY=/usr/bin/python3
$PY -c "import h5py, numpy" 2>/dev/null || { echo "skip: python3-h5py missing"; exit 77; }
same() { $PY "$CLI_DIR/h5same.py" "$1" "$2"; }

# head_dim 64: q8_0/q4_0 blocks and groups of 32 align to rows; attention statistics for mikv.
SY=(--preset stories260k --layers 3 --q-heads 4 --kv-heads 2 --head-dim 64 -n 300 --window 16
    --attn-stats --probe 8)
kv-synth "${SY[@]}" -o in.kv.h5 || fail "synth"
cases=(
  "uniform" "uniform -b 2 --axis channel -r 16" "uniform -b 3 --symmetric" "uniform --hadamard"
  "kivi" "q8_0" "q4_0 --hadamard" "fp8" "fp8 --format e5m2 --scale tensor" "svd --rank 8"
  "svd --energy 0.9 --factors f32 --pre-rope" "kvquant" "mikv" "q4_0 --tensors k"
)
i=0
for c in "${cases[@]}"; do
  i=$((i + 1))
  # shellcheck disable=SC2086
  kv-compress -q -s $c in.kv.h5 -o e$i.kv.h5 || { fail "compress $c"; continue; }
done
kv-merge -q -m minicache --tau 0.5 in.kv.h5 -o e$((i + 1)).kv.h5 || fail "minicache"
cases+=("minicache (kv-merge)")
n=${#cases[@]}

# The encoded arrays of a file: (layer/tensor, scheme, bytes).
cat > groups.py <<'PY'
import sys, h5py
f = h5py.File(sys.argv[1], "r")
for name, g in f["layers"].items():
    for t in ("k", "v"):
        o = g[t]
        if isinstance(o, h5py.Group):
            s = o.attrs["scheme"].decode()
            inner = o.attrs["inner"].decode() if "inner" in o.attrs else "-"
            n = sum(o[a].nbytes for a in o)
            print(name, t, s, inner, n)
PY

rt_bad=0 ext_bad=0
for i in $(seq 1 $n); do
  c=${cases[$((i - 1))]}
  # a) everything in the disk tier; b) a fast tier of a third of the cache before it.
  total=$($PY groups.py e$i.kv.h5 | awk '{s += $5} END {print s}')
  for run in a b; do
    tiers=(-t disk:st$i$run)
    [ $run = b ] && tiers=(-t "gpu:$((total / 3 + 1))" -t disk:st$i$run)
    if ! kv-offload tier -q "${tiers[@]}" e$i.kv.h5 -o t$i$run.kv.h5 \
        || ! kv-offload restore -q t$i$run.kv.h5 -o r$i$run.kv.h5 || ! same e$i.kv.h5 r$i$run.kv.h5; then
      fail "$c ($run): tier + restore is not bit-identical"; rt_bad=$((rt_bad + 1)); continue
    fi
    # The tiered file: every encoded group of the input is external (a) or some are (b), each
    # naming one object of the store, with the input's scheme as its inner scheme.
    $PY groups.py e$i.kv.h5 | awk '{print $1, $2, $3}' > in.groups
    $PY groups.py t$i$run.kv.h5 > t.groups
    ext=$(awk '$3 == "external"' t.groups | wc -l)
    want=$(wc -l < in.groups)
    bad=$(join <(awk '{print $1 "/" $2, $3}' in.groups | sort) \
               <(awk '{print $1 "/" $2, $3, $4, $5}' t.groups | sort) \
          | awk '!(($3 == "external" && $4 == $2 && $5 == 32) || ($3 == $2 && $4 == "-"))' | wc -l)
    if [ "$bad" != 0 ] || { [ $run = a ] && [ "$ext" != "$want" ]; } \
        || { [ $run = b ] && [ "$want" -gt 2 ] && { [ "$ext" = 0 ] || [ "$ext" = "$want" ]; }; }; then
      fail "$c ($run): $ext of $want encoded groups external, $bad wrong: $(cat t.groups)"
      ext_bad=$((ext_bad + 1))
    fi
  done
done
[ $rt_bad = 0 ] && pass "$n encodings, all on disk and split with a fast tier: restore = input bit for bit (h5py)"
[ $ext_bad = 0 ] && pass "$n encodings: encoded groups become external (inner = their scheme, one 32-byte id) on disk, stay as they were in the fast tier"

# Tools read a tiered encoded snapshot as the encoded one: same values, same scheme.
kv-eval -q --json -r e11.kv.h5 t11a.kv.h5 > ev.json \
  && $PY -c "import json,sys; j=json.load(open('ev.json')); e=j['rel_error']; sys.exit(0 if e == 0 else 1)" \
  && pass "kv-eval: tiered kvquant vs kvquant: zero error" || fail "kv-eval on tiered: $(head -c 300 ev.json)"
kv-inspect t6a.kv.h5 | grep -q "external(q8_0) store=$PWD/st6a" && pass "kv-inspect names external(q8_0) and its store" \
  || fail "inspect: $(kv-inspect t6a.kv.h5 | grep -i encod)"
kv-evict -q -s window -b 100 t5b.kv.h5 -o ev5.kv.h5 && kv-evict -q -s window -b 100 e5.kv.h5 -o ev5e.kv.h5 \
  && same ev5e.kv.h5 ev5.kv.h5 && pass "kv-evict on the tiered kivi cache = on the kivi cache" \
  || fail "kv-evict on tiered"

# A damaged or missing object: 65 naming it, no output; the input is not touched.
obj=$(ls st6a/pages | head -1); id=${obj%.*}
sha=$(sha256sum t6a.kv.h5)
cp st6a/pages/$obj keep
printf 'x' | dd of=st6a/pages/$obj bs=1 seek=40 conv=notrunc status=none
expect_code 65 kv-offload restore t6a.kv.h5 -o x.kv.h5
expect_err_line "layer [0-9]+: '[kv]': page store '$PWD/st6a': page $id: content does not match its id"
rm st6a/pages/$obj
expect_code 65 kv-inspect --stats t6a.kv.h5
expect_code 65 kv-eval -r e6.kv.h5 t6a.kv.h5
expect_err_line "page $id: file '$PWD/st6a/pages/$obj' is missing$"
[ ! -e x.kv.h5 ] && [ "$(sha256sum t6a.kv.h5)" = "$sha" ] && pass "no output; tiered input unchanged" \
  || fail "output left or input changed"
cp keep st6a/pages/$obj
kv-offload restore -q t6a.kv.h5 -o fixed.kv.h5 && same e6.kv.h5 fixed.kv.h5 && pass "the repaired store restores exactly" \
  || fail "repaired store"
finish
