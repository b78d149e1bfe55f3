#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: the release build, then the same tests
# under AddressSanitizer + UndefinedBehaviorSanitizer. Exit status: 0 when all pass.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
for preset in release asan; do
  echo "== $preset build" >&2
  scripts/build.sh "$preset"
  echo "== $preset tests" >&2
  ctest --preset "$preset" -j "$(nproc)"
done
