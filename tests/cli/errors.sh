#!/usr/bin/env bash
# Exit codes and one-line messages of the tools; no partial output after a failure.
source "$(dirname "$0")/lib.sh"

expect_code 66 kv-inspect missing.kv.h5
expect_err_line "^kv-inspect: cannot open 'missing.kv.h5': No such file or directory$"

echo "not a snapshot" > text.kv.h5
expect_code 65 kv-inspect text.kv.h5
expect_err_line "^kv-inspect: 'text.kv.h5' is not an HDF5 file"
expect_code 65 kv-inspect < text.kv.h5
expect_err_line "^kv-inspect: stdin is not an HDF5 file"
expect_code 65 kv-inspect < /dev/null
expect_err_line "stdin is empty"

kv-synth -n 100 -o good.kv.h5
head -c 20000 good.kv.h5 > cut.kv.h5
expect_code 65 kv-inspect cut.kv.h5
expect_err_line "truncated or corrupt"
expect_code 65 kv-inspect < cut.kv.h5
expect_err_line "truncated or corrupt"

expect_code 73 kv-synth -n 10 -o no/such/dir/out.kv.h5
expect_err_line "^kv-synth: cannot create 'no/such/dir/out.kv.h5': No such file or directory$"
mkdir ro && chmod 500 ro
if [ "$(id -u)" != 0 ]; then
  expect_code 73 kv-synth -n 10 -o ro/out.kv.h5
fi
[ -z "$(ls -A ro)" ] && pass "no partial output in ro/" || fail "left: $(ls -A ro)"

# A failure in the middle of writing leaves neither the target nor a temporary file.
expect_code 64 kv-synth -n 10 --window 11 -o partial.kv.h5
[ ! -e partial.kv.h5 ] && [ -z "$(ls -A . | grep -v -E '^(good|cut|text)\.kv\.h5$|^ro$|^out$|^err$')" ] \
  && pass "no partial output" || fail "left behind: $(ls -A)"

# A write that fails part way (a file size limit; the disk filling up alike): 74 with the reason,
# one line, no crash in HDF5's clean-up, nothing left behind, an existing output kept whole.
cp good.kv.h5 kept.kv.h5
(
  trap '' XFSZ
  ulimit -f 8
  kv-synth -n 2000 -o big.kv.h5 2> big.err; echo "new $?" > codes
  kv-synth -n 2000 -o kept.kv.h5 2> kept.err; echo "kept $?" >> codes
)
grep -q "^new 74$" codes && [ "$(wc -l < big.err)" = 1 ] && grep -qE "^kv-synth: .*'big.kv.h5'.*: File too large$" big.err \
  && pass "size limit: 74, one line with the reason" || fail "size limit: $(cat codes big.err)"
grep -q "^kept 74$" codes && cmp -s good.kv.h5 kept.kv.h5 && [ ! -e big.kv.h5 ] \
  && [ -z "$(ls -A | grep -i tmp)" ] && pass "size limit: nothing left, the old output whole" \
  || fail "size limit leftovers: $(cat codes; ls -A)"
rm -f kept.kv.h5 big.err kept.err codes

# Interrupted runs (SIGINT) die of the signal (130) and leave no temporary file and no output: a
# long kv-synth (about 2 s) once its hidden temporary file exists, and kv-offload tier while it writes the
# page files of its disk tier. `env --default-signal` because a background job of a script starts
# with SIGINT ignored (and the tools keep an ignored SIGINT ignored, checked last).
# interrupt_when GLOB CMD...: starts CMD, sends it SIGINT once GLOB matches (waits at most 10 s);
# its exit status in $code.
interrupt_when() {
  local glob=$1 i; shift
  "$@" 2>/dev/null &
  local pid=$!
  for ((i = 0; i < 500; i++)); do compgen -G "$glob" >/dev/null && break; sleep 0.02; done
  kill -INT "$pid"
  wait "$pid"; code=$?
}
if env --default-signal=INT true 2>/dev/null; then
  mkdir sig && cd sig
  interrupt_when '.long.kv.h5.tmp*' env --default-signal=INT kv-synth --preset llama3-8b -n 4096 -o long.kv.h5
  [ "$code" = 130 ] && [ -z "$(ls -A)" ] && pass "kv-synth interrupted: 130, nothing left" \
    || fail "kv-synth interrupted: exit $code, left: $(ls -A)"
  kv-synth --preset llama3-8b -n 512 -o ../l8.kv.h5
  interrupt_when 'store/pages/*' env --default-signal=INT \
    kv-offload tier -q -t gpu:4MiB -t disk:store ../l8.kv.h5 -o tiered.kv.h5
  [ "$code" = 130 ] && [ ! -e tiered.kv.h5 ] && [ -z "$(find . -name '*.tmp*')" ] \
    && pass "kv-offload tier interrupted: 130, no output, no temporary file" \
    || fail "kv-offload tier interrupted: exit $code, left: $(find . -name 'tiered*' -o -name '*.tmp*' | head)"
  rm -rf store ../l8.kv.h5
  # SIGINT ignored at the start (nohup, a script's `cmd &`): the run goes on and completes.
  interrupt_when '.kept.kv.h5.tmp*' sh -c 'trap "" INT; exec kv-synth --layers 3000 -n 2 -o kept.kv.h5'
  [ "$code" = 0 ] && [ -s kept.kv.h5 ] && [ "$(ls -A)" = kept.kv.h5 ] \
    && pass "ignored SIGINT stays ignored" || fail "ignored SIGINT: exit $code, left: $(ls -A)"
  cd .. && rm -rf sig
fi

# An output that is a symbolic link is written where it points and the link stays: through
# /proc/self/fd/1 to a redirected stdout (`-o /dev/stdout > file` left the file empty, exit 0,
# and replaced the link), to a regular file, dangling (the target is created), and for charts.
mkdir links && cd links
ln -s /proc/self/fd/1 stdout-link
kv-synth -n 16 -o stdout-link > via-stdout.kv.h5 && [ -L stdout-link ] && kv-inspect via-stdout.kv.h5 >/dev/null \
  && pass "-o link to stdout: the redirected file holds the snapshot" || fail "-o link to stdout: $(ls -l)"
echo old > real.kv.h5 && ln -s real.kv.h5 link.kv.h5
kv-synth -n 16 -o link.kv.h5 && [ -L link.kv.h5 ] && kv-inspect real.kv.h5 >/dev/null \
  && pass "-o link: its target replaced, the link kept" || fail "-o link: $(ls -l)"
ln -s made.kv.h5 dangling.kv.h5
kv-synth -n 16 -o dangling.kv.h5 && [ -L dangling.kv.h5 ] && kv-inspect made.kv.h5 >/dev/null \
  && pass "-o dangling link: its target created" || fail "-o dangling link: $(ls -l)"
ln -s chart.svg chart-link.svg
kv-inspect --plot chart-link.svg real.kv.h5 >/dev/null && [ -L chart-link.svg ] && grep -q "<svg" chart.svg \
  && pass "--plot through a link" || fail "--plot through a link: $(ls -l)"
kv-inspect --plot /dev/stdout real.kv.h5 > piped.svg && grep -q "<svg" piped.svg \
  && pass "--plot /dev/stdout" || fail "--plot /dev/stdout"
[ -z "$(ls -A | grep tmp)" ] && pass "no temporary files" || fail "left $(ls -A | grep tmp)"
cd .. && rm -rf links

# Two snapshots on stdin (or trailing bytes) are refused: the second was dropped without a word.
kv-synth -n 16 -o one.kv.h5 && kv-synth -n 16 --seed 2 -o two.kv.h5
expect_code 65 sh -c 'cat one.kv.h5 two.kv.h5 | kv-inspect'
expect_err_line "^kv-inspect: stdin holds [0-9]+ bytes after the snapshot's end \(byte [0-9]+\): one snapshot at a time$"
expect_code 65 sh -c '(cat one.kv.h5; printf x) | kv-evict -s window -r 0.5 > /dev/null'
expect_code 0 sh -c 'cat one.kv.h5 | kv-inspect'
rm -f one.kv.h5 two.kv.h5

# An input never becomes the output, also through stdin and stdout.
cp good.kv.h5 in.kv.h5
expect_code 64 sh -c 'kv-evict -s window -r 0.5 -o in.kv.h5 < in.kv.h5'
expect_err_line "output 'in.kv.h5' is the input file"
expect_code 64 sh -c 'kv-evict -s window -r 0.5 in.kv.h5 >> in.kv.h5'
expect_err_line "output stdout is the input file"
cmp -s good.kv.h5 in.kv.h5 && pass "input untouched through stdin and stdout" || fail "in.kv.h5 changed"
expect_code 64 kv-inspect --plot in.kv.h5 in.kv.h5
cmp -s good.kv.h5 in.kv.h5 && pass "kv-inspect --plot onto its input: refused" || fail "in.kv.h5 changed by --plot"
expect_code 74 sh -c 'kv-inspect in.kv.h5 > /dev/full'
expect_err_line "^kv-inspect: cannot write to stdout: No space left on device$"
rm -f in.kv.h5

# Options that would do nothing are refused, and a refused run leaves no directory behind.
expect_code 64 kv-merge -m heads --groups 1 --start 1 good.kv.h5 -o m.kv.h5
expect_err_line "^kv-merge: --start is for --method minicache; this run would ignore it$"
expect_code 64 kv-merge -m minicache --start -3 good.kv.h5 -o m.kv.h5
expect_code 64 kv-compress -s q8_0 --dtype f32 good.kv.h5 -o c.kv.h5
expect_err_line "--dtype is the dtype -d decodes to"
expect_code 64 kv-evict -s window --sink -1 -b 8 good.kv.h5 -o e.kv.h5
expect_code 64 kv-offload tier -t gpu:20KiB -t disk:store1 --codec foo good.kv.h5 -o o.kv.h5
expect_code 66 kv-offload share --store store2 -O out2 missing.kv.h5
expect_code 64 kv-offload share --store store3 -O out3 --codec foo good.kv.h5
[ ! -e store1 ] && [ ! -e store2 ] && [ ! -e out2 ] && [ ! -e store3 ] && [ ! -e out3 ] && [ ! -e m.kv.h5 ] \
  && [ ! -e c.kv.h5 ] && [ ! -e e.kv.h5 ] && [ ! -e o.kv.h5 ] && pass "refused runs left nothing" || fail "left: $(ls -A)"

# Numeric options (one check for all tools, tools/common): a word is "not an integer" or "not a
# number", a number beyond the option's range is "outside" it, never the other way round.
expect_code 64 kv-offload -@ abc simulate -b 64 good.kv.h5
expect_err_line "^kv-offload: --threads: 'abc' is not an integer \(see kv-offload --help\)$"
expect_code 64 kv-inspect -@ 2000 good.kv.h5
expect_err_line "^kv-inspect: --threads: 2000 is outside \[0, 1024\] \(see kv-inspect --help\)$"
expect_code 64 kv-synth -@ -1 -o t.kv.h5
expect_err_line "^kv-synth: --threads: -1 is outside \[0, 1024\]"
expect_code 64 kv-evict -s h2o -b 8 --sink abc good.kv.h5 -o e.kv.h5
expect_err_line "^kv-evict: --sink: 'abc' is not an integer"
expect_code 64 kv-evict -s h2o -b 8 --recent 99999999999 good.kv.h5 -o e.kv.h5
expect_err_line "^kv-evict: --recent: 99999999999 is outside \[0, 1073741824\]"
expect_code 64 kv-eval -r good.kv.h5 --topk 0x good.kv.h5
expect_err_line "^kv-eval: --topk: '0x' is not an integer"
expect_code 64 kv-eval -r good.kv.h5 --topk 0 good.kv.h5
expect_err_line "^kv-eval: --topk: 0 is outside \[1, 1048576\]"
expect_code 64 kv-merge -m minicache --start x good.kv.h5 -o m.kv.h5
expect_err_line "^kv-merge: --start: 'x' is not an integer"
expect_code 64 kv-merge -m minicache --slerp nan good.kv.h5 -o m.kv.h5
expect_err_line "^kv-merge: --slerp: nan is outside \[0, 1\]"
expect_code 64 kv-merge -m minicache --slerp half good.kv.h5 -o m.kv.h5
expect_err_line "^kv-merge: --slerp: 'half' is not a number"
#   The seed of the random score: an integer in [0, 2^64 - 1], not wrapped (-1) or saturated.
expect_code 64 kv-evict -s random -b 8 --seed -1 good.kv.h5 -o e.kv.h5
expect_err_line "^kv-evict: --seed: -1 is outside \[0, 18446744073709551615\]"
expect_code 64 kv-merge -s random -b 8 --seed 99999999999999999999 good.kv.h5 -o m.kv.h5
expect_err_line "^kv-merge: --seed: 99999999999999999999 is outside \[0, 18446744073709551615\]"
expect_code 64 kv-evict -s random -b 8 --seed one good.kv.h5 -o e.kv.h5
expect_err_line "^kv-evict: --seed: 'one' is not an integer"
[ ! -e t.kv.h5 ] && [ ! -e e.kv.h5 ] && [ ! -e m.kv.h5 ] && pass "refused numbers left nothing" \
  || fail "left: $(ls -A)"
#   Good values still work: the seeds and a slerp at the ends of their ranges, 1024 threads.
for seed in 0 18446744073709551615; do
  kv-evict -s random -b 8 --seed $seed --no-provenance good.kv.h5 -o e$seed.kv.h5 \
    && kv-evict -s random -b 8 --seed $seed --no-provenance -@ 1 good.kv.h5 -o f$seed.kv.h5 \
    && cmp -s e$seed.kv.h5 f$seed.kv.h5 && pass "kv-evict --seed $seed" \
    || fail "kv-evict --seed $seed"
done
! cmp -s e0.kv.h5 e18446744073709551615.kv.h5 && pass "seeds 0 and 2^64 - 1 differ" \
  || fail "seeds 0 and 2^64 - 1 select the same"
expect_code 0 kv-merge -s random -b 8 --seed 18446744073709551615 good.kv.h5 -o m2.kv.h5
expect_code 0 kv-merge -m minicache --start 0 --slerp 1 good.kv.h5 -o m3.kv.h5
expect_code 0 kv-inspect -@ 1024 good.kv.h5

expect_code 64 kv-synth --bogus
expect_err_line "^kv-synth: The following argument was not expected: --bogus \(see kv-synth --help\)$"
expect_code 64 kv-synth --codec lz4 -o x.kv.h5
expect_err_line "unknown codec 'lz4'"
[ ! -e x.kv.h5 ] && pass "no output after a usage error" || fail "x.kv.h5 exists"
expect_code 64 kv-synth --preset gpt5
expect_err_line "unknown preset 'gpt5'"
expect_code 64 kv-inspect --layer 9 good.kv.h5
expect_err_line "--layer 9 is outside \[0, 2\)"

if [ -z "$(command -v nvidia-smi)" ]; then
  expect_code 69 kv-inspect --device cuda good.kv.h5
  expect_err_line "^kv-inspect: --device cuda: "
fi

# A terminal is refused as binary output and as input (needs `script` for a pseudo-terminal).
if command -v script >/dev/null; then
  script -qec "$KV_BIN/kv-synth -n 5" /dev/null > tty.log 2>&1
  code=$?
  [ "$code" = 64 ] && grep -q "refusing to write a binary snapshot to a terminal" tty.log \
    && pass "terminal output refused" || fail "terminal output: $code $(cat tty.log)"
  script -qec "$KV_BIN/kv-inspect" /dev/null > tty.log 2>&1
  code=$?
  [ "$code" = 64 ] && grep -q "refusing to read a snapshot from a terminal" tty.log \
    && pass "terminal input refused" || fail "terminal input: $code $(cat tty.log)"
fi

expect_code 0 kv-synth --version
grep -q "kv-synth (kvtk) " out && pass "version line" || fail "version: $(cat out)"
expect_code 0 kv-inspect --help
finish
