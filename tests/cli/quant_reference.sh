#!/usr/bin/env bash
# kvtk's q8_0 and q4_0 encoders against PyPI's gguf package (gguf-py): test_quant writes values
# chosen for the edge cases, gguf-py quantizes and dequantizes them, test_quant compares bytes
# and values bit for bit. Skips (77) when the PATH python3 lacks gguf/numpy (scripts/setup.sh
# installs them).
source "$(dirname "$0")/lib.sh"
: "${KV_TEST_BIN:?KV_TEST_BIN must point at the test binaries}"
: "${KV_SOURCE_DIR:?KV_SOURCE_DIR must point at the source tree}"

need_gguf_py
bin="$KV_TEST_BIN/test_quant"
[ -x "$bin" ] || { echo "FAIL: $bin is not built"; exit 1; }
script="$KV_SOURCE_DIR/tests/python/quant_reference.py"

# ran_one OUT TEST: the gtest run in OUT passed exactly one test and skipped none.
ran_one() { grep -q '^\[  PASSED  \] 1 test' "$1" && ! grep -q SKIPPED "$1"; }

# 1. test_quant writes the inputs.
KV_QUANT_INPUTS_OUT="$WORK/values.f32" "$bin" --gtest_filter='QuantReference.WriteInputs' >out.txt 2>&1
if [ $? = 0 ] && ran_one out.txt && [ -s values.f32 ]; then pass "test_quant wrote values.f32"; else fail "QuantReference.WriteInputs: $(tail -5 out.txt)"; fi

# 2. gguf-py quantizes and dequantizes them.
if python3 "$script" values.f32 ref 2>err.txt; then pass "gguf-py quantized values.f32"; else fail "quant_reference.py: $(cat err.txt)"; fi

# 3. test_quant compares.
KV_QUANT_REFERENCE="$WORK/ref" "$bin" --gtest_filter='QuantReference.MatchesGgufPy' >out.txt 2>&1
rc=$?
cat out.txt
if [ $rc = 0 ] && ran_one out.txt; then
  pass "encode_q8_0/encode_q4_0 and their decoders match gguf-py bit for bit"
else
  fail "QuantReference.MatchesGgufPy (exit $rc)"
fi

finish
