#!/usr/bin/env bash
# kv-synth's options: a shape override given is applied (0 is refused, never taken for "not
# given"), a number outside its option's range or no number at all is refused with exit 64 and one
# line naming the option, nothing is written then, and good values at the ends of the ranges work.
source "$(dirname "$0")/lib.sh"

# refused PATTERN ARGS...: kv-synth ARGS -o x.kv.h5 exits 64 with one line matching PATTERN and
# writes nothing.
refused() {
  local pattern=$1; shift
  rm -f x.kv.h5
  expect_code 64 kv-synth "$@" -o x.kv.h5
  expect_err_line "$pattern"
  [ ! -e x.kv.h5 ] && pass "nothing written: $*" || fail "x.kv.h5 written: $*"
}

# 1. Shape overrides: 0 and negative counts, words, fractions, beyond the cap.
for opt in --layers --q-heads --kv-heads; do
  refused "^kv-synth: $opt: 0 is outside \[1, 4096\] \(see kv-synth --help\)$" $opt 0
  refused "^kv-synth: $opt: -1 is outside \[1, 4096\]" $opt -1
  refused "^kv-synth: $opt: 'two' is not an integer" $opt two
done
refused "^kv-synth: --head-dim: 0 is outside \[2, 4096\]" --head-dim 0
refused "^kv-synth: --layers: 4097 is outside \[1, 4096\]" --layers 4097
refused "^kv-synth: --layers: '1.5' is not an integer" --layers 1.5
refused "^kv-synth: shape needs .*an even head_dim" --head-dim 9

# 2. The RoPE base is finite and positive (a negative or NaN one made NaN keys; inf was stored).
for theta in 0 -5 nan inf -inf 1e999; do
  refused "^kv-synth: --rope-theta: $theta is outside \(0, inf\) \(see kv-synth --help\)$" \
    --rope-theta "$theta"
done
refused "^kv-synth: --rope-theta: 'ten' is not a number" --rope-theta ten
#    The other numeric options: negative, huge (beyond what the option's type holds), words.
refused "^kv-synth: --tokens: 0 is outside \[1, 16777216\]" -n 0
refused "^kv-synth: --tokens: -3 is outside \[1, 16777216\]" --tokens -3
refused "^kv-synth: --tokens: 99999999999999 is outside" --tokens 99999999999999
refused "^kv-synth: --tokens: '1e3' is not an integer" --tokens 1e3
refused "^kv-synth: --window: -1 is outside \[0, 16777216\]" --window -1
refused "^kv-synth: --window: 99999999999 is outside" --window 99999999999
refused "^kv-synth: --window 300 must be in \[0, tokens = 256\]" --window 300
refused "^kv-synth: --probe: -1 is outside \[0, 65536\]" --probe -1
refused "^kv-synth: --probe: 65537 is outside \[0, 65536\]" --probe 65537
refused "^kv-synth: --probe: 99999999999 is outside" --probe 99999999999
refused "^kv-synth: --outlier-pairs: -1 is outside" --outlier-pairs -1
refused "^kv-synth: --outlier-pairs: 99999999999 is outside" --outlier-pairs 99999999999
refused "^kv-synth: --outlier-pairs must be in \[0, head_dim / 2\]" --outlier-pairs 9
refused "^kv-synth: --vocab: 0 is outside \[1, 2147483647\]" --vocab 0
refused "^kv-synth: --vocab: -5 is outside" --vocab -5
refused "^kv-synth: --vocab: 2147483648 is outside" --vocab 2147483648

# 3. The seed is an integer in [0, 2^64 - 1]: -1 no longer wraps, 2^64 and more no longer saturate.
refused "^kv-synth: --seed: -1 is outside \[0, 18446744073709551615\] \(see kv-synth --help\)$" \
  --seed -1
refused "^kv-synth: --seed: 18446744073709551616 is outside" --seed 18446744073709551616
refused "^kv-synth: --seed: 99999999999999999999 is outside" --seed 99999999999999999999
refused "^kv-synth: --seed: 'x' is not an integer" --seed x

# Good values, at the ends of the ranges, are applied.
model_is() {  # model_is FILE FIELD=VALUE...: the model fields kv-inspect --json reports
  local file=$1; shift
  kv-inspect --json "$file" | python3 -c '
import json, sys
j = json.load(sys.stdin)
got = {**j["model"], "n_tokens": j["n_tokens"], "window": j["side_data"]["window"],
       "probe": j["side_data"]["probe"]}
bad = [f"{k}={got.get(k)!r} (want {v})" for k, v in (a.split("=", 1) for a in sys.argv[1:])
       if str(got.get(k)) != v]
sys.exit(", ".join(bad) if bad else 0)' "$@"
}
expect_code 0 kv-synth --layers 1 --q-heads 6 --kv-heads 3 --head-dim 10 --rope-theta 0.5 \
  -n 20 --window 20 --probe 3 --outlier-pairs 5 --vocab 1 -o good.kv.h5
model_is good.kv.h5 n_layers=1 n_q_heads=6 n_kv_heads=3 head_dim=10 rope_dims=10 rope_theta=0.5 \
  n_tokens=20 window=20 probe=3 && pass "overrides applied" || fail "overrides"
expect_code 0 kv-synth --preset llama3-8b --layers 1 --kv-heads 1 --head-dim 2 --outlier-pairs 0 \
  -n 1 -o one.kv.h5
model_is one.kv.h5 n_layers=1 n_q_heads=32 n_kv_heads=1 head_dim=2 rope_theta=500000 n_tokens=1 \
  && pass "the preset keeps what is not overridden" || fail "preset"
for seed in 0 18446744073709551615; do
  expect_code 0 kv-synth --seed $seed -n 16 --no-provenance -o seed$seed.kv.h5
done
expect_code 0 kv-synth --seed 18446744073709551615 -n 16 --no-provenance -o again.kv.h5
cmp -s seed18446744073709551615.kv.h5 again.kv.h5 && ! cmp -s seed0.kv.h5 again.kv.h5 \
  && pass "seed 2^64 - 1: reproducible, not seed 0" || fail "seed 2^64 - 1"
# The default of 2 outlier pairs is cut to head_dim / 2; a value given above it is refused.
kv-synth --head-dim 2 -n 8 -o hd2.kv.h5 && pass "--head-dim 2 with the default outliers" || fail "--head-dim 2"
expect_code 64 kv-synth --head-dim 2 --outlier-pairs 2 -n 8 -o hd2b.kv.h5

finish
