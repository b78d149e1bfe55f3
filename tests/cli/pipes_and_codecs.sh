#!/usr/bin/env bash
# Snapshots flow through `a | b` pipes, files and every codec without changing a bit.
source "$(dirname "$0")/lib.sh"
export PATH="$KV_TEST_BIN:$PATH"

kv-synth --preset tiny -n 300 --window 8 --dtype f16 --seed 5 -o direct.kv.h5 || fail "kv-synth to a file"
want=$(snaptool digest direct.kv.h5)

# stdout -> stdin -> stdout ... through each codec and back to a file.
kv-synth --preset tiny -n 300 --window 8 --dtype f16 --seed 5 \
  | snaptool copy --codec zstd - - | snaptool copy --codec deflate,1 - - | snaptool copy - piped.kv.h5 \
  || fail "pipeline"
got=$(snaptool digest piped.kv.h5)
[ "$got" = "$want" ] && pass "pipe through zstd and deflate: identical data" || fail "pipe digest $got != $want"

for codec in none zstd zstd,19 deflate deflate,9; do
  snaptool copy --codec "$codec" direct.kv.h5 "c.kv.h5" || fail "copy with $codec"
  [ "$(snaptool digest c.kv.h5)" = "$want" ] && pass "file with codec $codec: identical" || fail "codec $codec changed the data"
  [ "$(snaptool digest - < c.kv.h5)" = "$want" ] && pass "stdin with codec $codec: identical" || fail "stdin $codec"
done

for dtype in f32 bf16; do
  kv-synth --preset tiny -n 50 --dtype $dtype --codec zstd | kv-inspect --json > i.json || fail "inspect $dtype"
  grep -q "\"k_encoding\":\"dense $dtype\"" i.json && pass "$dtype through a pipe" || fail "$dtype: $(head -c 300 i.json)"
done

# Compressed files really are smaller, and kv-inspect reports the codec.
kv-synth --preset tiny -n 2000 -o plain.kv.h5 && kv-synth --preset tiny -n 2000 --codec zstd -o z.kv.h5
[ "$(stat -c %s z.kv.h5)" -lt "$(stat -c %s plain.kv.h5)" ] && pass "zstd file smaller" || fail "zstd not smaller"
kv-inspect z.kv.h5 | grep -q "codec zstd,3" && pass "inspect names the codec" || fail "codec not shown"

# A FIFO as output and as input (HDF5 cannot seek either: both go through memory images).
mkfifo fifo
kv-synth --preset tiny -n 300 --window 8 --seed 5 -o fifo &
[ "$(snaptool digest fifo)" = "$want" ] && pass "FIFO output then input" || fail "FIFO"
wait

# Writing to /dev/null works and is not replaced by a regular file.
kv-synth --preset tiny -n 10 -o /dev/null && [ -c /dev/null ] && pass "/dev/null stays a device" || fail "/dev/null"
finish
