#!/usr/bin/env bash
# The page store under failure and tampering: a refused or failed run leaves the store as it was
# and no output; outputs never land inside a store; sizes from a manifest are checked before
# anything is allocated for them; a page file that cannot be read says why.
source "$(dirname "$0")/lib.sh"

kv-synth -n 200 --window 8 --attn-stats --probe 8 -o cap.kv.h5
kv-synth -n 64 --seed 2 -o small.kv.h5
tiers=(-t gpu:8KiB)
sum() { find "$@" -type f -exec sha256sum {} + 2>/dev/null | sort | sha256sum; }

# A misspelled subcommand is named (CLI11 said only "A subcommand is required").
expect_code 64 kv-offload -q -@ 1 tierr cap.kv.h5
expect_err_line "^kv-offload: 'tierr' is not a subcommand \(simulate, tier, restore, share\)"
expect_code 64 kv-offload
expect_err_line "^kv-offload: a subcommand is required \(simulate, tier, restore, share\)"

# simulate: page counts in 64 bits (2^31 - 1 sink pages used to wrap into a budget that fits).
expect_code 64 kv-offload simulate -b 32 --sink-pages 2147483647 --recent-pages 1 cap.kv.h5
expect_err_line "cannot hold the 2147483647 sink and 1 recent pages"
# simulate and share take no output options (they were accepted and ignored).
expect_code 64 kv-offload simulate -b 64 -o /nonexistent/x.kv.h5 cap.kv.h5
expect_err_line "^kv-offload: --output does not apply to simulate"
expect_code 64 kv-offload simulate -b 64 --codec bogus cap.kv.h5
expect_err_line "^kv-offload: --codec does not apply to simulate"
expect_code 64 kv-offload share --store S -O O -o x.kv.h5 cap.kv.h5
expect_err_line "^kv-offload: --output does not apply to share"
[ ! -e S ] && [ ! -e O ] && pass "refused share made nothing" || fail "share left $(ls)"

# tier: options that would be ignored or ambiguous.
expect_code 64 kv-offload tier -t gpu:1MiB --page-codec zstd cap.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: --page-codec applies to page files: it needs a disk:DIR tier$"
expect_code 64 kv-offload tier -t gpu:10KiB -t gpu:1MiB cap.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: two tiers are named 'gpu'$"
expect_code 64 kv-offload tier -t gpu:8KiB -t disk:d3:1KiB cap.kv.h5 -o x.kv.h5
expect_err_line "raise a tier's capacity, or give the disk tier none"
[ ! -e d3 ] && [ ! -e x.kv.h5 ] && pass "refused tier made nothing" || fail "left $(ls)"

# A NaN key let in by --allow-nonfinite makes simulate's error NaN (JSON null) where it reaches
# the attention, rather than counting its rows as exact.
cp cap.kv.h5 nan.kv.h5
/usr/bin/python3 -c "
import h5py
f = h5py.File('nan.kv.h5', 'r+'); k = f['layers/001/k']; a = k[:]; a[3, 2] = float('nan'); k[...] = a
" || fail "write a NaN"
kv-offload simulate -b 64 --allow-nonfinite --json nan.kv.h5 > nan.json || fail "simulate nan"
/usr/bin/python3 -c "
import json, math
j = json.load(open('nan.json'))
assert j['rel_error'] is None, j['rel_error']
assert j['layers'][1]['rel_error'] is None and math.isfinite(j['layers'][0]['rel_error']), j['layers']
" && pass "NaN keys: NaN error" || fail "NaN keys: $(head -c 300 nan.json)"

# Sizes and names as documented, nothing looser (spaces, hex, exponents, signs were taken).
for t in "gpu: 1MiB" gpu:0x100000 gpu:1e6 gpu:-1 gpu:. gpu:1..2K; do
  expect_code 64 kv-offload tier -t "$t" cap.kv.h5 -o x.kv.h5
  expect_err_line "capacity '.*' is not a size such as 512MiB or 2GiB$"
done
expect_code 64 kv-offload tier -t DISK:1MiB cap.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: tier 'DISK:1MiB': the page store tier is spelled disk:DIR$"
expect_code 64 kv-offload tier -t "g u:1MiB" cap.kv.h5 -o x.kv.h5
kv-offload -q tier -t gpu:1.5MiB cap.kv.h5 -o x.kv.h5 && pass "gpu:1.5MiB" || fail "gpu:1.5MiB"
# A link too slow to give a finite transfer time (a denormal rate printed "stall inf ms").
expect_code 64 kv-offload simulate -b 64 --link 1e-320,1 cap.kv.h5
# The store as snapshots name it: absolute, no trailing separator.
kv-offload -q tier "${tiers[@]}" -t disk:slash/ cap.kv.h5 -o slash.kv.h5 || fail "tier slash/"
kv-inspect slash.kv.h5 | grep -q "store=$PWD/slash," && pass "store path normalized" ||
  fail "store path: $(kv-inspect slash.kv.h5 | grep -m1 store=)"

# A store is made only when the run gets that far: refused runs leave no directory.
mkdir adir
expect_code 73 kv-offload -q tier "${tiers[@]}" -t disk:new cap.kv.h5 -o adir
[ ! -e new ] && pass "no store left by a run whose output cannot be made" || fail "new/ left"
mkdir other && echo '{"format":"other"}' > other/manifest.json
expect_code 65 kv-offload -q tier "${tiers[@]}" -t disk:other cap.kv.h5 -o x.kv.h5
[ ! -e other/pages ] && pass "no pages/ made in a store that is not one" || fail "pages/ made"

# Outputs and inputs inside the store this run writes, or inside any existing store.
expect_code 64 kv-offload -q tier "${tiers[@]}" -t disk:os cap.kv.h5 -o os/manifest.json
expect_err_line "^kv-offload: the output 'os/manifest.json' is inside the page store .* this run writes"
kv-offload -q tier "${tiers[@]}" -t disk:st cap.kv.h5 -o t.kv.h5 || fail "tier"
before=$(sum st t.kv.h5)
for out in st/manifest.json st/pages/x.raw st/x.kv.h5; do
  expect_code 64 kv-offload restore t.kv.h5 -o "$out"
  expect_err_line "^kv-offload: output '$out' is inside the page store '.*/st'; write it elsewhere$"
  expect_code 64 kv-evict --score window --ratio 0.5 t.kv.h5 -o "$out"
done
cp small.kv.h5 st/in.kv.h5
expect_code 64 kv-offload -q tier "${tiers[@]}" -t disk:st st/in.kv.h5 -o y.kv.h5
expect_err_line "^kv-offload: the input 'st/in.kv.h5' is inside the page store 'st' this run writes"
rm st/in.kv.h5
[ "$(sum st t.kv.h5)" = "$before" ] && pass "store and tiered snapshot unchanged" ||
  fail "store changed"
kv-offload restore t.kv.h5 -o r.kv.h5 && pass "store still reads" || fail "restore"

# A failed write of the output (here stdout on a full device) leaves the store as it found it.
kv-offload -q tier "${tiers[@]}" -t disk:st small.kv.h5 -o - >/dev/full 2>err
code=$?
[ "$code" = 74 ] && pass "exit 74 on a full stdout" || fail "exit $code on a full stdout"
[ "$(sum st t.kv.h5)" = "$before" ] && [ -n "$(ls st/pages)" ] &&
  pass "store as it was after a failed output" || fail "store changed after a failed output"

# A damaged page already in the store: the read-back check refuses the run (also with -q) and
# the existing output stays whole.
cp -r st dmg
kv-offload -q tier "${tiers[@]}" -t disk:dmg cap.kv.h5 -o d.kv.h5 || fail "tier dmg"
page=$(ls dmg/pages | head -1)
printf '\xff' | dd of="dmg/pages/$page" bs=1 seek=3 conv=notrunc 2>/dev/null
cp small.kv.h5 keep.kv.h5
kept=$(sha256sum < keep.kv.h5)
manifest=$(sha256sum < dmg/manifest.json)
for q in "" -q; do
  expect_code 65 kv-offload $q tier "${tiers[@]}" -t disk:dmg cap.kv.h5 -o keep.kv.h5
  expect_err_line "content does not match its id \(corrupt page\)$"
done
[ "$(sha256sum < keep.kv.h5)" = "$kept" ] && [ "$(sha256sum < dmg/manifest.json)" = "$manifest" ] &&
  pass "output and manifest kept after the check failed" || fail "output or manifest changed"
[ -z "$(ls -a | grep tmp)" ] && pass "no temporary files" || fail "left $(ls -a | grep tmp)"

# An edited manifest size is refused before any allocation (it asked for 10^12 bytes).
cp -r st big
kv-offload -q tier "${tiers[@]}" -t disk:big --page-codec zstd cap.kv.h5 -o bz.kv.h5 || fail "tier"
python3 - <<'EOF'
import json
p = "big/manifest.json"
m = json.load(open(p))
for e in m["pages"]:
    e["bytes"] = 10**12
json.dump(m, open(p, "w"))
EOF
# (No ulimit -v: ASan's shadow memory needs more address space. Without the check, the
# allocation fails with 70, "out of memory", or takes the machine's memory.)
expect_code 65 kv-offload restore bz.kv.h5 -o rz.kv.h5
expect_err_line "holds 1000000000000 bytes where [0-9]+ are needed$"
[ ! -e rz.kv.h5 ] && pass "no output" || fail "rz.kv.h5 left"

# share: checked before anything is made; a failure later leaves nothing of the run.
cp cap.kv.h5 c0.kv.h5
expect_code 64 kv-offload share --store S1 -O . c0.kv.h5
expect_err_line "^kv-offload: OUTDIR would overwrite the input 'c0.kv.h5'$"
touch afile
expect_code 73 kv-offload share --store S1 -O afile c0.kv.h5
expect_err_line "^kv-offload: OUTDIR 'afile' is not a directory$"
expect_code 65 kv-offload share --store S1 -O O1 c0.kv.h5 d.kv.h5
[ ! -e S1 ] && [ ! -e O1 ] && pass "failed share left no store or OUTDIR" || fail "left $(ls)"
kv-offload share --store S2 -O O2 c0.kv.h5 small.kv.h5 > table.txt || fail "share"
before=$(sum S2 O2)
expect_code 65 kv-offload share --store S2 -O O2 small.kv.h5 d.kv.h5
[ "$(sum S2 O2)" = "$before" ] && pass "failed share left the store and OUTDIR as they were" ||
  fail "share changed the store"
expect_code 64 kv-offload share --store S2 -O S2 c0.kv.h5
expect_err_line "^kv-offload: the OUTDIR 'S2' is inside the page store 'S2' this run writes"

# A page file or manifest that cannot be read says why (66), not that it is missing.
# (As root, run as nobody; skipped where nobody cannot run the tools, e.g. a build in a 700
# directory.)
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null && as_nobody kv-offload --version >/dev/null 2>&1; then
  chmod 711 "$WORK"  # (mktemp made it 700: nobody must reach perm/)
  mkdir -m 777 perm && cp t.kv.h5 perm/ && cp -r st perm/st && chmod -R a+rX perm
  kv-offload -q tier "${tiers[@]}" -t disk:perm/st cap.kv.h5 -o perm/p.kv.h5 && chmod a+r perm/p.kv.h5
  chmod 000 perm/st/manifest.json
  expect_code 66 as_nobody kv-offload restore perm/p.kv.h5 -o perm/r1.kv.h5
  expect_err_line "cannot read '.*/manifest.json': Permission denied$"
  chmod 644 perm/st/manifest.json
  chmod 000 "perm/st/pages/$(ls perm/st/pages | head -1)"
  expect_code 66 as_nobody kv-offload restore perm/p.kv.h5 -o perm/r2.kv.h5
  expect_err_line "Permission denied$"
else
  echo "skip: permission checks (not root, or nobody cannot run the tools here)"
fi
finish
