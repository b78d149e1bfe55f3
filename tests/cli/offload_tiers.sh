#!/usr/bin/env bash
# kv-offload tier and restore end to end: tier + restore is bit-identical (f16, f32, bf16, ragged
# heads, mass; pages of 16/64/256, raw and zstd page files, every placement policy; files and
# pipes), placement follows its rules (an independent model of the tiers, checked against the
# stderr report and the snapshot's external flags), the page store holds exactly its pages
# (manifest, sizes, ids = SHA-256 of the content, equal pages once, no temporaries), every tool
# reads a tiered snapshot transparently, bad requests and damaged stores fail with one line and a
# sysexits code leaving nothing behind, and a run killed with SIGKILL never damages the store.
source "$(dirname "$0")/lib.sh"
export PATH="$KV_TEST_BIN:$PATH"
PY=/usr/bin/python3
$PY -c "import h5py, numpy" 2>/dev/null || { echo "skip: python3-h5py missing"; exit 77; }
command -v snaptool >/dev/null || { echo "FAIL: no snaptool in KV_TEST_BIN"; exit 1; }
dg() { snaptool digest "$1" 2>/dev/null || echo "digest-failed:$1"; }

# ---- the checker (h5py + numpy): placement model, paged decoding, store and snapshot comparison
cat > check.py <<'PY'
import hashlib, json, os, shutil, subprocess, sys
import h5py, numpy as np
sys.path.insert(0, os.environ["CLI_DIR"])
from h5same import compare_files, raw

def tsize(obj):
    if isinstance(obj, h5py.Group):
        return {"f32": 4, "f16": 2, "bf16": 2}[obj.attrs["dtype"].decode()]
    return obj.id.get_type().get_size()

def hb(x):
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    u = 0
    while x >= 1024 and u < 4:
        x /= 1024
        u += 1
    return ("%.2f %s" if u else "%.0f %s") % (x, units[u])

def model_pages(path, P, S, R, place):
    """kv-offload tier's pages as the man page/headers define them, in (layer, head, page) order."""
    f = h5py.File(path, "r")
    L, D = int(f.attrs["n_layers"]), int(f.attrs["head_dim"])
    G = int(f.attrs["n_q_heads"]) // int(f.attrs["n_kv_heads"])
    pages = []
    for l in range(L):
        g = f["layers/%03d" % l]
        off, pos = g["head_offsets"][:], g["positions"][:]
        rb = D * (tsize(g["k"]) + tsize(g["v"]))
        if place == "attention":
            acc = g["attn_acc"][()].astype(np.float32)
            imp = np.zeros(len(pos), np.float32)
            for h in range(len(off) - 1):
                a, b = off[h], off[h + 1]
                for j in range(h * G, (h + 1) * G):
                    imp[a:b] = (imp[a:b] + acc[j, pos[a:b]]).astype(np.float32)
        idx = 0
        for h in range(len(off) - 1):
            a, b = int(off[h]), int(off[h + 1])
            npg = (b - a + P - 1) // P
            for i in range(npg):
                r = a + i * P
                n = min(P, b - r)
                if place == "recent":
                    heat = float(pos[r + n - 1])
                elif place == "prefix":
                    heat = -float(pos[r])
                else:
                    heat = float(np.cumsum(imp[r:r + n].astype(np.float64))[-1])
                pages.append(dict(layer=l, idx=idx, head=h, i=i, np=npg, bytes=n * rb, rows=n,
                                  always=(i < S or i >= npg - R), heat=heat, pos0=int(pos[r])))
                idx += 1
    return pages

def model_place(pages, caps):
    """The placement rule of offload.h: sink/recent pages in the first tier, the rest by heat
    (ties: earlier layer, earlier page) into the first tier with room. None when it cannot."""
    room = [c if c >= 0 else 1 << 62 for c in caps]
    for p in pages:
        p["tier"] = 0 if p["always"] else -1
    a = sum(p["bytes"] for p in pages if p["always"])
    if a > room[0]:
        return None
    room[0] -= a
    rest = sorted((p for p in pages if not p["always"]), key=lambda p: (-p["heat"], p["layer"], p["idx"]))
    for p in rest:
        for t in range(len(room)):
            if room[t] >= p["bytes"]:
                room[t] -= p["bytes"]
                p["tier"] = t
                break
        if p["tier"] < 0:
            return None
    return pages

def parse_caps(tiers):
    names, caps, disk = [], [], -1
    for t in tiers.split(","):
        name, rest = t.split(":", 1)
        names.append(name)
        if name == "disk":
            disk = len(names) - 1
            caps.append(int(rest.split(":")[1]) if ":" in rest else -1)
        else:
            caps.append(int(rest))
    return names, caps, disk

def store_dir(tiers):
    for t in tiers.split(","):
        if t.startswith("disk:"):
            return t.split(":")[1]
    return None

def read_store(store, codec=None):
    """The manifest, checked against the directory: exactly the listed page files, no temporaries,
    sizes as 'stored', decoded sizes as 'bytes', SHA-256 of the decoded content = id."""
    m = json.load(open(os.path.join(store, "manifest.json")))
    assert m["format"] == "kvtk-page-store" and m["version"] == 1, m.get("format")
    ents = m["pages"]
    ids = [e["id"] for e in ents]
    assert len(set(ids)) == len(ids), "duplicate ids in the manifest"
    assert sorted(os.listdir(store)) == ["manifest.json", "pages"], sorted(os.listdir(store))
    files = sorted(os.listdir(os.path.join(store, "pages")))
    assert sorted(e["file"] for e in ents) == ["pages/" + x for x in files], \
        ("page files != manifest", len(files), len(ents), sorted(set(files) - {e["file"][6:] for e in ents})[:4])
    content = {}
    zst = [e for e in ents if e["file"].endswith(".zst")]
    unz = b""
    have_zstd = shutil.which("zstd") is not None  # without the zstd CLI: sizes and magic only
    if zst and have_zstd:
        unz = subprocess.run(["zstd", "-dcq"] + [os.path.join(store, e["file"]) for e in zst],
                             check=True, stdout=subprocess.PIPE).stdout
    o = 0
    for e in ents:
        assert e["file"] in ("pages/%s.raw" % e["id"], "pages/%s.zst" % e["id"]), e
        if codec:
            assert e["file"].endswith(".zst" if codec == "zstd" else ".raw"), (codec, e)
        data = open(os.path.join(store, e["file"]), "rb").read()
        assert len(data) == e["stored"], e
        if e["file"].endswith(".zst"):
            assert data[:4] == b"\x28\xb5\x2f\xfd", e
            if not have_zstd:
                content[e["id"]] = None
                continue
            data = unz[o:o + e["bytes"]]
            o += e["bytes"]
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["id"], e
        content[e["id"]] = data
    assert o == len(unz)
    return m, content

def referenced_ids(path):
    f = h5py.File(path, "r")
    out = []
    for l in range(int(f.attrs["n_layers"])):
        for t in ("k", "v"):
            o = f["layers/%03d/%s" % (l, t)]
            if isinstance(o, h5py.Group):
                out += [bytes(r).hex() for r in o["ids"][:].reshape(-1, 32)]
    return out

def check_case(name, inp, page, codec, place, sink, recent, tiers):
    page, sink, recent = int(page), int(sink), int(recent)
    tfile, rfile = name + ".t.kv.h5", name + ".r.kv.h5"
    names, caps, disk = parse_caps(tiers)
    store = store_dir(tiers)
    # 1. the restored snapshot is the input, bit for bit (h5py), and so are the tiered file's
    #    other datasets.
    compare_files(inp, rfile)
    compare_files(inp, tfile, skip_kv=True)
    # 2. placement: the model's tiers against the report and the external flags.
    pages = model_place(model_pages(inp, page, sink, recent, place), caps)
    assert pages is not None, "the model cannot place this case"
    cnt = [sum(1 for p in pages if p["tier"] == t) for t in range(len(names))]
    byt = [sum(p["bytes"] for p in pages if p["tier"] == t) for t in range(len(names))]
    total = sum(p["bytes"] for p in pages)
    err = open(name + ".err").read().splitlines()
    want = ["kv-offload: tier %-6s %6d pages, %s%s" % (n, c, hb(b), "" if cap < 0 else " of " + hb(cap))
            for n, c, b, cap in zip(names, cnt, byt, caps)]
    assert err[:len(names)] == want, (err, want)
    # the report adds up to the cache, and the first tier holds the sink and recent pages
    import re
    rep = [re.match(r"kv-offload: tier (\S+) +(\d+) pages, ", x) for x in err[:len(names)]]
    assert sum(int(r.group(2)) for r in rep) == len(pages)
    assert sum(byt) == total
    n_always = sum(1 for p in pages if p["always"])
    assert int(rep[0].group(2)) >= n_always and byt[0] >= sum(p["bytes"] for p in pages if p["always"])
    ndisk = cnt[disk] if disk >= 0 else 0
    if ndisk:
        assert len(err) == len(names) + 1 and re.match(
            r"kv-offload: disk %s: wrote %s at [0-9.]+ GB/s \(synced\), read its [0-9]+ pages \([0-9.]+ [KMG]?i?B\) "
            r"back at [0-9.]+ GB/s; modelled nvme read: 6\.00 GB/s$" % (re.escape(store), re.escape(hb(byt[disk]))),
            err[-1]), err
    else:
        assert len(err) == len(names), err
    f = h5py.File(tfile, "r")
    src = h5py.File(inp, "r")
    L = int(f.attrs["n_layers"])
    if disk < 0:
        for l in range(L):
            assert isinstance(f["layers/%03d/k" % l], h5py.Dataset)
        compare_files(inp, tfile)
        assert store is None
        return "no disk tier: dense"
    _, content = read_store(store, codec)
    refs = referenced_ids(tfile)
    assert set(refs) == set(content), "the store holds pages no snapshot names, or lacks some"
    # 3. the paged groups, decoded by hand (local rows + store pages) = the input's bytes
    D = int(f.attrs["head_dim"])
    for l in range(L):
        lp = [p for p in pages if p["layer"] == l]
        flags = np.array([p["tier"] == disk for p in lp], np.uint8)
        for t in ("k", "v"):
            g = f["layers/%03d/%s" % (l, t)]
            assert isinstance(g, h5py.Group), (l, t)
            at = dict(g.attrs)
            assert at["scheme"] == b"paged" and int(at["page"]) == page, at
            assert at["store"].decode() == os.path.abspath(store), (at["store"], os.path.abspath(store))
            d = src["layers/%03d/%s" % (l, t)]
            dt = {2: "f16", 4: "f32"}[d.id.get_type().get_size()]
            if d.id.get_type().get_size() == 2 and d.id.get_type().get_fields()[2] == 8:
                dt = "bf16"
            assert at["dtype"].decode() == dt, (at["dtype"], dt)
            ext = g["external"][:]
            assert ext.dtype == np.uint8 and np.array_equal(ext, flags), (name, l, t, ext, flags)
            ids = g["ids"][:].reshape(-1, 32)
            local = g["local"][:].tobytes()
            assert len(ids) == int(flags.sum())
            rb = D * tsize(g)
            out, lo, k = [], 0, 0
            for p in lp:
                nb = p["rows"] * rb
                if ext[p["idx"]]:
                    out.append(content[bytes(ids[k]).hex()])
                    k += 1
                else:
                    out.append(local[lo:lo + nb])
                    lo += nb
            assert lo == len(local)
            if all(x is not None for x in out):
                assert b"".join(out) == raw(d).tobytes(), (name, l, t, "paged decode differs")
    # 4. the rules, stated directly: sink/recent pages never on disk; with --place recent the disk
    #    holds the oldest pages: in each head the earliest pages after the sinks, and no disk page
    #    newer than a page kept in memory.
    if disk > 0:
        assert not any(p["always"] and p["tier"] == disk for p in pages)
    else:  # the disk is the first and only tier: it holds everything
        assert all(p["tier"] == 0 for p in pages) and all(len(f["layers/%03d/k/local" % l]) == 0 for l in range(L))
    if place == "recent" and recent >= 1:
        for l in range(L):
            for h in set(p["head"] for p in pages if p["layer"] == l):
                hp = [p for p in pages if p["layer"] == l and p["head"] == h]
                on = [p["i"] for p in hp if p["tier"] == disk]
                assert on == list(range(sink, sink + len(on))), (l, h, on)
        mem = [p["heat"] for p in pages if not p["always"] and p["tier"] != disk]
        dsk = [p["heat"] for p in pages if p["tier"] == disk]
        assert not mem or not dsk or max(dsk) <= min(mem), (max(dsk), min(mem))
    if place == "prefix" and recent >= 1 and ndisk:  # prefix: the latest pages go to disk
        mem = [p["pos0"] for p in pages if not p["always"] and p["tier"] != disk]
        dsk = [p["pos0"] for p in pages if p["tier"] == disk]
        assert not mem or min(dsk) >= max(mem), (min(dsk), max(mem))
    # 5. the file loses the disk pages' rows: it is at most the input less those bytes plus the
    #    paged groups' other arrays (ids, page metadata) and 4 KiB of HDF5 overhead per group;
    #    smaller than the input once a sizeable share (15%) of the cache is on disk.
    si, so = os.path.getsize(inp), os.path.getsize(tfile)
    extra = sum(g[a].id.get_storage_size() for l in range(L) for t in ("k", "v")
                for g in [f["layers/%03d/%s" % (l, t)]] for a in g if a != "local")
    assert so <= si - byt[disk] + extra + 4096 * 2 * L, (so, si, byt[disk], extra)
    if byt[disk] >= 0.15 * total:
        assert so < si, (so, si, byt[disk], total)
    return "%d pages (%s), disk %d" % (len(pages), "/".join(map(str, cnt)), ndisk)

def cmd_plan(spec):
    """caps for each case: gpu = sink+recent bytes + 30% of the rest, host 25%, disk the rest."""
    for line in open(spec):
        name, inp, page, codec, place, sink, recent, kind = line.split()
        pages = model_pages(inp, int(page), int(sink), int(recent), place)
        a = sum(p["bytes"] for p in pages if p["always"])
        t = sum(p["bytes"] for p in pages)
        gpu, host = a + (t - a) * 3 // 10, (t - a) // 4
        if kind == "nodisk":
            tiers = "gpu:%d,host:%d" % (gpu, t)
        elif kind == "diskonly":
            tiers = "disk:st-%s" % name
        elif kind == "exact":   # the disk's capacity is exactly what it gets
            placed = model_place(pages, [gpu, host, -1])
            need = sum(p["bytes"] for p in placed if p["tier"] == 2)
            tiers = "gpu:%d,host:%d,disk:st-%s:%d" % (gpu, host, name, need)
            open(name + ".need", "w").write("%d %d %d\n" % (gpu, host, need))
        else:
            tiers = "gpu:%d,host:%d,disk:st-%s" % (gpu, host, name)
        print(name, inp, page, codec, place, sink, recent, tiers)

def cmd_sizes(path, page, sink, recent):
    pages = model_pages(path, int(page), int(sink), int(recent), "recent")
    print(sum(p["bytes"] for p in pages if p["always"]), sum(p["bytes"] for p in pages),
          len(pages), sum(1 for p in pages if p["always"]))

def cmd_verify(cases):
    bad = 0
    for line in open(cases):
        c = line.split()
        try:
            print("  %-14s %s" % (c[0], check_case(*c)))
        except Exception as e:  # noqa
            bad += 1
            print("  %-14s FAILED: %r" % (c[0], e))
    sys.exit(1 if bad else 0)

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "plan":
        cmd_plan(sys.argv[2])
    elif cmd == "verify":
        cmd_verify(sys.argv[2])
    elif cmd == "sizes":
        cmd_sizes(*sys.argv[2:])
    elif cmd == "same":
        compare_files(sys.argv[2], sys.argv[3])
    elif cmd == "store":
        m, content = read_store(sys.argv[2])
        print(len(content))
    else:
        raise SystemExit("unknown command " + cmd)
PY

# ---- inputs: stories260k shape (2 layers, 8 query heads, 4 KV heads, head_dim 8), 600 tokens
# (2 full pages of 256 and a short one per head), with window queries, attention statistics and
# a probe; ragged heads from adaptive eviction, mass from merging. Small: every page file costs.
SY=(--preset stories260k --layers 2 -n 600 --window 16 --attn-stats --probe 8)
kv-synth "${SY[@]}" -o f16.kv.h5 || fail "synth f16"
kv-synth "${SY[@]}" --dtype f32 -o f32.kv.h5 || fail "synth f32"
kv-synth "${SY[@]}" --dtype bf16 -o bf16.kv.h5 || fail "synth bf16"
kv-evict -q -s h2o -a adaptive -b 400 f16.kv.h5 -o rag.kv.h5 || fail "evict (ragged)"
kv-merge -q -s h2o -b 400 bf16.kv.h5 -o mass.kv.h5 || fail "merge (mass)"
$PY - <<'PY' && pass "inputs: dtypes f16/f32/bf16, ragged heads, mass" || fail "inputs are not what the cases need"
import h5py, numpy as np
t = lambda f: h5py.File(f)["layers/000/k"].id.get_type()
assert t("f16.kv.h5").get_size() == 2 and t("f32.kv.h5").get_size() == 4
assert t("bf16.kv.h5").get_size() == 2 and t("bf16.kv.h5").get_fields()[2] == 8
f = h5py.File("rag.kv.h5")
assert len(set(np.diff(f["layers/000/head_offsets"][:]))) > 1
assert "mass" in h5py.File("mass.kv.h5")["layers/000"]
PY
sha_in=$(sha256sum f16.kv.h5 f32.kv.h5 bf16.kv.h5 rag.kv.h5 mass.kv.h5)

# ---- round trips ----------------------------------------------------------------------------
# f16: every page size x policy, the codec alternating so that every (page size, codec) and
# (codec, policy) pair occurs; the other caches: every page size, codecs and policies rotating;
# plus sink/recent variants, a cache with no disk tier, one with the disk only, and a disk whose
# capacity is exactly what it receives.
: > spec.txt
cs=(none zstd); pls=(recent prefix attention); ps=(16 64 256)
for a in 0 1 2; do for b in 0 1 2; do
  p=${ps[$a]} pl=${pls[$b]} c=${cs[$(((a + b) % 2))]}
  echo "f16-$p-$c-$pl f16.kv.h5 $p $c $pl 1 1 std" >> spec.txt
done; done
i=0
for src in f32 bf16 rag mass; do
  for p in 16 64 256; do
    echo "$src-$p $src.kv.h5 $p ${cs[$((i % 2))]} ${pls[$((i % 3))]} 1 1 std" >> spec.txt
    i=$((i + 1))
  done
done
cat >> spec.txt <<'EOF'
s2r0 rag.kv.h5 16 none recent 2 0 std
s0r3 f16.kv.h5 64 zstd recent 0 3 std
s0r0 mass.kv.h5 16 none prefix 0 0 std
nodisk f32.kv.h5 16 none recent 1 1 nodisk
diskonly bf16.kv.h5 64 zstd attention 1 1 diskonly
exact f16.kv.h5 16 none recent 1 1 exact
EOF
$PY check.py plan spec.txt > cases.txt || fail "plan"
n_cases=$(wc -l < cases.txt)
[ "$n_cases" = 27 ] || fail "plan: $n_cases cases, not 27"
rt_bad=0
while read -r name in page codec place sink recent tiers; do
  targs=()
  for t in ${tiers//,/ }; do targs+=(-t "$t"); done
  if ! kv-offload tier "${targs[@]}" -p "$page" --page-codec "$codec" --place "$place" \
      --sink-pages "$sink" --recent-pages "$recent" "$in" -o "$name.t.kv.h5" 2> "$name.err"; then
    fail "tier $name: $(cat "$name.err")"; rt_bad=$((rt_bad + 1)); continue
  fi
  if ! kv-offload restore -q "$name.t.kv.h5" -o "$name.r.kv.h5"; then
    fail "restore $name"; rt_bad=$((rt_bad + 1)); continue
  fi
  d_in=$(dg "$in")
  if [ "$(dg "$name.r.kv.h5")" != "$d_in" ] || [ "$(dg "$name.t.kv.h5")" != "$d_in" ]; then
    fail "round trip $name: digests in $d_in, tiered $(dg "$name.t.kv.h5"), restored $(dg "$name.r.kv.h5")"
    rt_bad=$((rt_bad + 1))
  fi
done < cases.txt
[ "$rt_bad" = 0 ] && pass "$n_cases tier + restore round trips: snaptool digests of input = tiered = restored"
$PY check.py verify cases.txt > verify.txt 2>&1 \
  && pass "$n_cases cases (h5py): restored = input bit for bit (k, v, positions, head_offsets, mass, side data, types); paged groups decode by hand to the input; placement = the model (report lines, external flags); sink/recent pages in the first tier; --place recent: disk holds the oldest pages after the sinks; prefix: the latest; the file sheds the disk pages; store = manifest, ids = SHA-256" \
  || fail "verify: $(grep -v ' pages (' verify.txt | head -c 3000)"
[ "$(grep -c 'disk [1-9]' verify.txt)" -ge $((n_cases - 3)) ] \
  && pass "most cases put pages on disk" || fail "too few cases with disk pages: $(cat verify.txt)"
[ "$(sha256sum f16.kv.h5 f32.kv.h5 bf16.kv.h5 rag.kv.h5 mass.kv.h5)" = "$sha_in" ] \
  && pass "inputs unchanged" || fail "an input was modified"

# Pipes: restore to stdout (into kv-inspect and into a file), tier from stdin and to stdout.
T=f16-16-none-recent.t.kv.h5
STD_T=(-t "$(sed -n 's/^f16-16-none-recent .* \(gpu:[0-9]*\),.*/\1/p' cases.txt)" -t disk:st-pipe)
kv-offload restore "$T" | kv-inspect - > pipe.txt || fail "restore | kv-inspect -"
grep -q "^encoding    k: dense f16, v: dense f16, mass: no$" pipe.txt && grep -q "^entries     4800 of 4800" pipe.txt \
  && pass "kv-offload restore t.kv.h5 | kv-inspect -: dense, every entry" || fail "restore pipe: $(head -12 pipe.txt)"
kv-offload restore "$T" > piped.kv.h5 && [ "$(dg piped.kv.h5)" = "$(dg f16.kv.h5)" ] && $PY check.py same f16.kv.h5 piped.kv.h5 \
  && pass "restore to stdout: bit-identical" || fail "restore to stdout"
kv-offload tier -q "${STD_T[@]}" < f16.kv.h5 > stdin.t.kv.h5 && [ "$(dg stdin.t.kv.h5)" = "$(dg f16.kv.h5)" ] \
  && kv-offload restore -q - < stdin.t.kv.h5 > stdin.r.kv.h5 && $PY check.py same f16.kv.h5 stdin.r.kv.h5 \
  && pass "tier stdin -> stdout, restore stdin -> stdout: bit-identical" || fail "tier/restore through stdin"
kv-synth "${SY[@]}" | kv-offload tier -q "${STD_T[@]}" -o pipe2.t.kv.h5 && [ "$(dg pipe2.t.kv.h5)" = "$(dg f16.kv.h5)" ] \
  && pass "kv-synth | kv-offload tier -o: bit-identical" || fail "synth | tier"

# ---- the store: equal pages stored once -----------------------------------------------------
# A cache whose k and v are equal: every disk page of v is the page of k, stored once.
cp f16.kv.h5 kv.kv.h5
$PY -c "
import h5py; f = h5py.File('kv.kv.h5', 'r+')
for l in range(2): f['layers/%03d/v' % l][...] = f['layers/%03d/k' % l][...]
" || fail "k = v cache"
kv-offload tier "${STD_T[@]/st-pipe/st-kv}" kv.kv.h5 -o kv.t.kv.h5 2> kv.err || fail "tier k = v: $(cat kv.err)"
ndisk=$(sed -n 's/^kv-offload: tier disk *\([0-9]*\) pages.*/\1/p' kv.err)
nfiles=$(ls st-kv/pages | wc -l)
$PY - <<'PY' && [ -n "$ndisk" ] && [ "$ndisk" -gt 0 ] && [ "$nfiles" = "$ndisk" ] && [ "$(dg kv.t.kv.h5)" = "$(dg kv.kv.h5)" ] \
  && pass "k = v: $ndisk disk pages (k and v each) stored as $nfiles files, k and v name the same ids" \
  || fail "k = v dedup: $ndisk disk pages, $nfiles files"
import h5py, numpy as np
f = h5py.File("kv.t.kv.h5")
for l in range(2):
    k, v = f["layers/%03d/k" % l], f["layers/%03d/v" % l]
    assert np.array_equal(k["ids"][:], v["ids"][:]) and len(k["ids"]) > 0
PY
[ "$($PY check.py store st-kv 2>&1)" = "$nfiles" ] && pass "k = v store: manifest = files, ids = SHA-256" || fail "k = v store: $($PY check.py store st-kv 2>&1 | tail -1)"

# Two runs into the same store: the second adds no files and rewrites none; the manifest says
# the same; a different cache then adds its pages and both snapshots still restore.
S=st-f16-64-zstd-recent
snap() { find "$S" -type f ! -name manifest.json -printf '%P %s %T@ %i\n' | sort; }
before=$(snap); man_before=$(sha256sum < $S/manifest.json)
tiers2=$(sed -n 's/^f16-64-zstd-recent .* \(gpu:[^ ]*\)$/\1/p' cases.txt)
t2=(); for t in ${tiers2//,/ }; do t2+=(-t "$t"); done
kv-offload tier -q "${t2[@]}" -p 64 --page-codec zstd --place recent f16.kv.h5 -o again.t.kv.h5 || fail "second run"
[ "$(snap)" = "$before" ] && [ "$(sha256sum < $S/manifest.json)" = "$man_before" ] && [ -n "$before" ] \
  && pass "second run into the same store: no file added or rewritten, same manifest" \
  || fail "second run changed the store: $(diff <(echo "$before") <(snap) | head -5)"
cmp -s <($PY -c "import h5py;f=h5py.File('again.t.kv.h5');print([bytes(f['layers/%03d/%s/ids'%(l,t)][:]).hex() for l in range(2) for t in 'kv'])") \
       <($PY -c "import h5py;f=h5py.File('f16-64-zstd-recent.t.kv.h5');print([bytes(f['layers/%03d/%s/ids'%(l,t)][:]).hex() for l in range(2) for t in 'kv'])") \
  && pass "second run names the same pages" || fail "second run's page ids differ"
n1=$(ls $S/pages | wc -l)
kv-offload tier -q "${t2[@]}" -p 64 --page-codec zstd --place recent f32.kv.h5 -o other.t.kv.h5 || fail "other cache into the store"
n2=$(ls $S/pages | wc -l)
$PY check.py store $S > /dev/null && [ "$n2" -gt "$n1" ] && [ "$(dg other.t.kv.h5)" = "$(dg f32.kv.h5)" ] \
  && kv-offload restore -q f16-64-zstd-recent.t.kv.h5 -o back1.kv.h5 && [ "$(dg back1.kv.h5)" = "$(dg f16.kv.h5)" ] \
  && pass "a second cache adds its pages ($n1 -> $n2 files); the manifest lists both; both restore" \
  || fail "shared store: $n1 -> $n2 files"

# ---- every tool reads a tiered snapshot ------------------------------------------------------
T=f16-16-none-recent.t.kv.h5
kv-inspect "$T" > ins.txt || fail "kv-inspect tiered"
grep -q "^encoding    k: paged page=16 dtype=f16 store=$PWD/st-f16-16-none-recent, v: paged page=16 dtype=f16 store=$PWD/st-f16-16-none-recent, mass: no$" ins.txt \
  && pass "kv-inspect shows paged, the page size, dtype and the absolute store" || fail "kv-inspect: $(grep encoding ins.txt)"
(cd / && kv-inspect "$WORK/$T" | grep -q "paged page=16") && (cd / && snaptool digest "$WORK/$T") > other_dir.txt \
  && [ "$(cat other_dir.txt)" = "$(dg f16.kv.h5)" ] && pass "read from another directory (the store path is absolute)" \
  || fail "reading from another directory"
kv-eval -r f16.kv.h5 --csv "$T" > eval.csv || fail "kv-eval tiered"
$PY - eval.csv <<'PY' && pass "kv-eval -r original --csv tiered: rel_error 0, cosine 1, recall 1" || fail "kv-eval: $(cat eval.csv)"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
assert len(rows) == 1
r = rows[0]
assert float(r["rel_error"]) == 0 and float(r["cosine"]) == 1 and float(r["topk_recall"]) == 1, r
assert int(r["entries"]) == 2 * 4 * 600, r
PY
kv-evict -q -s h2o -b 300 "$T" -o ev.t.kv.h5 && kv-evict -q -s h2o -b 300 f16.kv.h5 -o ev.o.kv.h5 || fail "kv-evict tiered"
kv-inspect ev.t.kv.h5 | grep -q "^encoding    k: dense f16, v: dense f16" && [ "$(dg ev.t.kv.h5)" = "$(dg ev.o.kv.h5)" ] \
  && $PY -c "import h5py; f=h5py.File('ev.t.kv.h5'); assert all(isinstance(f['layers/%03d/%s'%(l,t)], h5py.Dataset) for l in range(2) for t in 'kv')" \
  && pass "kv-evict on the tiered snapshot: dense output, same as evicting the original" || fail "kv-evict tiered"
kv-offload simulate --json -b 64 "$T" > sim.t.json && kv-offload simulate --json -b 64 f16.kv.h5 > sim.o.json || fail "simulate tiered"
$PY -c "
import json; a, b = json.load(open('sim.t.json')), json.load(open('sim.o.json'))
a.pop('file'); b.pop('file'); assert a == b" && pass "kv-offload simulate: the tiered snapshot gives the original's figures" || fail "simulate tiered"
kv-compress -q -s q8_0 "$T" -o q.t.kv.h5 && kv-compress -q -s q8_0 f16.kv.h5 -o q.o.kv.h5 \
  && [ "$(dg q.t.kv.h5)" = "$(dg q.o.kv.h5)" ] && kv-merge -q -s h2o -b 300 "$T" -o m.t.kv.h5 \
  && kv-merge -q -s h2o -b 300 f16.kv.h5 -o m.o.kv.h5 && [ "$(dg m.t.kv.h5)" = "$(dg m.o.kv.h5)" ] \
  && pass "kv-compress and kv-merge on the tiered snapshot = on the original" || fail "compress/merge tiered"
kv-offload tier -q "${STD_T[@]/st-pipe/st-retier}" "$T" -o re.t.kv.h5 && [ "$(dg re.t.kv.h5)" = "$(dg f16.kv.h5)" ] \
  && pass "a tiered snapshot tiers again" || fail "re-tier"

# ---- bad requests ---------------------------------------------------------------------------
read -r A TOT NP NA <<< "$($PY check.py sizes f16.kv.h5 16 1 1)"
sha_f16=$(sha256sum f16.kv.h5)
expect_code 64 kv-offload tier -t gpu:1KiB -t disk:st-e f16.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: tier gpu \(1024 bytes\) cannot hold the sink and recent pages \($A bytes\)$"
expect_code 64 kv-offload tier -t gpu:$((A - 1)) -t disk:st-e f16.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: tier gpu \($((A - 1)) bytes\) cannot hold the sink and recent pages \($A bytes\)$"
# all other pages are 512 bytes (16 rows x 8 x 2 bytes x k and v): host holds 2 of them
expect_code 64 kv-offload tier -t gpu:$A -t host:1KiB f16.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: the tiers cannot hold the cache: $((TOT - A - 1024)) bytes of pages do not fit \(add a disk:DIR tier\)$"
read -r G H NEED < exact.need
expect_code 64 kv-offload tier -t gpu:$G -t host:$H -t disk:st-e:$((NEED - 1)) f16.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: the tiers cannot hold the cache: 512 bytes of pages do not fit"
expect_code 64 kv-offload tier -t gpu:1MiB -t disk:st-e -t disk:st-e2 f16.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: give at most one disk:DIR tier$"
expect_code 64 kv-offload tier -t disk:st-e -t gpu:1MiB f16.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: the disk tier is the slowest: give it last$"
for bad in gpu:lots gpu:-1 gpu:1XB disk:st-e:lots; do
  expect_code 64 kv-offload tier -t $bad -t disk:st-e f16.kv.h5 -o x.kv.h5
  expect_err_line "^kv-offload: tier '$bad': capacity '[^']*' is not a size such as 512MiB or 2GiB$"
done
for bad in gpu gpu: disk:; do
  expect_code 64 kv-offload tier -t $bad f16.kv.h5 -o x.kv.h5
  expect_err_line "^kv-offload: tier '$bad' is not NAME:CAPACITY or disk:DIR$"
done
expect_code 64 kv-offload tier -t gpu:1MiB -t disk:st-e -p 8 f16.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: --page 8 is outside 16\.\.256$"
expect_code 64 kv-offload tier -t gpu:1MiB -t disk:st-e --place hottest f16.kv.h5 -o x.kv.h5
expect_err_line "--place: hottest not in"
kv-synth --preset stories260k --layers 3 -n 300 -o plain.kv.h5 || fail "synth plain"
expect_code 65 kv-offload tier -t gpu:1MiB -t disk:st-e --place attention plain.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: --place attention needs attention statistics \(kv-capture --attn-stats\)$"
sha_pq=$(sha256sum plain.kv.h5)
: > afile
expect_code 73 kv-offload tier -t gpu:$A -t disk:afile/store f16.kv.h5 -o x.kv.h5
expect_err_line "^kv-offload: cannot create page store 'afile/store': Not a directory$"
if [ "$(id -u)" != 0 ]; then  # root writes through mode 500
  mkdir ro && chmod 500 ro
  expect_code 73 kv-offload tier -t gpu:$A -t disk:ro/store f16.kv.h5 -o x.kv.h5
  expect_err_line "^kv-offload: cannot create page store 'ro/store'"
  mkdir -p ro2/store/pages && chmod 500 ro2/store/pages
  expect_code 73 kv-offload tier -t gpu:$A -t disk:ro2/store f16.kv.h5 -o x.kv.h5
  expect_err_line "^kv-offload: page store 'ro2/store' is not writable$"
  chmod 700 ro ro2/store/pages
fi
[ ! -e x.kv.h5 ] && [ ! -e st-e ] && [ ! -e st-e2 ] && [ ! -e afile/store ] \
  && pass "refused requests: no output, no page store created" || fail "left behind: $(ls -d x.kv.h5 st-e* 2>/dev/null)"
[ "$(sha256sum f16.kv.h5)" = "$sha_f16" ] && [ "$(sha256sum plain.kv.h5)" = "$sha_pq" ] \
  && pass "refused requests: inputs unchanged" || fail "a refused request modified its input"
[ -z "$(ls -a | grep -E '^\.x\.kv\.h5\.tmp')" ] && pass "no temporary output left" || fail "temporary output left: $(ls -a | grep tmp)"

# Damaged stores: restore (and any reader) fails with 65 naming the page or the manifest.
E=st-f16-64-none-prefix; T=f16-64-none-prefix.t.kv.h5
sha_t=$(sha256sum f16.kv.h5 "$T")
cp -a $E store.bak
ids=($(ls $E/pages | sed 's/\.raw$//'))
[ "${#ids[@]}" -ge 8 ] || fail "too few pages in $E for the damage checks: ${#ids[@]}"
restore_fails() {  # PATTERN
  expect_code 65 kv-offload restore "$T" -o x.kv.h5
  expect_err_line "$1"
  [ ! -e x.kv.h5 ] || fail "output left after a failed restore"
  rm -rf $E && cp -a store.bak $E
}
rm $E/pages/${ids[3]}.raw
restore_fails "^kv-offload: '$T' layer [0-9]: '[kv]': page store '$PWD/$E': page ${ids[3]}: file '$PWD/$E/pages/${ids[3]}\.raw' is missing$"
printf '\x55' | dd of=$E/pages/${ids[5]}.raw bs=1 seek=7 conv=notrunc status=none
restore_fails "^kv-offload: '$T' layer [0-9]: '[kv]': page store '$PWD/$E': page ${ids[5]}: content does not match its id \(corrupt page\)$"
truncate -s 100 $E/pages/${ids[6]}.raw
restore_fails "page ${ids[6]}: file has 100 bytes, the manifest says 1024$"
rm $E/manifest.json
restore_fails "^kv-offload: '$T' layer 0: 'k': page store '$PWD/$E' has no manifest\.json$"
truncate -s $(( $(stat -c %s $E/manifest.json) / 2 )) $E/manifest.json
restore_fails "^kv-offload: '$T' layer 0: 'k': '$PWD/$E/manifest\.json': JSON: "
: > $E/manifest.json
restore_fails "^kv-offload: '$T' layer 0: 'k': '$PWD/$E/manifest\.json': JSON: "
$PY -c "
import json; p = '$E/manifest.json'; m = json.load(open(p))
m['pages'] = [e for e in m['pages'] if e['id'] != '${ids[2]}']; open(p, 'w').write(json.dumps(m))"
restore_fails "page ${ids[2]} is not in the manifest$"
Z=st-f16-16-zstd-prefix; ZT=f16-16-zstd-prefix.t.kv.h5; zid=$(ls $Z/pages | head -1); cp $Z/pages/$zid zbak
sha_z=$(sha256sum "$ZT")
printf 'garbage' | dd of=$Z/pages/$zid bs=1 seek=0 conv=notrunc status=none
expect_code 65 kv-offload restore "$ZT" -o x.kv.h5
expect_err_line "page ${zid%.zst}: not a zstd frame of its size$"
cp zbak $Z/pages/$zid
mv $E moved-store
expect_code 65 kv-offload restore "$T" -o x.kv.h5
expect_err_line "page store '$PWD/$E' has no manifest\.json$"
expect_code 65 kv-eval -r f16.kv.h5 "$T"
expect_err_line "page store '$PWD/$E' has no manifest\.json$"
mv moved-store $E
[ ! -e x.kv.h5 ] && [ "$(sha256sum f16.kv.h5 "$T")" = "$sha_t" ] && [ "$(sha256sum "$ZT")" = "$sha_z" ] \
  && kv-offload restore -q "$T" -o fixed.kv.h5 && [ "$(dg fixed.kv.h5)" = "$(dg f16.kv.h5)" ] \
  && kv-offload restore -q "$ZT" -o fixedz.kv.h5 && [ "$(dg fixedz.kv.h5)" = "$(dg f16.kv.h5)" ] \
  && pass "after the failures: no output, inputs unchanged, the repaired stores restore exactly" || fail "after damaged-store failures"

# ---- SIGKILL mid-run: the store keeps the earlier run's manifest and pages ------------------
# The earlier run: the f16 cache into kst. Then a larger cache (4 layers x 4 KV heads x 2048
# tokens in pages of 16: ~3800 page files, about a second here) into the same store, killed with
# SIGKILL once it has written a given number of page files, or after a fixed delay. Each kill
# leaves the unlisted files of its run behind; the next run writes them again.
kv-offload tier -q "${STD_T[@]/st-pipe/kst}" f16.kv.h5 -o early.t.kv.h5 || fail "earlier run"
$PY -c "
import sys; sys.path.insert(0, '.'); from check import referenced_ids
open('early.ids', 'w').write('\n'.join(sorted(set(referenced_ids('early.t.kv.h5')))) + '\n')" || fail "early ids"
man0=$(sha256sum < kst/manifest.json)
kv-synth --preset stories260k --layers 4 -n 2048 -o big.kv.h5 || fail "synth big"
cat > killcheck.py <<'PY'
# The manifest parses, every page it lists exists and hashes to its id, and it still lists every
# page the earlier snapshot names.
import hashlib, json, os
m = json.load(open("kst/manifest.json"))
assert m["format"] == "kvtk-page-store" and m["version"] == 1
for e in m["pages"]:
    data = open(os.path.join("kst", e["file"]), "rb").read()
    assert len(data) == e["stored"] == e["bytes"] and hashlib.sha256(data).hexdigest() == e["id"], e
early = set(open("early.ids").read().split())
assert early and early <= {e["id"] for e in m["pages"]}, "the earlier run's pages are no longer listed"
print(len(m["pages"]))
PY
mkdir -p killed
midwrite=0
written() { find kst/pages -type f -newer marker 2>/dev/null | wc -l; }
for when in files:1 files:100 files:600 files:2000 sleep:0.05 sleep:0.3; do
  rm -f killed/* killed/.big* 2>/dev/null
  touch marker; sleep 0.01
  kv-offload tier -q -t gpu:64KiB -t disk:kst big.kv.h5 -o killed/big.t.kv.h5 2>/dev/null &
  pid=$!
  if [ "${when%%:*}" = files ]; then
    while kill -0 $pid 2>/dev/null && [ "$(written)" -lt "${when#*:}" ]; do :; done
  else
    sleep "${when#*:}"
  fi
  kill -9 $pid 2>/dev/null
  wait $pid 2>/dev/null; rc=$?
  n=$(written)
  if listed=$($PY killcheck.py 2>&1); then
    if [ "$(sha256sum < kst/manifest.json)" = "$man0" ]; then state="manifest unchanged"; else state="manifest replaced (the kill came after the commit)"; fi
    [ "$rc" = 137 ] && [ "$state" = "manifest unchanged" ] && [ "$n" -gt 0 ] && midwrite=$((midwrite + 1))
    pass "kill at $when (exit $rc, $n page files written): manifest valid, its $listed pages intact, the earlier run's listed ($state)"
  else
    fail "kill at $when (exit $rc): store damaged: $(echo "$listed" | tail -1)"
  fi
  [ "$(dg early.t.kv.h5)" = "$(dg f16.kv.h5)" ] && pass "kill at $when: the earlier snapshot still restores exactly" \
    || fail "kill at $when: the earlier snapshot no longer restores"
  if [ -e killed/big.t.kv.h5 ]; then
    [ "$(dg killed/big.t.kv.h5)" = "$(dg big.kv.h5)" ] && pass "kill at $when: its output had been finished and is whole" \
      || fail "kill at $when: a partial output under the final name"
  fi
done
[ "$midwrite" -ge 2 ] && pass "$midwrite kills landed while pages were being written" \
  || fail "only $midwrite kills landed mid-write (the run was too fast to test)"
kv-offload tier -q "${STD_T[@]/st-pipe/kst}" f32.kv.h5 -o later.t.kv.h5 && [ "$(dg later.t.kv.h5)" = "$(dg f32.kv.h5)" ] \
  && kv-offload restore -q later.t.kv.h5 -o later.r.kv.h5 && $PY check.py same f32.kv.h5 later.r.kv.h5 \
  && [ "$(dg early.t.kv.h5)" = "$(dg f16.kv.h5)" ] && $PY killcheck.py > /dev/null \
  && pass "after the kills a full run into the same store succeeds; both snapshots restore exactly" \
  || fail "full run after the kills"
echo "note: $(find kst -name '*.tmp*' | wc -l) temporary files of the killed runs remain in the store (ignored by design)"

finish
