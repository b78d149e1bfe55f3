# The manual pages: every page renders without a groff/man warning, every tool has a page, every
# long option a tool's --help lists is documented on its page, and every option a page documents
# in its OPTIONS section is one the tool accepts.
source "$(dirname "$0")/lib.sh"
: "${KV_SOURCE_DIR:?KV_SOURCE_DIR must point at the source tree}"
MAN_DIR="$KV_SOURCE_DIR/man"

if ! command -v man >/dev/null 2>&1 || ! command -v groff >/dev/null 2>&1; then
  echo "skip: man or groff is not installed"
  exit 77
fi
export LC_ALL=C.UTF-8 MANWIDTH=80 MANPAGER=cat PAGER=cat

# Groff source with the escaped hyphen \- written as a plain hyphen, for grepping option names.
plain_source() { sed 's/\\-/-/g' "$1"; }

# 1. Each page renders with no warnings (man --warnings runs groff with -w).
shopt -s nullglob
pages=("$MAN_DIR"/*.[157])
if [ "${#pages[@]}" = 0 ]; then fail "no man pages in $MAN_DIR"; fi
for page in "${pages[@]}"; do
  name=$(basename "$page")
  if ! man --warnings -l "$page" >"$WORK/rendered" 2>"$WORK/warnings"; then
    fail "$name: man -l failed: $(head -c 300 "$WORK/warnings")"
  elif [ -s "$WORK/warnings" ]; then
    fail "$name: warnings: $(head -c 600 "$WORK/warnings")"
  elif ! grep -q '^NAME' "$WORK/rendered"; then
    fail "$name: rendered page has no NAME section"
  else
    pass "$name renders without warnings"
  fi
done

# The format and overview pages exist alongside the tool pages.
for page in kvsnap.5 kv.7; do
  if [ -f "$MAN_DIR/$page" ]; then pass "$page exists"; else fail "$page is missing"; fi
done

# 2. Every tool has a page that documents each long option of its --help (and of its
#    subcommands' --help), and documents no
#    option (in the tags of its OPTIONS section) that the tool does not accept.
tools=("$KV_BIN"/kv-*)
if [ "${#tools[@]}" = 0 ]; then fail "no kv-* tools in $KV_BIN"; fi
for bin in "${tools[@]}"; do
  [ -x "$bin" ] && [ -f "$bin" ] || continue
  tool=$(basename "$bin")
  page="$MAN_DIR/$tool.1"
  if [ ! -f "$page" ]; then
    fail "$tool has no man page ($page)"
    continue
  fi
  pass "$tool has a page"
  if ! "$bin" --help >"$WORK/help" 2>&1; then
    fail "$tool --help failed: $(head -c 300 "$WORK/help")"
    continue
  fi
  # Subcommands (kv-eval report) have their own --help: their options count as the tool's.
  for sub in $(awk '/^Subcommands:/{f = 1; next} f && /^  [a-z]/{print $1} f && /^$/{f = 0}' "$WORK/help"); do
    "$bin" "$sub" --help >>"$WORK/help" 2>&1 || fail "$tool $sub --help failed"
  done
  plain_source "$page" >"$WORK/source"
  options=$(grep -oE -- '--[a-z][a-z0-9-]*' "$WORK/help" | sort -u)
  if [ -z "$options" ]; then fail "$tool --help lists no long options"; fi
  missing=""
  for opt in $options; do
    # The whole option, not a prefix of a longer one (--layer is not --layers).
    grep -qE -- "${opt}([^a-z0-9-]|\$)" "$WORK/source" || missing="$missing $opt"
  done
  if [ -z "$missing" ]; then
    pass "$tool.1 documents all $(echo "$options" | wc -l) long options of --help"
  else
    fail "$tool.1 does not document:$missing"
  fi
  # Tags of .TP items in the OPTIONS section: the line after each .TP, up to the next .SH.
  documented=$(awk '/^\.SH /{in_opts = ($2 == "OPTIONS")} in_opts && tag {print} {tag = /^\.TP/}' \
                 "$WORK/source" | grep -oE -- '--[a-z][a-z0-9-]*' | sort -u)
  extra=""
  for opt in $documented; do
    grep -qE -- "${opt}([^a-z0-9-]|\$)" "$WORK/help" || extra="$extra $opt"
  done
  if [ -z "$extra" ]; then
    pass "$tool.1 documents no option the tool lacks"
  else
    fail "$tool.1 documents options $tool --help does not list:$extra"
  fi
done

finish
