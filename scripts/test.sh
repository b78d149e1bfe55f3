#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: the release build, the same tests under
# AddressSanitizer + UndefinedBehaviorSanitizer, then the fuzz targets for a short time
# (KV_FUZZ_SECONDS each, default 60). Exit status: 0 when all pass.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
for preset in release asan; do
  echo "== $preset build" >&2
  scripts/build.sh "$preset"
  echo "== $preset tests" >&2
  ctest --preset "$preset" -j "$(nproc)"
done
echo "== fuzz targets" >&2
cmake --preset fuzz -DKV_FUZZ_SECONDS="${KV_FUZZ_SECONDS:-60}" >/dev/null
cmake --build --preset fuzz --target fuzz_snapshot fuzz_gguf fuzz_json fuzz_page_store -j "$(nproc)"
ctest --preset fuzz
