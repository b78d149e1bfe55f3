#!/usr/bin/env bash
# Other HDF5 readers see what libkv wrote: h5py (f16 as numpy float16) and h5dump with our
# zstd plugin on HDF5_PLUGIN_PATH.
source "$(dirname "$0")/lib.sh"
export PATH="$KV_TEST_BIN:$PATH"
PY=/usr/bin/python3
$PY -c "import h5py, numpy" 2>/dev/null || { echo "skip: python3-h5py missing"; exit 77; }
command -v h5dump >/dev/null || { echo "skip: h5dump missing"; exit 77; }

for dtype in f16 f32; do
  for codec in none deflate; do
    kv-synth --preset tiny -n 64 --window 4 --dtype $dtype --codec $codec -o s.kv.h5
    snaptool dump-k s.kv.h5 1 k1.f32
    $PY "$KV_SOURCE_DIR/tests/python/check_h5py.py" s.kv.h5 1 k1.f32 $dtype \
      && pass "h5py reads $dtype/$codec keys as libkv wrote them" || fail "h5py $dtype/$codec"
  done
done

kv-synth --preset tiny -n 64 --codec zstd -o z.kv.h5
snaptool dump-k z.kv.h5 0 k0.f32
HDF5_PLUGIN_PATH="$KV_PLUGIN_DIR" h5dump -d /layers/000/k z.kv.h5 > dump.txt 2> dump.err
if [ -s dump.txt ] && grep -q "FILTERS" -A3 dump.txt || grep -q "DATA {" dump.txt; then
  # Compare the first row h5dump prints with libkv's first key row (to f16 precision).
  $PY - dump.txt k0.f32 <<'PY' && pass "h5dump decodes zstd data with the plugin" || fail "h5dump values"
import re, sys, numpy as np
text = open(sys.argv[1]).read()
data = text[text.index("DATA {"):]
nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.sub(r"\(\d+,\d+\):", "", data))]
want = np.fromfile(sys.argv[2], dtype=np.float32)
got = np.array(nums[: want.size], dtype=np.float32)
assert got.size == want.size, (got.size, want.size)
assert np.allclose(got, want, rtol=1e-3, atol=1e-3), np.abs(got - want).max()
PY
else
  fail "h5dump with plugin: $(head -c 300 dump.err)"
fi
# Without the plugin h5dump cannot decode it: proves the plugin is what made it work.
HDF5_PLUGIN_PATH=/nonexistent h5dump -d /layers/000/k z.kv.h5 > nodump.txt 2>&1
grep -q "DATA {" nodump.txt && grep -qE "^ *\(0,0\): -?[0-9]" nodump.txt && fail "decoded without plugin?" || pass "no plugin, no data"
HDF5_PLUGIN_PATH="$KV_PLUGIN_DIR" $PY "$KV_SOURCE_DIR/tests/python/check_h5py.py" z.kv.h5 0 k0.f32 f16 \
  && pass "h5py reads zstd through the plugin" || fail "h5py zstd"
finish
