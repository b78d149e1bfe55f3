#!/usr/bin/env bash
# Sets everything up and runs the main job: capture the KV cache of the bundled model over a
# TinyStories prompt (with observation window, attention statistics and a 64-token probe),
# evict three quarters of it with three strategies, quantize it (KIVI 2-bit, and SnapKV's
# quarter chained into KIVI), evaluate each against the full cache (kv-eval: attention fidelity
# and next-token KL), and print the model's perplexity. Outputs go to out/.
#   KV_MODEL   model file (default ../shared/models/stories260K.gguf)
#   KV_TEXT    prompt text (default ../shared/data/tinystories_val.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh release
export PATH="$PWD/build/bin:$PATH"
model=${KV_MODEL:-../shared/models/stories260K.gguf}
text=${KV_TEXT:-../shared/data/tinystories_val.txt}
if [ ! -f "$model" ]; then
  echo "main-job: model '$model' not found: set KV_MODEL to a GGUF file or llama2.c checkpoint" >&2
  exit 66
fi
mkdir -p out
kv-capture -m "$model" -f "$text" --ctx 400 --window 32 --attn-stats --probe 64 -o out/capture.kv.h5
kv-inspect --stats --plot out/capture-keys.svg out/capture.kv.h5
# Strategies: a quarter of the cache kept by StreamingLLM, H2O, and SnapKV with AdaKV's budgets.
kv-evict --score window --ratio 0.25 out/capture.kv.h5 -o out/window.kv.h5
kv-evict --score h2o --ratio 0.25 out/capture.kv.h5 -o out/h2o.kv.h5
kv-evict --score snapkv --alloc adaptive --ratio 0.25 out/capture.kv.h5 -o out/snapkv.kv.h5
kv-inspect out/snapkv.kv.h5
# Quantization, alone and chained after eviction (kv-evict keeps the encoding it is given).
kv-compress --scheme kivi out/capture.kv.h5 -o out/kivi.kv.h5
kv-compress --scheme kivi out/snapkv.kv.h5 -o out/snapkv-kivi.kv.h5
kv-inspect out/snapkv-kivi.kv.h5
# What each strategy cost: attention fidelity on the probe and the model's next-token KL.
rm -f out/results.jsonl
for s in window h2o snapkv snapkv-kivi; do
  kv-eval --ref out/capture.kv.h5 -m "$model" --label "$s-25%" --append out/results.jsonl out/$s.kv.h5
done
kv-eval --ref out/capture.kv.h5 -m "$model" --label "kivi-2" --append out/results.jsonl out/kivi.kv.h5
kv-capture -m "$model" --perplexity -f "$text" --ctx 512
echo "main-job: wrote out/capture.kv.h5, out/{window,h2o,snapkv,kivi,snapkv-kivi}.kv.h5, out/results.jsonl and out/capture-keys.svg" >&2
