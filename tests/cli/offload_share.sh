#!/usr/bin/env bash
# kv-offload share: four stories260K caches of prompts sharing a 300-token prefix store their
# prefix pages once, every cache restores exactly, and bad uses are refused.
source "$(dirname "$0")/lib.sh"
export PATH="$KV_TEST_BIN:$PATH"
model="$KV_MODELS_DIR/stories260K.gguf"
text="$KV_DATA_DIR/tinystories_val.txt"
if [ ! -f "$model" ] || [ ! -f "$text" ]; then echo "skip: no model or text"; exit 77; fi

# Token ids of a long capture; prompt i = its first 300 ids + 100 ids from a different place.
kv-capture -m "$model" -f "$text" --ctx 800 -o long.kv.h5 || fail "capture"
/usr/bin/python3 - <<'PY' || fail "token files"
import h5py
t = h5py.File("long.kv.h5", "r")["tokens"][:].tolist()
for i in range(4):
    open("p%d.txt" % i, "w").write(" ".join(map(str, t[:300] + t[300 + 100 * i:400 + 100 * i])))
PY
for i in 0 1 2 3; do kv-capture -m "$model" --tokens p$i.txt -o c$i.kv.h5 || fail "capture $i"; done
sha_before=$(sha256sum c*.kv.h5)
kv-offload share --store store -O shared c0.kv.h5 c1.kv.h5 c2.kv.h5 c3.kv.h5 > report.txt \
  || fail "share: $(cat report.txt)"
# 5 layers x 4 KV heads x 25 pages of 16 (400 tokens); 300 / 16 = 18 whole pages per head are
# prefix pages: 360 per later cache, each 16 x 8 x 2 bytes of k and as much of v.
/usr/bin/python3 - <<'PY' && pass "prefix pages found and stored once (bytes reported)" || fail "report: $(cat report.txt)"
rows = [l.split() for l in open("report.txt") if l.startswith("c")]
assert [r[0] for r in rows] == ["c%d.kv.h5" % i for i in range(4)], rows
for i, r in enumerate(rows):
    pages, total, new, prefix = int(r[1]), float(r[2]), float(r[3]), int(r[4])
    assert pages == 500 and total == 500 * 512, r
    assert prefix == (0 if i == 0 else 360), r
    assert new == (500 * 512 if i == 0 else (500 - 360) * 512), r
last = open("report.txt").read().splitlines()[-1]
assert "1080 of them prefix pages" in last and "saved 540.00 KiB (54.0%)" in last, last
PY
# The store holds each distinct page once: 2 files (k, v) per distinct page.
files=$(ls store/pages | wc -l)
[ "$files" = $(( 2 * (500 + 3 * 140) )) ] && pass "store: $files page files" || fail "store has $files page files"
for i in 0 1 2 3; do
  kv-offload restore shared/c$i.kv.h5 -o r$i.kv.h5 || fail "restore $i"
  [ "$(snaptool digest r$i.kv.h5)" = "$(snaptool digest c$i.kv.h5)" ] \
    && pass "c$i restores exactly" || fail "c$i differs after restore"
done
kv-inspect shared/c2.kv.h5 | grep -q "encoding    k: paged page=16" && pass "shared snapshots are paged" \
  || fail "inspect: $(kv-inspect shared/c2.kv.h5 | grep ^encoding)"
# Sharing again adds nothing: every page is in the store already.
kv-offload share --store store -O shared2 c1.kv.h5 > again.txt && grep -q "^c1.kv.h5 .* 0 " again.txt \
  && [ "$(ls store/pages | wc -l)" = "$files" ] && pass "a second share stores no page" || fail "second share: $(cat again.txt)"

expect_code 64 kv-offload share --store store -O outdir c1.kv.h5 ./c1.kv.h5
expect_err_line "two inputs are named 'c1.kv.h5'"
expect_code 64 kv-offload share --store store -O outdir -
expect_err_line "share reads named snapshots, not stdin"
echo x > afile
expect_code 73 kv-offload share --store afile/store -O outdir c1.kv.h5
expect_err_line "cannot create page store 'afile/store'"
rm -f "store/pages/$(ls store/pages | head -1)"
kv-offload restore shared/c0.kv.h5 -o broken.kv.h5 2>err.txt
[ $? = 65 ] && grep -q "is missing" err.txt && pass "missing page: 65 naming it" || fail "missing page: $(cat err.txt)"
[ ! -e broken.kv.h5 ] && pass "no output after failures" || fail "output left behind"
# Encoded caches are stored tensor by tensor, whole: an equal tensor is stored once.
kv-compress -q -s q8_0 c1.kv.h5 -o q.kv.h5 && cp q.kv.h5 q2.kv.h5 || fail "compress"
n0=$(ls store/pages | wc -l)
kv-offload share --store store -O qshared q.kv.h5 q2.kv.h5 > q.txt || fail "share encoded: $(cat q.txt)"
n1=$(ls store/pages | wc -l)
L=$(/usr/bin/python3 -c "import h5py; print(h5py.File('q.kv.h5')['/'].attrs['n_layers'])")
grep -q "^q2.kv.h5 .* 0 " q.txt && [ $((n1 - n0)) = $((2 * L)) ] \
  && pass "share of two equal q8_0 caches: $((n1 - n0)) objects (k and v of $L layers), the second adds none" \
  || fail "share encoded: $n0 -> $n1 files: $(cat q.txt)"
for q in q q2; do
  kv-offload restore -q qshared/$q.kv.h5 -o $q.r.kv.h5 && /usr/bin/python3 "$CLI_DIR/h5same.py" q.kv.h5 $q.r.kv.h5 \
    && pass "shared encoded $q restores bit for bit" || fail "shared encoded $q restore"
done
[ "$(sha256sum c*.kv.h5)" = "$sha_before" ] && pass "inputs unchanged" || fail "an input changed"
finish
