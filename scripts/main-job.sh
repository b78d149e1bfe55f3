#!/usr/bin/env bash
# Sets everything up and runs the main job. Until kv-capture exists, the job makes an
# 8B-shaped synthetic snapshot (a few thousand tokens) and inspects it; the snapshot is left in
# out/ for the next tools.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh release
export PATH="$PWD/build/bin:$PATH"
mkdir -p out
kv-synth --preset llama3-8b --tokens "${KV_TOKENS:-2048}" --window 32 --codec zstd -o out/synth.kv.h5
kv-inspect --stats --plot out/synth-keys.svg out/synth.kv.h5 | head -n 40
echo "main-job: wrote out/synth.kv.h5 and out/synth-keys.svg" >&2
