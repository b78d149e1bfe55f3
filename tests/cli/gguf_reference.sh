#!/usr/bin/env bash
# kvtk's GGUF code against PyPI's gguf package (gguf-py): our dequantize() against gguf-py's
# dequantizers on a file gguf-py's writer made, and gguf-py's reader on a file our writer made.
# Skips (77) when the PATH python3 lacks gguf/numpy (scripts/setup.sh installs them).
source "$(dirname "$0")/lib.sh"
: "${KV_TEST_BIN:?KV_TEST_BIN must point at the test binaries}"
: "${KV_SOURCE_DIR:?KV_SOURCE_DIR must point at the source tree}"

need_gguf_py
script="$KV_SOURCE_DIR/tests/python/gguf_reference.py"

# 1. gguf-py writes tensors of each type with its reference dequantization; test_gguf compares.
if python3 "$script" write ref.gguf 2>err.txt; then pass "gguf-py wrote ref.gguf"; else fail "gguf_reference.py write: $(cat err.txt)"; fi
KV_GGUF_REFERENCE="$WORK/ref.gguf" "$KV_TEST_BIN/test_gguf" --gtest_filter='GgufReference.MatchesGgufPy' >out.txt 2>&1
rc=$?
cat out.txt
if [ $rc = 0 ] && grep -q '^\[  PASSED  \] 1 test' out.txt && ! grep -q SKIPPED out.txt; then
  pass "dequantize() matches gguf-py for f32 f16 bf16 q8_0 q4_0 q4_K q6_K"
else
  fail "GgufReference.MatchesGgufPy (exit $rc)"
fi

# 2. kvtk's GgufWriter writes a file; gguf-py's GGUFReader checks it.
KV_GGUF_WRITER_OUT="$WORK/ours.gguf" "$KV_TEST_BIN/test_gguf" --gtest_filter='GgufReference.WriteForGgufPy' >out.txt 2>&1
if [ $? = 0 ] && [ -s ours.gguf ]; then pass "GgufWriter wrote ours.gguf"; else fail "GgufReference.WriteForGgufPy: $(tail -5 out.txt)"; fi
if python3 "$script" check-writer ours.gguf; then pass "gguf-py reads GgufWriter's file"; else fail "gguf-py check of GgufWriter's file"; fi

finish
