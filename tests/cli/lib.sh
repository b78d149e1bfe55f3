# Shared helpers for the CLI tests (sourced). Each test runs in its own temporary directory.
set -u
: "${KV_BIN:?KV_BIN must point at the built tools}"
export PATH="$KV_BIN:$PATH"
# This directory, for the shared Python checkers (h5same.py).
CLI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CLI_DIR
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
failures=0
pass() { echo "ok: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
# expect_code CODE CMD...: runs CMD, checks its exit status, and keeps stderr in $WORK/err.
expect_code() {
  local want=$1; shift
  "$@" >"$WORK/out" 2>"$WORK/err"
  local got=$?
  if [ "$got" = "$want" ]; then pass "exit $want: $*"; else fail "exit $got (want $want): $* -- $(head -c 300 "$WORK/err")"; fi
}
# expect_err_line PATTERN: stderr of the last expect_code is one line matching PATTERN.
expect_err_line() {
  local lines; lines=$(wc -l <"$WORK/err")
  if [ "$lines" = 1 ] && grep -qE -- "$1" "$WORK/err"; then pass "message: $1"; else fail "stderr not one line matching '$1': $(cat "$WORK/err")"; fi
}
finish() { if [ "$failures" = 0 ]; then echo "all passed"; exit 0; else echo "$failures failed"; exit 1; fi; }
# need_gguf_py: skips the test (77) when the PATH python3 cannot import gguf and numpy (PyPI's
# gguf-py, the reference for the GGUF and llama.cpp-quantization tests; scripts/setup.sh installs it).
need_gguf_py() {
  if ! python3 -c 'import gguf, numpy' 2>/dev/null; then
    echo "skip: python3 cannot import gguf and numpy"
    exit 77
  fi
}
