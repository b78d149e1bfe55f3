#!/usr/bin/env bash
# kv-compress end to end: every scheme and option through files and pipes, kv-inspect's scheme
# and bits/value against the formulas, the files really shrinking, third-party decoding of the
# encoded groups (h5py + numpy, bit for bit against kv-compress -d), -d and re-compression,
# chains with kv-evict and kv-eval, and bad requests and damaged files (sysexits, one line, no
# output left behind, input unchanged).
source "$(dirname "$0")/lib.sh"
export PATH="$KV_TEST_BIN:$PATH"
PY=/usr/bin/python3
$PY -c "import h5py, numpy" 2>/dev/null || { echo "skip: python3-h5py missing"; exit 77; }

# c16: head_dim 64 (so q8_0/q4_0 blocks and 32-groups align to rows), f16 like a real cache;
# c32: the same cache in f32, the input of the bit-exact numpy decoders.
SYNTH=(--preset stories260k --layers 2 --q-heads 4 --kv-heads 2 --head-dim 64 -n 256 --probe 8)
kv-synth "${SYNTH[@]}" -o c16.kv.h5 || fail "synth c16"
kv-synth "${SYNTH[@]}" --dtype f32 -o c32.kv.h5 || fail "synth c32"
kv-synth --preset stories260k -n 200 --probe 8 -o s.kv.h5 || fail "synth stories260k"
sha_c16=$(sha256sum c16.kv.h5)
sha_s=$(sha256sum s.kv.h5)

# ---- every scheme, files and pipes ----------------------------------------------------------
# "options|expected bits per value" on c16 (n = 256 per head, D = 64; asymmetric groups cost
# 32 bits of f16 scale + zero, symmetric 16; residual rows 16 bits; "-" = data-dependent rank).
cases=(
  "uniform|5"                          # 4 + 32/32
  "uniform -b 2|3"
  "uniform -b 3|4"
  "uniform -b 4 -g 16|6"               # 4 + 32/16
  "uniform -b 8|9"
  "uniform -g 128|4.5"                 # a token's group is capped at head_dim: 4 + 32/64
  "uniform --axis channel|5"
  "uniform -b 3 --axis channel -g 64|3.5"
  "uniform --symmetric|4.5"            # 4 + 16/32
  "uniform -b 2 --symmetric --axis channel|2.5"
  "uniform -r 16|5.6875"               # (240 * 5 + 16 * 16) / 256
  "uniform --hadamard|5"
  "kivi|9.5"                           # 2 + 1 on 128 rows, 16 on the 128-row residual
  "kivi -b 4|10.5"
  "kivi -r 0|3"
  "kivi -b 2 -r 0 -g 64|2.5"
  "kivi -b 4 -r 32|6.375"              # (224 * 5 + 32 * 16) / 256
  "q8_0|8.5"
  "q8_0 --hadamard|8.5"
  "q4_0|4.5"
  "q4_0 --hadamard|4.5"
  "fp8|8.001953125"                    # one f32 scale per head of 256 * 64 values
  "fp8 --format e5m2|8.001953125"
  "fp8 --scale tensor|8.0009765625"    # one f32 scale per layer's k (and v)
  "fp8 --format e5m2 --scale tensor --hadamard|8.0009765625"
  "svd|-"
  "svd --energy 0.9|-"
  "svd --rank 8|2.501953125"           # 8 * (2 * (256 + 64) * 8 * 2 + 2 * 4) / (2 * 256 * 64)
  "svd --rank 16 --factors f32|10.001953125"
  "svd --rank 8 --pre-rope|2.501953125"
  "q8_0 --tensors k|12.25"             # (8.5 + 16) / 2
  "kivi -r 0 --tensors v|9.5"          # (16 + 3) / 2
)
i=0
: > cases.txt
for c in "${cases[@]}"; do
  opts=${c%|*} bpv=${c#*|}
  i=$((i + 1))
  # shellcheck disable=SC2086
  if ! kv-compress -s $opts --no-provenance c16.kv.h5 -o f$i.kv.h5; then fail "file: -s $opts"; continue; fi
  # shellcheck disable=SC2086
  kv-synth "${SYNTH[@]}" | kv-compress -s $opts --no-provenance > p$i.kv.h5 || { fail "pipe: -s $opts"; continue; }
  # shellcheck disable=SC2086
  kv-synth "${SYNTH[@]}" | kv-compress -s $opts | kv-inspect - > i$i.txt || { fail "pipe to kv-inspect: -s $opts"; continue; }
  kv-inspect --json f$i.kv.h5 > f$i.json && kv-inspect --json p$i.kv.h5 > p$i.json \
    || { fail "inspect --json: -s $opts"; continue; }
  [ "$(snaptool digest f$i.kv.h5)" = "$(snaptool digest p$i.kv.h5)" ] \
    && pass "-s $opts: pipe = file (decoded values)" || fail "-s $opts: pipe and file decode differently"
  echo "$i|$opts|$bpv" >> cases.txt
done
[ "$(sha256sum c16.kv.h5)" = "$sha_c16" ] && pass "input unchanged" || fail "input modified"

# kv-inspect (text and JSON) shows the scheme and the bits/value of the formula; the JSON's bits
# are the bytes of the datasets h5py sees; the group holds 'scheme' and its 1-D arrays; and the
# file really shrinks by what the bytes say.
$PY - c16.kv.h5 <<'PY' && pass "kv-inspect: scheme, bits/value = formula = h5py bytes, layout, files shrink" || fail "kv-inspect / layout"
import json, os, re, sys
import h5py, numpy as np
dense = sys.argv[1]
dense_bytes = os.path.getsize(dense)
U8, F16, F32, I32 = np.dtype("u1"), np.dtype("<f2"), np.dtype("<f4"), np.dtype("<i4")
bad = []
for line in open("cases.txt"):
    i, opts, bpv = line.rstrip("\n").split("|")
    o = opts.split()
    j = json.load(open("f%s.json" % i))
    jp = json.load(open("p%s.json" % i))
    keys = ("k_encoding", "v_encoding", "bits_per_value", "kv_bytes_stored", "entries")
    if [j[k] for k in keys] != [jp[k] for k in keys]:
        bad.append("-s %s: pipe %r, file %r" % (opts, [jp[k] for k in keys], [j[k] for k in keys]))
    text = open("i%s.txt" % i).read()
    f = h5py.File("f%s.kv.h5" % i, "r")
    def err(msg):
        bad.append("-s %s: %s" % (opts, msg))
    scheme = o[0]
    roles = {"k": "k" in (o[o.index("--tensors") + 1] if "--tensors" in o else "kv"),
             "v": "v" in (o[o.index("--tensors") + 1] if "--tensors" in o else "kv")}
    total, values = 0, 0
    for l in range(2):
        g = f["layers/%03d" % l]
        for t in "kv":
            x = g[t]
            if not roles[t]:
                if not isinstance(x, h5py.Dataset) or x.dtype != F16 or x.shape != (512, 64):
                    err("%s not left dense f16" % t)
                total += x.size * 2
                continue
            if not isinstance(x, h5py.Group):
                err("%s/%s is not a group" % (g.name, t)); continue
            a = x.attrs.get("scheme")
            if a is None or (a.decode() if isinstance(a, bytes) else a) != scheme:
                err("attribute scheme = %r" % a)
            want = {"uniform": {"codes": U8, "scales": F16, "zeros": F16, "residual": F16},
                    "kivi": {"codes": U8, "scales": F16, "zeros": F16, "residual": F16},
                    "q8_0": {"blocks": U8}, "q4_0": {"blocks": U8},
                    "fp8": {"codes": U8, "scales": F32},
                    "svd": {"ranks": I32, "coeffs": F32 if "f32" in o else F16,
                            "basis": F32 if "f32" in o else F16}}[scheme]
            if "--symmetric" in o:
                del want["zeros"]
            got = {n: x[n].dtype for n in x}
            if got != want:
                err("%s/%s arrays %s, want %s" % (g.name, t, got, want))
            for n in x:
                if len(x[n].shape) != 1:
                    err("%s is not 1-D" % x[n].name)
                total += x[n].size * x[n].dtype.itemsize
            if "--hadamard" in o and x.attrs.get("hadamard") != 1:
                err("no hadamard attribute")
    values = 2 * 2 * 512 * 64
    bits = 8 * total / values
    if abs(j["bits_per_value"] - bits) > 1e-6:
        err("JSON bits_per_value %r, h5py bytes give %r" % (j["bits_per_value"], bits))
    if bpv != "-" and abs(bits - float(bpv)) > 1e-9:
        err("bits/value %r, formula %s" % (bits, bpv))
    m = re.search(r"^bits/value  ([0-9.]+) ", text, re.M)
    if not m or abs(float(m.group(1)) - bits) > 0.0005:
        err("text bits/value line: %r" % (m and m.group(0)))
    m = re.search(r"^encoding    k: (.*), v: (.*), mass: no$", text, re.M)
    if not m or (m.group(1), m.group(2)) != (j["k_encoding"], j["v_encoding"]):
        err("text encoding line %r vs JSON %r %r" % (m and m.group(0), j["k_encoding"], j["v_encoding"]))
    for t in "kv":
        enc = j[t + "_encoding"]
        if roles[t] and not (enc == scheme or enc.startswith(scheme + " ")):
            err("%s_encoding %r" % (t, enc))
        if not roles[t] and enc != "dense f16":
            err("%s_encoding %r, want dense f16" % (t, enc))
    for opt, word in (("-b", "bits="), ("-g", "group="), ("--format", "format="), ("--rank", "rank=")):
        if opt in o and "%s%s" % (word, o[o.index(opt) + 1]) not in j["k_encoding"] + j["v_encoding"]:
            err("%s %s not described: %r" % (opt, o[o.index(opt) + 1], j["k_encoding"]))
    if scheme == "kivi" and roles["k"] and "axis=channel" not in j["k_encoding"]:
        err("kivi keys not per channel: %r" % j["k_encoding"])
    if scheme == "kivi" and roles["v"] and "axis=token" not in j["v_encoding"]:
        err("kivi values not per token: %r" % j["v_encoding"])
    # The file shrinks by what the encoded bytes save (metadata of the groups within 16 KiB).
    saved = j["kv_bytes_dense_f16"] - j["kv_bytes_stored"]
    size = os.path.getsize("f%s.kv.h5" % i)
    if abs((dense_bytes - size) - saved) > 16384:
        err("file %d bytes, dense %d, encoded bytes save %d" % (size, dense_bytes, saved))
    if bits < 16 and not (size < dense_bytes and j["ratio_to_dense_f16"] < 1):
        err("file does not shrink: %d vs %d" % (size, dense_bytes))
for b in bad:
    print(b)
sys.exit(1 if bad else 0)
PY
# A small-head cache (head_dim 8): a token's group of 32 is capped at 8 values, so 4 + 32/8.
kv-compress -s uniform s.kv.h5 | kv-inspect --json - > s-u.json || fail "uniform on head_dim 8"
grep -q '"bits_per_value":8,' s-u.json && pass "head_dim 8: uniform 4-bit costs 8 bits/value" \
  || fail "head_dim 8: $(grep -o '"bits_per_value":[^,]*' s-u.json | head -1)"
# The lossless codec applies to the encoded arrays, and kv-inspect names it.
kv-compress -s q4_0 --codec zstd c16.kv.h5 -o z.kv.h5 || fail "q4_0 + zstd"
kv-inspect z.kv.h5 | grep -q "^format      kvsnap 1.1, codec zstd" && pass "kv-inspect names the codec of encoded k" \
  || fail "codec of an encoded file: $(kv-inspect z.kv.h5 | grep ^format)"

# ---- third-party decoding (h5py + numpy) against kv-compress -d --dtype f32 -------------------
dec=(
  "q8_0|n-q8.kv.h5" "q4_0|n-q4.kv.h5" "uniform -b 8|n-u8.kv.h5"
  "uniform -b 3 --axis channel -g 64|n-u3c.kv.h5" "uniform -b 2 --symmetric -r 8|n-u2s.kv.h5"
  "kivi -b 4 -r 32|n-kivi.kv.h5" "fp8 --format e5m2|n-e5m2.kv.h5" "fp8 --scale tensor|n-e4m3.kv.h5"
  "svd --rank 12 --factors f32|n-svd.kv.h5"
)
for d in "${dec[@]}"; do
  # shellcheck disable=SC2086
  kv-compress -s ${d%|*} c32.kv.h5 -o ${d#*|} && kv-compress -d --dtype f32 ${d#*|} -o d-${d#*|} \
    || fail "compress/decode -s ${d%|*}"
done
$PY - c32.kv.h5 <<'PY' && pass "numpy decodes q8_0, q4_0, uniform, kivi, fp8 bit for bit like kv-compress -d; svd to 1e-5" || fail "numpy decoders"
import sys
import h5py, numpy as np
src = h5py.File(sys.argv[1], "r")
D = 64
bad = []

def att(g, n):
    v = g.attrs[n]
    return v.decode() if isinstance(v, bytes) else v

def f16(a):
    return a.astype(np.float32)

def unpack(codes, n, bits):  # LSB-first bit-packed codes
    b = np.unpackbits(codes, bitorder="little")[: n * bits].reshape(n, bits).astype(np.uint32)
    return (b << np.arange(bits, dtype=np.uint32)).sum(axis=1)

def uniform_run(codes, scales, zeros, n, bits, group, symmetric, q=None):
    if q is None:
        q = unpack(codes, n, bits)
    gi = np.arange(n) // group
    S = f16(scales)[gi]
    if symmetric:
        return (q.astype(np.int64) - (1 << (bits - 1))).astype(np.float32) * S
    Z = f16(zeros)[gi]
    return np.where(S == 0, Z, q.astype(np.float32) * S + Z).astype(np.float32)

def hadamard_rows(x):
    n = x.shape[1]
    H = np.array([[1.0]])
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return (x.astype(np.float64) @ H / np.sqrt(n)).astype(np.float32)

def decode_uniform(g, off):
    bits, group, axis = int(att(g, "bits")), int(att(g, "group")), att(g, "axis")
    sym, resid = bool(att(g, "symmetric")), int(att(g, "residual"))
    codes, scales, res = g["codes"][:], g["scales"][:], g["residual"][:]
    zeros = None if sym else g["zeros"][:]
    out = np.zeros((off[-1], D), np.float32)
    c = s = r = 0
    for h in range(len(off) - 1):
        n = off[h + 1] - off[h]
        nr = min(resid, n)
        nq = n - nr
        if axis == "token":
            G = min(group, D)
            cb, ng = (nq * D * bits + 7) // 8, -(-(nq * D) // G)
            v = uniform_run(codes[c:c + cb], scales[s:s + ng], None if sym else zeros[s:s + ng],
                            nq * D, bits, G, sym).reshape(nq, D)
            c, s = c + cb, s + ng
        else:  # group-major: for each group of rows, each channel's codes for those rows
            cb, ngr = (nq * D * bits + 7) // 8, -(-nq // group)
            q = unpack(codes[c:c + cb], nq * D, bits)
            v = np.zeros((nq, D), np.float32)
            pos = 0
            for j in range(ngr):
                r0 = j * group
                ln = min(group, nq - r0)
                for d in range(D):
                    k = s + j * D + d
                    v[r0:r0 + ln, d] = uniform_run(None, scales[k:k + 1],
                                                   None if sym else zeros[k:k + 1], ln, bits,
                                                   ln, sym, q[pos:pos + ln])
                    pos += ln
            c, s = c + cb, s + ngr * D
        out[off[h]:off[h] + nq] = v
        out[off[h] + nq:off[h + 1]] = f16(res[r:r + nr * D]).reshape(nr, D)
        r += nr * D
    assert c == codes.size and s == scales.size and r == res.size, "arrays not used up"
    return out

def decode_blocks(g, scheme):
    b = g["blocks"][:]
    if scheme == "q8_0":
        blk = b.reshape(-1, 34)
        d = f16(blk[:, :2].copy().view("<f2"))
        q = blk[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(-1, D)
    blk = b.reshape(-1, 18)
    d = f16(blk[:, :2].copy().view("<f2"))
    nib = blk[:, 2:]
    q = np.concatenate([(nib & 15).astype(np.int32) - 8, (nib >> 4).astype(np.int32) - 8], axis=1)
    return (q.astype(np.float32) * d).reshape(-1, D)

def fp8_table(fmt):
    c = np.arange(256, dtype=np.uint16)
    if fmt == "e5m2":  # IEEE half with the low byte cut off
        return f16((c << 8).view("<f2"))
    sign = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 15, (c & 7).astype(np.float64)
    v = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8) * 2.0 ** (e.astype(np.float64) - 7))
    v = np.where((c & 0x7F) == 0x7F, np.nan, v)
    return (sign * v).astype(np.float32)

def decode_fp8(g, off):
    t = fp8_table(att(g, "format"))[g["codes"][:]].reshape(-1, D)
    scales = g["scales"][:]
    out = np.empty_like(t)
    if att(g, "scale") == "tensor":
        out[:] = t * scales[0]
    else:
        for h in range(len(off) - 1):
            out[off[h]:off[h + 1]] = t[off[h]:off[h + 1]] * scales[h]
    return out

def decode_svd(g, off):
    ranks, A, B = g["ranks"][:], g["coeffs"][:].astype(np.float64), g["basis"][:].astype(np.float64)
    out, a, b = np.zeros((off[-1], D), np.float32), 0, 0
    for h in range(len(off) - 1):
        n, r = off[h + 1] - off[h], int(ranks[h])
        out[off[h]:off[h + 1]] = (A[a:a + n * r].reshape(n, r) @ B[b:b + D * r].reshape(D, r).T)
        a, b = a + n * r, b + D * r
    assert a == A.size and b == B.size
    return out

for name in ["n-q8", "n-q4", "n-u8", "n-u3c", "n-u2s", "n-kivi", "n-e5m2", "n-e4m3", "n-svd"]:
    f, d = h5py.File(name + ".kv.h5", "r"), h5py.File("d-" + name + ".kv.h5", "r")
    for l in range(2):
        off = f["layers/%03d/head_offsets" % l][:]
        for t in "kv":
            g = f["layers/%03d/%s" % (l, t)]
            scheme = att(g, "scheme")
            ref = src["layers/%03d/%s" % (l, t)][:]
            kvd = d["layers/%03d/%s" % (l, t)][:]
            if kvd.dtype != np.float32:
                bad.append("%s: -d --dtype f32 gave %s" % (name, kvd.dtype))
            if scheme in ("uniform", "kivi"):
                x = decode_uniform(g, off)
            elif scheme in ("q8_0", "q4_0"):
                x = decode_blocks(g, scheme)
            elif scheme == "fp8":
                x = decode_fp8(g, off)
            else:
                x = decode_svd(g, off)
            where = "%s layer %d %s" % (name, l, t)
            if scheme == "svd":
                if not np.allclose(x, kvd, rtol=1e-5, atol=1e-5):
                    bad.append("%s: numpy svd differs by %g" % (where, np.abs(x - kvd).max()))
                continue
            if not np.array_equal(x.view(np.uint32), kvd.view(np.uint32)):
                k = np.argwhere(x.view(np.uint32) != kvd.view(np.uint32))[0]
                bad.append("%s: numpy %r, kv-compress -d %r at %s (of %d)" % (
                    where, x[tuple(k)], kvd[tuple(k)], k,
                    int((x.view(np.uint32) != kvd.view(np.uint32)).sum())))
            # Error bounds against the dense input.
            if scheme == "q8_0":
                # codes come from the f32 d = amax/127, so the f16 rounding of d (2^-11
                # relative) costs up to 127 of it on top of the rounding to the nearest code.
                dd = np.repeat(f16(g["blocks"][:].reshape(-1, 34)[:, :2].copy().view("<f2")), 32).reshape(-1, D)
                e = np.abs(x.astype(np.float64) - ref)
                if not np.all(e <= dd / 2 + 127 * dd * 2.0 ** -11 + 2.0 ** -23 * np.abs(ref)):
                    bad.append("%s: q8_0 error %g above d/2 + 127 f16 ulps/2" % (where, (e / dd).max()))
            if name == "n-u8":  # 8-bit, asymmetric, groups of 32 along a token: S/2 (quant.h)
                S = np.repeat(f16(g["scales"][:]), 32).reshape(-1, D)
                Z = np.repeat(f16(g["zeros"][:]), 32).reshape(-1, D)
                m = np.repeat(ref.reshape(-1, 32).min(axis=1), 32).reshape(-1, D)
                bound = np.maximum(S / 2, np.abs(m - Z)) + 2.0 ** -23 * np.maximum(np.abs(Z), np.abs(Z + 255 * S))
                e = np.abs(x.astype(np.float64) - ref)
                if not np.all(e <= bound):
                    bad.append("%s: uniform 8-bit error %g above its bound" % (where, (e - bound).max()))
                if not np.all(e <= S / 2 + 2.0 ** -23 * np.abs(ref) + 1e-7):
                    bad.append("%s: uniform 8-bit error %g above S/2" % (where, (e - S / 2).max()))
            if name == "n-kivi":  # the residual: the last 32 rows of each head, as f16
                for h in range(len(off) - 1):
                    if not np.array_equal(x[off[h + 1] - 32:off[h + 1]], ref[off[h + 1] - 32:off[h + 1]].astype(np.float16).astype(np.float32)):
                        bad.append("%s: residual rows are not f16(x)" % where)
for b in bad[:20]:
    print(b)
sys.exit(1 if bad else 0)
PY

# ---- -d, dtypes, idempotence, stability --------------------------------------------------------
kv-compress -s kivi -r 16 c16.kv.h5 -o kv.kv.h5 || fail "kivi"
kv-compress -d kv.kv.h5 -o d16.kv.h5 && kv-compress -d --dtype f32 kv.kv.h5 -o d32.kv.h5 \
  && kv-compress -d d16.kv.h5 -o dd16.kv.h5 && kv-compress -d --dtype f32 d16.kv.h5 -o dd16b.kv.h5 \
  && kv-compress -d --dtype bf16 c16.kv.h5 -o dc16.kv.h5 && kv-compress -d c32.kv.h5 -o dc32.kv.h5 \
  && kv-synth "${SYNTH[@]}" | kv-compress -s q4_0 | kv-compress -d --dtype f32 --tensors k > dk.kv.h5 \
  || fail "-d runs"
kv-inspect d16.kv.h5 | grep -q "^encoding    k: dense f16, v: dense f16" && kv-inspect d16.kv.h5 | grep -q "^bits/value  16.000" \
  && pass "-d: kv-inspect shows dense f16" || fail "-d inspect: $(kv-inspect d16.kv.h5 | grep -E '^(encoding|bits)')"
kv-inspect dk.kv.h5 | grep -q "^encoding    k: dense f32, v: q4_0, " && pass "-d --tensors k decodes k only" \
  || fail "-d --tensors k: $(kv-inspect dk.kv.h5 | grep ^encoding)"
$PY <<'PY' && pass "-d: f16 by default, f32 on request, values = decode; -d again and -d on dense are no-ops" || fail "-d dtypes / no-op"
import h5py, numpy as np
def arrays(p):
    f = h5py.File(p, "r")
    return [f["layers/%03d/%s" % (l, t)][:] for l in range(2) for t in "kv"]
d16, d32, dd16, dd16b = arrays("d16.kv.h5"), arrays("d32.kv.h5"), arrays("dd16.kv.h5"), arrays("dd16b.kv.h5")
c16, dc16, c32, dc32 = arrays("c16.kv.h5"), arrays("dc16.kv.h5"), arrays("c32.kv.h5"), arrays("dc32.kv.h5")
assert all(a.dtype == np.float16 and a.shape == (512, 64) for a in d16), [a.dtype for a in d16]
assert all(a.dtype == np.float32 for a in d32)
assert all(np.array_equal(a, b.astype(np.float16)) for a, b in zip(d16, d32)), "f16 = f16(f32 decode)"
assert all(a.dtype == np.float16 and np.array_equal(a.view("u2"), b.view("u2")) for a, b in zip(dd16, d16)), "-d twice"
assert all(a.dtype == np.float16 and np.array_equal(a.view("u2"), b.view("u2")) for a, b in zip(dd16b, d16)), "-d --dtype f32 on dense keeps f16"
assert all(a.dtype == np.float16 and np.array_equal(a.view("u2"), b.view("u2")) for a, b in zip(dc16, c16)), "-d on a dense f16 snapshot"
assert all(a.dtype == np.float32 and np.array_equal(a.view("u4"), b.view("u4")) for a, b in zip(dc32, c32)), "-d on a dense f32 snapshot"
# kivi's residual rows (the last 16 of each head) come back exactly.
f = h5py.File("d32.kv.h5", "r")
for l in range(2):
    off = f["layers/%03d/head_offsets" % l][:]
    for t, i in (("k", 2 * l), ("v", 2 * l + 1)):
        for h in range(2):
            assert np.array_equal(d32[i][off[h + 1] - 16:off[h + 1]], c16[i][off[h + 1] - 16:off[h + 1]].astype(np.float32))
PY
# Re-compressing a decoded output gives the same values: exactly for the quantizers, to f32
# rounding for a fixed-rank SVD.
stab=("uniform" "uniform -b 3 --axis channel -g 16" "uniform -b 2 --symmetric" "uniform -b 8 --hadamard"
      "kivi" "kivi -b 4 -r 0" "q8_0" "q4_0" "q4_0 --hadamard" "fp8" "fp8 --format e5m2 --scale tensor"
      "svd --rank 16 --factors f32")
: > stab.txt
for s in "${stab[@]}"; do
  j=$(wc -l < stab.txt)
  # shellcheck disable=SC2086
  kv-compress -s $s c32.kv.h5 | kv-compress -d --dtype f32 -o st$j-a.kv.h5 \
    && kv-compress -s $s st$j-a.kv.h5 | kv-compress -d --dtype f32 -o st$j-b.kv.h5 || fail "stability run: -s $s"
  echo "$j|$s" >> stab.txt
done
$PY <<'PY' && pass "re-compressing decoded values is stable (${#stab[@]} schemes)" || fail "stability"
import h5py, numpy as np, sys
bad = []
for line in open("stab.txt"):
    j, s = line.rstrip("\n").split("|")
    a, b = h5py.File("st%s-a.kv.h5" % j, "r"), h5py.File("st%s-b.kv.h5" % j, "r")
    for l in range(2):
        for t in "kv":
            x, y = a["layers/%03d/%s" % (l, t)][:], b["layers/%03d/%s" % (l, t)][:]
            ok = np.allclose(x, y, rtol=0, atol=1e-5) if s.startswith("svd") else np.array_equal(x.view("u4"), y.view("u4"))
            if not ok:
                bad.append("-s %s layer %d %s: max diff %g" % (s, l, t, np.abs(x - y).max()))
print("\n".join(bad)) if bad else None
sys.exit(1 if bad else 0)
PY

# ---- chains ------------------------------------------------------------------------------------
kv-synth --preset stories260k -n 200 --window 16 --attn-stats | kv-compress -s kivi -r 8 \
  | kv-evict -s h2o -b 50 > chain.kv.h5 || fail "kv-compress | kv-evict"
kv-inspect chain.kv.h5 > chain.txt
grep -q "^encoding    k: kivi bits=2 group=32 axis=channel residual=8, v: kivi bits=2 group=32 axis=token residual=8," chain.txt \
  && pass "kv-evict keeps the kivi encoding" || fail "chain encoding: $(grep ^encoding chain.txt)"
grep -q "^entries     1000 of 4000 token slots (25.0%)" chain.txt && pass "kv-evict after kivi: 1000 entries" \
  || fail "chain entries: $(grep ^entries chain.txt)"
# Per head of 50 rows (42 quantized, 8 residual), head_dim 8: k 84 code bytes + 16 groups x 4 +
# 128 residual = 276 bytes, v 84 + 42 x 4 + 128 = 380 bytes: (276 + 380) x 8 / 800 = 6.56.
grep -q "^bits/value  6.560 " chain.txt && pass "evicted kivi: 6.56 bits/value (50 rows, 42 quantized, 8 residual)" \
  || fail "chain bits: $(grep ^bits chain.txt)"
$PY <<'PY' && pass "evicted kivi: 50 entries per head, groups re-encoded (h5py)" || fail "chain layout"
import h5py, numpy as np
f = h5py.File("chain.kv.h5", "r")
for l in range(5):
    g = f["layers/%03d" % l]
    assert list(np.diff(g["head_offsets"][:])) == [50] * 4
    for t in "kv":
        assert g[t].attrs["scheme"] in (b"kivi", "kivi")
        assert g[t]["residual"].size == 4 * 8 * 8
PY
kv-compress -s q4_0 c16.kv.h5 | kv-eval -r c16.kv.h5 --csv - > eval.csv || fail "kv-compress | kv-eval"
$PY - eval.csv <<'PY' && pass "kv-eval on a q4_0 candidate: ratio 0.28125, small error" || fail "kv-eval: $(cat eval.csv)"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
assert len(rows) == 1
r = rows[0]
assert abs(float(r["ratio_to_reference"]) - 4.5 / 16) < 1e-6, r
assert int(r["entries"]) == 1024 and int(r["kv_bytes"]) == 2 * 2 * 512 * 64 * 4.5 / 8, r
assert 0 < float(r["rel_error"]) < 0.5 and float(r["cosine"]) > 0.9, r
PY
kv-eval -r c16.kv.h5 n-kivi.kv.h5 > eval.txt && grep -qE "^storage     k\+v [0-9.]+ KiB of 256\.00 KiB \(0\.[0-9]+ of the reference" eval.txt \
  && pass "kv-eval reads a kivi candidate, ratio < 1" || fail "kv-eval kivi: $(cat eval.txt)"

# ---- bad requests -------------------------------------------------------------------------------
kv-synth --preset stories260k --head-dim 12 -n 64 -o h12.kv.h5 || fail "synth head_dim 12"
sha_h12=$(sha256sum h12.kv.h5)
expect_code 64 kv-compress s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: give either --scheme NAME or -d$"
expect_code 64 kv-compress -s uniform -d s.kv.h5 -o x.kv.h5
expect_err_line "give either --scheme NAME or -d"
expect_code 64 kv-compress -s zip s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: --scheme: zip not in"
expect_code 64 kv-compress -s uniform -b 5 s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: .*bits 5 is not 2, 3, 4 or 8"
expect_code 64 kv-compress -s kivi -b 1 s.kv.h5 -o x.kv.h5
expect_err_line "bits 1 is not 2, 3, 4 or 8"
expect_code 64 kv-compress -s uniform -g 3 s.kv.h5 -o x.kv.h5
expect_err_line "group 3 along a token must divide head_dim 8"
expect_code 64 kv-compress -s uniform -g 0 --axis channel s.kv.h5 -o x.kv.h5
expect_err_line "group 0 is outside"
expect_code 64 kv-compress -s uniform -r -1 s.kv.h5 -o x.kv.h5
expect_err_line "residual -1"
expect_code 64 kv-compress -s svd --rank 0 s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: .*rank 0 is (below 1|outside \[1, head_dim 8\])"
rm -f x.kv.h5  # (if --rank 0 was taken: already reported above)
expect_code 64 kv-compress -s svd --rank 999 s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: .*rank 999 is outside \[1, head_dim 8\]"
expect_code 64 kv-compress -s svd --energy 1.5 s.kv.h5 -o x.kv.h5
expect_err_line "energy 1.5 is outside \(0, 1\]"
expect_code 64 kv-compress -s svd --energy 0 s.kv.h5 -o x.kv.h5
expect_err_line "energy 0 is outside \(0, 1\]"
expect_code 64 kv-compress -s svd --rank 2 --energy 0.5 s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: give --rank or --energy, not both$"
expect_code 64 kv-compress -s kivi --axis token s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: kivi fixes the axes.*--scheme uniform --axis"
expect_code 64 kv-compress -s svd --hadamard s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: .*([Hh]adamard.*svd|svd.*[Hh]adamard)"
expect_code 64 kv-compress -s uniform --pre-rope s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: .*([Pp]re-[Rr][Oo][Pp][Ee].*uniform|uniform.*[Pp]re-[Rr][Oo][Pp][Ee])"
expect_code 64 kv-compress -s q8_0 -b 4 s.kv.h5 -o x.kv.h5
expect_err_line "^kv-compress: .*bits.*q8_0"
expect_code 64 kv-compress -s q8_0 --hadamard h12.kv.h5 -o x.kv.h5
expect_err_line "Hadamard rotation needs head_dim a power of 2, not 12"
expect_code 64 kv-compress -s fp8 --format e3m4 s.kv.h5 -o x.kv.h5
expect_err_line "--format: e3m4 not in"
expect_code 64 kv-compress -s q8_0 s.kv.h5 -o s.kv.h5
expect_err_line "is the input file"
expect_code 66 kv-compress -s q8_0 missing.kv.h5 -o x.kv.h5
expect_err_line "cannot open 'missing.kv.h5'"
expect_code 73 kv-compress -s q8_0 s.kv.h5 -o no/such/dir/x.kv.h5
[ ! -e x.kv.h5 ] && pass "no output after bad requests" || fail "x.kv.h5 left behind"
# q8_0 without rotation pads each head's last block: head_dim 12 is fine.
kv-compress -s q8_0 h12.kv.h5 | kv-inspect --json - | grep -q '"k_encoding":"q8_0"' && pass "q8_0 on head_dim 12" || fail "q8_0 on head_dim 12"

# NaN in the input: the reader refuses it (65), and with --allow-nonfinite the encoder does.
cp s.kv.h5 nan.kv.h5
$PY -c "
import h5py
f = h5py.File('nan.kv.h5', 'r+'); k = f['layers/001/k']; a = k[:]; a[3, 2] = float('nan'); k[...] = a
" || fail "write a NaN"
sha_nan=$(sha256sum nan.kv.h5)
expect_code 65 kv-compress -s kivi nan.kv.h5 -o x.kv.h5
expect_err_line "layer 1: k holds 1 NaN/Inf values \(--allow-nonfinite"
for s in uniform kivi q8_0 q4_0 fp8 svd; do
  expect_code 65 kv-compress -s $s --allow-nonfinite nan.kv.h5 -o x.kv.h5
  expect_err_line "layer 1: 'k': .*entry 3 channel 2 is nan; only finite values can be encoded"
done
cat nan.kv.h5 | kv-compress -s q8_0 --allow-nonfinite > piped-nan.kv.h5 2>err
[ $? = 65 ] && grep -q "only finite values" err && pass "pipe: NaN refused (65)" || fail "pipe NaN: $(cat err)"
[ ! -e x.kv.h5 ] && [ ! -s piped-nan.kv.h5 ] && [ "$(ls | grep -c '\.tmp')" = 0 ] \
  && pass "no output (or temporary) after a failed encode" || fail "left behind: $(ls | grep -E 'x\.kv|tmp|piped-nan')"

# Damaged encoded files: every reader exits 65 naming the array or the parameter.
kv-compress -s uniform s.kv.h5 -o u.kv.h5 && kv-compress -s svd --rank 4 s.kv.h5 -o sv.kv.h5 \
  && kv-compress -s q8_0 s.kv.h5 -o q8.kv.h5 && kv-compress -s fp8 s.kv.h5 -o f8.kv.h5 || fail "damage inputs"
$PY <<'PY' || fail "damage files"
import shutil
import h5py, numpy as np
def mk(src, dst, fn):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        fn(f)
def replace(g, name, a):
    del g[name]
    g[name] = a
mk("u.kv.h5", "bad-nocodes.kv.h5", lambda f: f["layers/002/k"].__delitem__("codes"))
mk("u.kv.h5", "bad-short.kv.h5", lambda f: replace(f["layers/002/v"], "codes", f["layers/002/v/codes"][:-1]))
mk("u.kv.h5", "bad-bits.kv.h5", lambda f: f["layers/000/k"].attrs.__setitem__("bits", 7))
mk("u.kv.h5", "bad-noscheme.kv.h5", lambda f: f["layers/000/k"].attrs.__delitem__("scheme"))
mk("u.kv.h5", "bad-scheme.kv.h5", lambda f: f["layers/000/k"].attrs.__setitem__("scheme", np.bytes_("zip")))
mk("u.kv.h5", "bad-type.kv.h5", lambda f: replace(f["layers/000/k"], "scales", f["layers/000/k/scales"][:].astype(np.float64)))
mk("q8.kv.h5", "bad-blocks.kv.h5", lambda f: replace(f["layers/000/v"], "blocks", f["layers/000/v/blocks"][:100]))
def rank(f):
    r = f["layers/001/k/ranks"]; a = r[:]; a[0] = 99; r[...] = a
mk("sv.kv.h5", "bad-rank.kv.h5", rank)
def scale(f):
    s = f["layers/000/k/scales"]; a = s[:]; a[1] = -1; s[...] = a
mk("f8.kv.h5", "bad-fp8scale.kv.h5", scale)
PY
damaged=(
  "bad-nocodes|layer 2: 'k': encoding 'uniform' lacks its array 'codes'"
  "bad-short|layer 2: 'v': encoding 'uniform': array 'codes' has 3199 elements; the layout needs 3200"
  "bad-bits|layer 0: 'k': scheme uniform: bits 7 is not 2, 3, 4 or 8"
  "bad-noscheme|layer 0: 'k' has no attribute 'scheme'"
  "bad-scheme|layer 0: 'k' uses encoding 'zip', which this kvtk cannot decode"
  "bad-type|layer 0: 'k': 'scales' is not u8, i32, f16 or f32"
  "bad-blocks|layer 0: 'v': encoding 'q8_0': array 'blocks' has 100 elements"
  "bad-rank|layer 1: 'k': encoding 'svd': head 0 has rank 99, outside \[0, 8\]"
  "bad-fp8scale|layer 0: 'k': encoding 'fp8': scale 1 is -1, not a positive number"
)
for d in "${damaged[@]}"; do
  f=${d%%|*}.kv.h5 msg=${d#*|}
  sha=$(sha256sum $f)
  expect_code 65 kv-inspect $f
  expect_err_line "^kv-inspect: '$f' $msg"
  expect_code 65 kv-compress -d $f -o x.kv.h5
  expect_err_line "^kv-compress: '$f' $msg"
  expect_code 65 kv-evict -s knorm -b 10 $f -o x.kv.h5
  expect_err_line "$msg"
  cat $f | kv-compress -s q8_0 > /dev/null 2>err
  [ $? = 65 ] && [ "$(wc -l < err)" = 1 ] && grep -q -- "$msg" err && pass "$f through a pipe: 65" || fail "$f piped: $(cat err)"
  [ "$(sha256sum $f)" = "$sha" ] || fail "$f modified"
done
[ ! -e x.kv.h5 ] && [ "$(ls | grep -c '\.tmp')" = 0 ] && pass "no output after damaged input" || fail "left behind: $(ls | grep -E 'x\.kv|tmp')"
[ "$(sha256sum s.kv.h5)" = "$sha_s" ] && [ "$(sha256sum c16.kv.h5)" = "$sha_c16" ] \
  && [ "$(sha256sum h12.kv.h5)" = "$sha_h12" ] && [ "$(sha256sum nan.kv.h5)" = "$sha_nan" ] \
  && pass "inputs unchanged after every failure" || fail "an input was modified"

# mikv: rows ranked by attention statistics; share 0 and 1 are plain uniform 2- and 8-bit.
kv-synth --preset stories260k -n 200 --window 16 --attn-stats -o a.kv.h5 || fail "synth with attention statistics"
kv-compress -s mikv a.kv.h5 -o m.kv.h5 && kv-inspect m.kv.h5 | grep -q "^encoding    k: mikv bits=2 high_bits=8 high_share=0.2 group=32" \
  && pass "mikv written and shown" || fail "mikv: $(kv-inspect m.kv.h5 | grep ^encoding)"
for pair in "0|-b 2" "1|-b 8"; do
  share=${pair%%|*}; bits=${pair#*|}
  kv-compress -s mikv --high-share "$share" --no-provenance a.kv.h5 -o m$share.kv.h5 \
    && kv-compress -s uniform $bits --no-provenance a.kv.h5 -o u$share.kv.h5 \
    && kv-compress -d --dtype f32 m$share.kv.h5 -o dm$share.kv.h5 && kv-compress -d --dtype f32 u$share.kv.h5 -o du$share.kv.h5 \
    && [ "$(snaptool digest dm$share.kv.h5)" = "$(snaptool digest du$share.kv.h5)" ] \
    && pass "mikv --high-share $share decodes as uniform $bits" || fail "mikv --high-share $share differs from uniform $bits"
done
kv-evict -s h2o -b 50 m.kv.h5 -o me.kv.h5 && kv-inspect me.kv.h5 | grep -q "^encoding    k: mikv" \
  && pass "kv-evict keeps mikv (re-ranked on the kept entries)" || fail "mikv after kv-evict"
expect_code 65 kv-compress -s mikv s.kv.h5 -o x.kv.h5
expect_err_line "mikv ranks entries by attention statistics.*kv-capture --attn-stats"
expect_code 64 kv-compress -s uniform --high-bits 4 a.kv.h5 -o x.kv.h5
expect_err_line "--high-bits does not apply to scheme uniform"
expect_code 64 kv-compress -s mikv -b 8 --high-bits 4 a.kv.h5 -o x.kv.h5
expect_err_line "high bits 4 are fewer than bits 8"
[ ! -e x.kv.h5 ] && pass "no output after mikv errors" || fail "x.kv.h5 left behind"

finish
