#!/usr/bin/env bash
# kv-capture end to end with the real stories260K files (../shared/models): the golden greedy
# continuation from the GGUF file and the llama2.c checkpoint, a capture with every kind of side
# data (identical from both files), pipes, the perplexity figure, and bad input (exit code, one
# line on stderr, no output left behind). Skips (77) when stories260K.gguf is not there.
source "$(dirname "$0")/lib.sh"
: "${KV_MODELS_DIR:?KV_MODELS_DIR must point at the shared models}"
: "${KV_DATA_DIR:?KV_DATA_DIR must point at the shared data}"
: "${KV_TEST_BIN:?KV_TEST_BIN must point at the test binaries}"
: "${KV_SOURCE_DIR:?KV_SOURCE_DIR must point at the source tree}"
export PATH="$KV_TEST_BIN:$PATH"
unset KV_MODEL
# The forward pass opens an OpenMP region per matrix product; with the default active waiting, a
# loaded machine (ctest -j) makes runs tens of times slower. Passive waiting keeps the test quick.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"

GGUF="$KV_MODELS_DIR/stories260K.gguf"
BIN="$KV_MODELS_DIR/stories260K.bin"
TOK="$KV_MODELS_DIR/tok512.bin"
TEXT="$KV_DATA_DIR/tinystories_val.txt"
if [ ! -f "$GGUF" ]; then
  echo "skip: $GGUF is missing"
  exit 77
fi
have_bin=1
if [ ! -f "$BIN" ] || [ ! -f "$TOK" ]; then
  echo "note: $BIN or $TOK is missing: the llama2.c checks are skipped"
  have_bin=0
fi
have_text=1
if [ ! -f "$TEXT" ]; then
  echo "note: $TEXT is missing: the paragraph capture and perplexity checks are skipped"
  have_text=0
fi
have_h5dump=1
command -v h5dump >/dev/null 2>&1 || { echo "note: h5dump missing: checks of stored arrays are skipped"; have_h5dump=0; }

# json FILE FILTER: one value from a JSON file, compact (python3, no jq needed).
json() { python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[int(k)] if isinstance(v, list) else v[k]
print(json.dumps(v) if not isinstance(v, str) else v)' "$1" "$2"; }
# check_json FILE FILTER WANT
check_json() {
  local got; got=$(json "$1" "$2" 2>&1)
  if [ "$got" = "$3" ]; then pass "$1 $2 = $3"; else fail "$1 $2 = $got, want $3"; fi
}
# dataset FILE PATH: a stored array as comma-separated values on one line (h5dump).
dataset() { h5dump -O -y -w 0 -d "$2" "$1" | tr -d ' \n'; }

# 1. Golden greedy continuation (README of ../shared/models): 60 tokens after the 5 of the prompt.
printf '%s\n' "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high." \
  "Lily" >golden.txt
kv-capture -m "$GGUF" -p "Once upon a time" --generate 60 >gen_gguf.txt 2>err.txt
rc=$?
if [ $rc = 0 ] && cmp -s golden.txt gen_gguf.txt; then pass "golden continuation from the GGUF file"
else fail "golden continuation from the GGUF file (exit $rc): $(cat gen_gguf.txt err.txt)"; fi
if [ $have_bin = 1 ]; then
  kv-capture -m "$BIN" --tokenizer "$TOK" -p "Once upon a time" --generate 60 >gen_bin.txt 2>err.txt
  rc=$?
  if [ $rc = 0 ] && cmp -s golden.txt gen_bin.txt; then pass "golden continuation from the llama2.c checkpoint"
  else fail "golden continuation from the llama2.c checkpoint (exit $rc): $(cat gen_bin.txt err.txt)"; fi
fi
# With -o the text still goes to stdout and the snapshot (of the prompt) to the file.
kv-capture -m "$GGUF" -p "Once upon a time" --generate 60 -o gen.kv.h5 >gen_o.txt 2>err.txt
if [ $? = 0 ] && cmp -s golden.txt gen_o.txt && kv-inspect --json gen.kv.h5 >gen.json; then
  pass "--generate with -o prints the continuation and writes a snapshot"
  check_json gen.json n_tokens 5
else
  fail "--generate with -o: $(cat err.txt)"
fi
# The model from KV_MODEL when -m is absent.
if KV_MODEL="$GGUF" kv-capture -p "Once upon a time" --generate 60 >gen_env.txt 2>err.txt && cmp -s golden.txt gen_env.txt; then
  pass "KV_MODEL names the model"
else
  fail "KV_MODEL: $(cat err.txt)"
fi

# 2. The README's logits after "Once upon a time" (tokens 1 403 407 261 378): the same ids as
#    the tokenizer gives, and, as probe row 0 after the prompt 1 403 407 261, the top five logits
#    and their log-sum-exp.
if [ $have_h5dump = 1 ]; then
  kv-capture -m "$GGUF" -p "Once upon a time" -o once.kv.h5 2>err.txt || fail "capture of the prompt: $(cat err.txt)"
  got=$(dataset once.kv.h5 /tokens)
  [ "$got" = "1,403,407,261,378" ] && pass "'Once upon a time' encodes as 1 403 407 261 378" || fail "tokens: $got"
  echo "1 403 407 261 378" >once.ids
  if kv-capture -m "$GGUF" --tokens once.ids --probe 1 --dtype f32 -o probe1.kv.h5 2>err.txt; then
    [ "$(dataset probe1.kv.h5 /tokens)" = "1,403,407,261" ] && [ "$(dataset probe1.kv.h5 /probe/tokens)" = "378" ] \
      && [ "$(dataset probe1.kv.h5 /probe/positions)" = "4" ] && pass "--probe 1 splits off the last input token at position 4" \
      || fail "probe split: tokens $(dataset probe1.kv.h5 /tokens) probe $(dataset probe1.kv.h5 /probe/tokens)"
    dataset probe1.kv.h5 /probe/logits | python3 -c '
import math, sys
v = [float(x) for x in sys.stdin.read().split(",")]
assert len(v) == 512, len(v)
top = sorted(range(512), key=lambda i: -v[i])[:5]
want = [(432, 17.7994), (383, 14.2813), (322, 9.7096), (353, 9.5873), (323, 9.1342)]
assert [i for i, _ in want] == top, top
assert all(abs(v[i] - x) < 2e-3 for i, x in want), [v[i] for i in top]
m = max(v)
lse = m + math.log(sum(math.exp(x - m) for x in v))
assert abs(lse - 17.8311) < 2e-3, lse
' && pass "probe logits row 0 = README's top-5 logits and log-sum-exp" || fail "probe logits differ from the README's"
  else
    fail "capture --tokens --probe 1: $(cat err.txt)"
  fi
fi

# 3. A TinyStories paragraph with every kind of side data, from both model files.
if [ $have_text = 1 ]; then
  awk 'BEGIN { RS = "" } NR == 3 { print; exit }' "$TEXT" >para.txt
  # The whole paragraph, for its token count and ids.
  kv-capture -m "$GGUF" -f para.txt -o full.kv.h5 2>err.txt || fail "capture of the paragraph: $(cat err.txt)"
  kv-inspect --json full.kv.h5 >full.json
  n=$(json full.json n_tokens)
  if [ "$n" -ge 56 ] 2>/dev/null; then pass "paragraph has $n tokens (>= 56)"; else fail "paragraph token count '$n'"; fi
  side=(--ctx 40 --window 8 --attn-stats --probe 16 --dtype f32 --no-provenance)
  if kv-capture -m "$GGUF" -f para.txt "${side[@]}" -o cap_gguf.kv.h5 2>err.txt; then
    pass "capture with --ctx --window --attn-stats --probe"
  else
    fail "capture with side data: $(cat err.txt)"
  fi
  kv-inspect --json cap_gguf.kv.h5 >cap.json
  check_json cap.json n_tokens 40
  check_json cap.json entries 800          # 5 layers x 4 KV heads x 40 positions
  check_json cap.json kept_fraction 1
  check_json cap.json side_data.window 8
  check_json cap.json side_data.attn_stats true
  check_json cap.json side_data.probe 16
  check_json cap.json side_data.probe_logits true
  check_json cap.json model.name stories260K
  check_json cap.json model.sha256 "$(sha256sum "$GGUF" | cut -d' ' -f1)"
  check_json cap.json model.key_rope applied
  if [ $have_h5dump = 1 ]; then
    all=$(dataset full.kv.h5 /tokens)
    want_prompt=$(echo "$all" | cut -d, -f1-40)
    want_probe=$(echo "$all" | cut -d, -f41-56)
    [ "$(dataset cap_gguf.kv.h5 /tokens)" = "$want_prompt" ] && pass "prompt = the first 40 input tokens" || fail "prompt tokens"
    [ "$(dataset cap_gguf.kv.h5 /probe/tokens)" = "$want_probe" ] && pass "probe = the 16 input tokens after the prompt" || fail "probe tokens"
    [ "$(dataset cap_gguf.kv.h5 /probe/positions)" = "$(seq -s, 40 55)" ] && pass "probe positions 40..55" || fail "probe positions"
    [ "$(dataset cap_gguf.kv.h5 /window/positions)" = "$(seq -s, 32 39)" ] && pass "window positions 32..39" || fail "window positions"
    # The prompt's keys are the same as in the capture of the whole paragraph (causality).
    kv-capture -m "$GGUF" -f para.txt --dtype f32 --no-provenance -o full32.kv.h5 2>/dev/null
    python3 - "$(dataset cap_gguf.kv.h5 /layers/004/k)" "$(dataset full32.kv.h5 /layers/004/k)" "$n" <<'PY' \
      && pass "layer 4 keys of the 40-token prompt = those positions of the full capture" || fail "prompt keys differ from the full capture's"
import sys
a = [float(x) for x in sys.argv[1].split(",")]
b = [float(x) for x in sys.argv[2].split(",")]
n = int(sys.argv[3])
# [4 KV heads][positions][8]: head h, position p -> row h * T + p.
for h in range(4):
    for p in range(40):
        ra, rb = a[(h * 40 + p) * 8:(h * 40 + p + 1) * 8], b[(h * n + p) * 8:(h * n + p + 1) * 8]
        assert all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(ra, rb)), (h, p, ra, rb)
PY
    # H2O: each query's attention sums to 1, so a head's attn_acc sums to T; TOVA's row to 1.
    python3 - "$(dataset cap_gguf.kv.h5 /layers/002/attn_acc)" "$(dataset cap_gguf.kv.h5 /layers/002/attn_last)" <<'PY' \
      && pass "attn_acc rows sum to 40, attn_last rows to 1" || fail "attention statistics do not sum as expected"
import sys
acc = [float(x) for x in sys.argv[1].split(",")]
last = [float(x) for x in sys.argv[2].split(",")]
assert len(acc) == len(last) == 8 * 40
for h in range(8):
    assert abs(sum(acc[h * 40:(h + 1) * 40]) - 40) < 1e-3, sum(acc[h * 40:(h + 1) * 40])
    assert abs(sum(last[h * 40:(h + 1) * 40]) - 1) < 1e-4
    assert acc[h * 40 + 39] == last[h * 40 + 39]  # only the last query sees the last token
PY
  fi
  if [ $have_bin = 1 ]; then
    kv-capture -m "$BIN" --tokenizer "$TOK" -f para.txt "${side[@]}" -o cap_bin.kv.h5 2>err.txt \
      || fail "capture from the llama2.c checkpoint: $(cat err.txt)"
    # The digest covers the model's sha256 and context length, which differ between the files
    # (the GGUF metadata says context 2048, the checkpoint 512): compare the data instead.
    same=1
    for l in 0 1 2 3 4; do
      snaptool dump-k cap_gguf.kv.h5 $l k_gguf.f32 && snaptool dump-k cap_bin.kv.h5 $l k_bin.f32 \
        && cmp -s k_gguf.f32 k_bin.f32 || { same=0; fail "layer $l keys differ between .gguf and .bin"; }
    done
    [ $same = 1 ] && pass "keys of every layer identical from .gguf and .bin"
    if command -v h5diff >/dev/null 2>&1; then
      h5diff cap_gguf.kv.h5 cap_bin.kv.h5 >diff.txt 2>&1
      rc=$?
      # Only the root attributes naming the file may differ: every dataset (k, v, window_q,
      # attn_acc, attn_last, probe_q, probe logits, tokens, text) is bit-identical.
      other=$(grep -vE '^attribute: <(model_sha256|context_length) of </>> and <(model_sha256|context_length) of </>>$|^[0-9]+ differences? found$|^$' diff.txt)
      if [ $rc -le 1 ] && [ -z "$other" ]; then pass "h5diff: all arrays identical from .gguf and .bin (only sha256/context differ)"
      else fail "h5diff .gguf vs .bin (exit $rc): $(head -c 600 diff.txt)"; fi
    fi
  fi
fi

# 4. Pipes: the snapshot on stdout into kv-inspect, and the same data as with -o.
kv-capture -m "$GGUF" -p "Once upon a time" --window 2 | kv-inspect --json >pipe.json 2>err.txt
if [ "${PIPESTATUS[0]}" = 0 ] && [ "$(json pipe.json n_tokens)" = 5 ] && [ "$(json pipe.json side_data.window)" = 2 ]; then
  pass "kv-capture | kv-inspect"
else
  fail "kv-capture | kv-inspect: $(cat err.txt)"
fi
kv-capture -m "$GGUF" -p "Once upon a time" --window 2 >stdout.kv.h5 2>/dev/null
kv-capture -m "$GGUF" -p "Once upon a time" --window 2 -o named.kv.h5 2>/dev/null
if [ "$(snaptool digest stdout.kv.h5)" = "$(snaptool digest named.kv.h5)" ]; then pass "stdout and -o hold the same data"
else fail "stdout and -o differ"; fi

# 5. Perplexity of the first 50 paragraphs (the acceptance figure): in [3.5, 5.0].
if [ $have_text = 1 ]; then
  kv-capture -m "$GGUF" --perplexity -f "$TEXT" --ctx 512 >ppl.txt 2>err.txt
  rc=$?
  ppl=$(sed -n 's/^perplexity \([0-9.]*\) over .*/\1/p' ppl.txt)
  if [ $rc = 0 ] && [ -n "$ppl" ] && awk -v p="$ppl" 'BEGIN { exit !(p >= 3.5 && p <= 5.0) }'; then
    pass "perplexity $ppl in [3.5, 5.0]"
  else
    fail "perplexity (exit $rc): $(cat ppl.txt err.txt)"
  fi
  kv-capture -m "$GGUF" --perplexity -f "$TEXT" --ctx 512 --json >ppl.json 2>err.txt
  check_json ppl.json paragraphs 50
  jp=$(json ppl.json perplexity)
  awk -v a="$jp" -v b="$ppl" 'BEGIN { exit !(a - b < 1e-4 && b - a < 1e-4) }' && pass "--json perplexity $jp" || fail "--json perplexity '$jp' vs '$ppl'"
  if [ $have_bin = 1 ]; then
    kv-capture -m "$BIN" --tokenizer "$TOK" --perplexity -f "$TEXT" --ctx 512 >ppl_bin.txt 2>err.txt
    ppl_bin=$(sed -n 's/^perplexity \([0-9.]*\) over .*/\1/p' ppl_bin.txt)
    [ -n "$ppl_bin" ] && [ "$ppl_bin" = "$ppl" ] && pass "same perplexity from the llama2.c checkpoint" \
      || fail "perplexity from .bin '$ppl_bin' vs .gguf '$ppl': $(cat err.txt)"
  fi
fi

# --perplexity writes nothing: an option of a capture is refused (exit 64, one line naming it),
# with no figure printed and no file written, rather than ignored.
# ppl_refuses OPTION ARGS...: kv-capture --perplexity ... ARGS names OPTION.
ppl_refuses() {
  local option=$1; shift
  rm -rf ppdir && mkdir ppdir
  expect_code 64 kv-capture -m "$GGUF" -f "$TEXT" --perplexity --paragraphs 2 "$@"
  expect_err_line \
    "^kv-capture: $option is for a capture \(without --perplexity\); this run would ignore it$"
  if [ -z "$(ls -A ppdir)" ] && [ ! -s "$WORK/out" ]; then pass "--perplexity $*: nothing written"
  else fail "--perplexity $*: left $(ls -A ppdir) $(head -c 100 "$WORK/out")"; fi
}
if [ $have_text = 1 ]; then
  ppl_refuses --window -o ppdir/pp.kv.h5 --window 5 --probe 3
  ppl_refuses --output -o ppdir/pp.kv.h5
  ppl_refuses --probe --probe 3
  ppl_refuses --dtype --dtype f32
  ppl_refuses --attn-stats --attn-stats
  ppl_refuses --probe-file --probe-file "$TEXT"
  ppl_refuses --generate --generate 4
  ppl_refuses --codec --codec zstd
  ppl_refuses --no-provenance --no-provenance
  ppl_refuses --force --force
  ppl_refuses --allow-nonfinite --allow-nonfinite
  # What --perplexity takes still works.
  expect_code 0 kv-capture -m "$GGUF" -f "$TEXT" --perplexity --paragraphs 2 --ctx 64 --json -q -@ 2
  [ "$(json "$WORK/out" paragraphs)" = 2 ] && pass "--perplexity --paragraphs 2 --ctx 64 --json" \
    || fail "--perplexity --paragraphs 2: $(cat "$WORK/out")"
fi

# 6. Bad input. bad CODE PATTERN ARGS...: runs kv-capture ARGS (with -o into an empty directory),
#    checks the exit code, a one-line message matching PATTERN, and that nothing was written
#    (no file, no temporary file, nothing on stdout).
bad() {
  local code=$1 pattern=$2; shift 2
  rm -rf outdir && mkdir outdir
  expect_code "$code" kv-capture "$@" -o outdir/x.kv.h5
  expect_err_line "$pattern"
  if [ -z "$(ls -A outdir)" ] && [ ! -s "$WORK/out" ]; then pass "nothing left behind"
  else fail "left behind: $(ls -A outdir) $(head -c 100 "$WORK/out")"; fi
}
P=(-p "Once upon a time")
echo "Once upon a time there was a text file." >text.txt
bad 65 "'text.txt' is neither a GGUF file nor a llama2.c checkpoint" -m text.txt "${P[@]}"
if [ $have_bin = 1 ]; then
  head -c 500000 "$BIN" >trunc.bin
  bad 65 "'trunc.bin'.*truncated" -m trunc.bin --tokenizer "$TOK" "${P[@]}"
fi
head -c 600000 "$GGUF" >trunc.gguf
bad 65 "'trunc.gguf'.*(truncated|past the end)" -m trunc.gguf "${P[@]}"
head -c 5000 "$GGUF" >trunc_meta.gguf
bad 65 "'trunc_meta.gguf'.*truncated" -m trunc_meta.gguf "${P[@]}"
if python3 -c 'import gguf, numpy' 2>/dev/null; then
  if python3 "$KV_SOURCE_DIR/tests/python/bad_models.py" "$GGUF" gg 2>err.txt; then
    pass "bad_models.py wrote the malformed GGUF files"
    expect_code 0 kv-capture -m gg/copy.gguf "${P[@]}" --generate 60
    cmp -s golden.txt "$WORK/out" && pass "the unaltered gguf-py copy gives the golden text" || fail "gguf-py copy: $(cat "$WORK/out")"
    bad 65 "unsupported architecture 'gpt2'" -m gg/arch.gguf "${P[@]}"
    bad 65 "tensor 'blk.0.attn_q.weight' has shape \[64, 32\].*expected \[64, 64\]" -m gg/shape.gguf "${P[@]}"
    bad 65 "tensor 'blk.0.attn_k.weight' has type q5_0.*(cannot|not)" -m gg/type.gguf "${P[@]}"
  else
    fail "bad_models.py: $(cat err.txt)"
  fi
else
  echo "skip: python3 cannot import gguf and numpy: no GGUF files with a bad architecture, shape or type"
fi
bad 66 "cannot open 'missing.gguf': No such file" -m missing.gguf "${P[@]}"
bad 64 "no model.*-m FILE.*KV_MODEL" "${P[@]}"
bad 66 "cannot open 'missing.txt'" -m "$GGUF" -f missing.txt
bad 66 "cannot open 'missing.ids'" -m "$GGUF" --tokens missing.ids
bad 64 "no prompt.*-p TEXT.*-f FILE.*--tokens FILE" -m "$GGUF"
bad 64 "--perplexity needs -f FILE" -m "$GGUF" --perplexity "${P[@]}"
# Numbers: a word is no integer, a number beyond the option's range is outside it.
bad 64 "^kv-capture: --window: 'abc' is not an integer \(see kv-capture --help\)$" -m "$GGUF" \
  "${P[@]}" --window abc
bad 64 "^kv-capture: --probe: -1 is outside \[0, 16777216\]" -m "$GGUF" "${P[@]}" --probe -1
bad 64 "^kv-capture: --ctx: 0 is outside \[1, 16777216\]" -m "$GGUF" "${P[@]}" --ctx 0
bad 64 "^kv-capture: --generate: 99999999999999999999 is outside" -m "$GGUF" "${P[@]}" \
  --generate 99999999999999999999
# --perplexity's own options are refused in a capture, rather than ignored.
bad 64 "^kv-capture: --paragraphs is for --perplexity; this run would ignore it$" -m "$GGUF" \
  "${P[@]}" --paragraphs 3
bad 64 "^kv-capture: --json is for --perplexity; this run would ignore it$" -m "$GGUF" \
  "${P[@]}" --json
bad 64 "the input has 5 tokens.*--probe 5" -m "$GGUF" "${P[@]}" --probe 5
KV_MODEL="" bad 64 "no model" "${P[@]}"
# An empty prompt (BOS alone). The code says 65 (bad data); 64 would be usage: either is taken.
rm -rf outdir && mkdir outdir
kv-capture -m "$GGUF" -p "" -o outdir/x.kv.h5 >"$WORK/out" 2>"$WORK/err"
rc=$?
if [ $rc = 64 ] || [ $rc = 65 ]; then pass "empty prompt: exit $rc"; else fail "empty prompt: exit $rc"; fi
expect_err_line "prompt is empty"
[ -z "$(ls -A outdir)" ] && pass "nothing left behind" || fail "empty prompt left $(ls -A outdir)"
seq 0 2999 | awk '{ print 3 + $1 % 500 }' >ids3000.txt
bad 64 "3000 tokens.*context.*--ctx" -m "$GGUF" --tokens ids3000.txt
if kv-capture -m "$GGUF" --tokens ids3000.txt --ctx 100 -o ctx100.kv.h5 2>err.txt && kv-inspect --json ctx100.kv.h5 >ctx100.json; then
  check_json ctx100.json n_tokens 100
else
  fail "--tokens with --ctx 100: $(cat err.txt)"
fi
bad 64 "--window 6 is longer than the prompt \(5 tokens\)" -m "$GGUF" "${P[@]}" --window 6
if [ $have_bin = 1 ]; then
  bad 64 "no tokenizer.*--tokenizer" -m "$BIN" "${P[@]}"
fi
echo "1 403 oops" >bad_ids.txt
bad 65 "'oops' is not a token id" -m "$GGUF" --tokens bad_ids.txt
echo "1 403 9999" >big_ids.txt
bad 65 "token id 9999 is outside the vocabulary" -m "$GGUF" --tokens big_ids.txt
# Output that cannot be created: a missing directory (and, when not root, a read-only one).
expect_code 73 kv-capture -m "$GGUF" "${P[@]}" -o no/such/dir/x.kv.h5
expect_err_line "cannot create 'no/such/dir/x.kv.h5'"
if [ "$(id -u)" != 0 ]; then
  rm -rf ro && mkdir ro && chmod 555 ro
  expect_code 73 kv-capture -m "$GGUF" "${P[@]}" -o ro/x.kv.h5
  expect_err_line "cannot create 'ro/x.kv.h5'"
  [ -z "$(ls -A ro)" ] && pass "nothing left in the read-only directory" || fail "left in ro: $(ls -A ro)"
  chmod 755 ro
fi

# Inputs are never overwritten: the snapshot may not land on the model, the prompt or the
# tokenizer (by name or through stdout), and no output is left behind.
cp "$GGUF" m.gguf
expect_code 64 kv-capture -m m.gguf "${P[@]}" -o m.gguf
expect_err_line "is the model \(-m\); choose another name"
cmp -s m.gguf "$GGUF" && pass "-o onto the model: model untouched" || fail "model changed"
expect_code 64 sh -c 'kv-capture -m m.gguf -f text.txt >> text.txt'
expect_err_line "output stdout is the prompt file \(-f\)"
[ "$(cat text.txt)" = "Once upon a time there was a text file." ] && pass "stdout onto the prompt: prompt untouched" || fail "text.txt changed"
# A directory as a text file is "cannot open" (66); a NUL byte in the prompt is bad data.
mkdir -p adir
bad 66 "cannot open 'adir': Is a directory" -m "$GGUF" -f adir
printf 'Once upon\0 a time' > nul.txt
bad 65 "'nul.txt' holds a NUL byte \(at byte 9\)" -m "$GGUF" -f nul.txt
# A bad --codec is refused before the model runs (nothing on stdout).
bad 64 "unknown codec 'lz4'" -m "$GGUF" "${P[@]}" --generate 5 --codec lz4
# Text on stdout that cannot be written is an error, not success.
expect_code 74 sh -c "kv-capture -m '$GGUF' -p 'Once upon a time' --generate 5 > /dev/full"
expect_err_line "cannot write to stdout"
# --generate beyond the context stops at it (no overflow of N + the prompt).
kv-capture -m "$BIN" --tokenizer "$TOK" "${P[@]}" --generate 9223372036854775806 > long.txt 2> err.txt \
  && [ "$(wc -w < long.txt)" -gt 50 ] && pass "--generate 2^63-2: stops at the context" || fail "huge --generate: $(cat err.txt)"
if [ $have_bin = 1 ]; then
  # A model whose weights hold NaN: 65 naming what it computed, no snapshot (not one that every
  # reader then rejects). The .bin's first floats after the 28-byte header are token embeddings.
  /usr/bin/python3 - "$BIN" <<'PY'
import struct, sys
data = bytearray(open(sys.argv[1], "rb").read())
dim = struct.unpack("i", data[:4])[0]
for t in range(512):  # every token's first channel
    data[28 + 4 * t * dim: 32 + 4 * t * dim] = struct.pack("f", float("nan"))
open("nan.bin", "wb").write(data)
open("longer.bin", "wb").write(bytes(open(sys.argv[1], "rb").read()) + b"\0\0\0\0")
open("tok_more.bin", "wb").write(open(sys.argv[1].replace("stories260K.bin", "tok512.bin"), "rb").read() + b"xy")
PY
  bad 65 "the model computed NaN/Inf" -m nan.bin --tokenizer "$TOK" "${P[@]}"
  bad 65 "header implies .*bytes follow" -m longer.bin --tokenizer "$TOK" "${P[@]}"
  bad 65 "2 bytes follow token 511" -m "$BIN" --tokenizer tok_more.bin "${P[@]}"
fi

finish
