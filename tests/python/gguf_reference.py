#!/usr/bin/env python3
"""Independent references for kvtk's GGUF code, from PyPI's gguf package (gguf-py, llama.cpp's
Python library).

  gguf_reference.py write OUT.gguf
      Writes, with gguf-py's GGUFWriter (alignment 64), metadata of every value type and, for
      each type T in f32 f16 bf16 q8_0 q4_0 q4_K q6_K, a tensor "T.q" of type T and a tensor
      "T.ref" (F32) holding gguf.quants.dequantize's values for it. test_gguf's
      GgufReference.MatchesGgufPy compares kvtk's dequantize() with them.
      Q8_0, Q4_0 and BF16 data come from gguf's own quantizers; gguf has no quantizer for Q4_K or
      Q6_K, so those are random blocks (every bit pattern is a valid block) with scales chosen
      to be finite.

  gguf_reference.py check-writer IN.gguf
      Reads a file written by kvtk's GgufWriter (test_gguf's GgufReference.WriteForGgufPy) with
      gguf-py's GGUFReader and checks its contents.
"""
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q


def write(path):
    rng = np.random.default_rng(20240611)
    w = gguf.GGUFWriter(path, arch="kvtkref")
    w.add_custom_alignment(64)
    w.add_uint8("ref.u8", 200)
    w.add_int8("ref.i8", -100)
    w.add_uint16("ref.u16", 60000)
    w.add_int16("ref.i16", -30000)
    w.add_uint32("ref.u32", 4000000000)
    w.add_int32("ref.i32", -2000000000)
    w.add_float32("ref.f32", 1.5)
    w.add_bool("ref.bool", True)
    w.add_string("ref.str", "héllo")
    w.add_uint64("ref.u64", 2**60)
    w.add_int64("ref.i64", -(2**60))
    w.add_float64("ref.f64", 0.1)
    w.add_array("ref.nested", [[1, 2], [3, 4, 5]])
    w.add_array("ref.strs", ["a", "bc"])

    rows, cols = 4, 512  # ggml dims [512, 4]
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    # Special values: signed zero, a subnormal, infinities, NaN, extremes.
    x[0, :8] = [0.0, -0.0, 1e-40, np.inf, -np.inf, np.nan, 3.0e38, -1.0e-30]

    def add(name, qtype, data):
        """data: the tensor's raw bytes as uint8 [rows, bytes per row], or a float array."""
        if data.dtype == np.uint8:
            w.add_tensor(name + ".q", data, raw_dtype=qtype)
        else:
            w.add_tensor(name + ".q", data)
        ref = gguf.quants.dequantize(data, qtype).astype(np.float32)
        assert ref.shape == (rows, cols), (name, ref.shape)
        w.add_tensor(name + ".ref", np.ascontiguousarray(ref))

    add("f32", Q.F32, x)
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)  # overflows to inf where |x| > 65504
    h[1, :6] = np.array([6.0e-8, -6.0e-8, 65504, -65504, 1e-5, np.nan], dtype=np.float16)
    add("f16", Q.F16, h)
    add("bf16", Q.BF16, gguf.quants.quantize(x, Q.BF16))
    finite = rng.standard_normal((rows, cols)).astype(np.float32)
    finite[0, :32] = 0.0  # an all-zero block (d = 0)
    add("q8_0", Q.Q8_0, gguf.quants.quantize(finite, Q.Q8_0))
    add("q4_0", Q.Q4_0, gguf.quants.quantize(finite, Q.Q4_0))

    def random_blocks(qtype, f16_fields):
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        n = rows * cols // block_values
        b = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
        for at in f16_fields:
            d = (rng.standard_normal(n) * 0.05).astype(np.float16)
            d[0] = np.float16(-0.75)   # negative scale
            d[1] = np.float16(3e-6)    # subnormal scale
            b[:, at:at + 2] = d.view(np.uint8).reshape(n, 2)
        return b.reshape(rows, -1)

    add("q4_K", Q.Q4_K, random_blocks(Q.Q4_K, [0, 2]))   # d, dmin lead the block
    add("q6_K", Q.Q6_K, random_blocks(Q.Q6_K, [208]))    # d ends the block

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_writer(path):
    """Expectations mirror test_gguf.cpp's GgufReference.WriteForGgufPy."""
    r = gguf.GGUFReader(path)
    failures = []

    def expect(what, got, want):
        if got != want:
            failures.append(f"{what}: got {got!r}, want {want!r}")

    def field(key):
        f = r.fields.get(key)
        if f is None:
            failures.append(f"missing key {key}")
            return None, None
        return f.contents(), [t.name for t in f.types]

    expect("version", int(r.fields["GGUF.version"].contents()), 3)
    expect("alignment", r.alignment, 32)
    want = {
        "general.architecture": ("llama", ["STRING"]),
        "llama.block_count": (5, ["UINT32"]),
        "kvtk.i32": (-7, ["INT32"]),
        "kvtk.f32": (0.25, ["FLOAT32"]),
        "kvtk.u64": (2**40, ["UINT64"]),
        "kvtk.bool": (True, ["BOOL"]),
        "kvtk.strings": (["a", "", "héllo"], ["ARRAY", "STRING"]),
        "kvtk.floats": ([1.5, -2.0], ["ARRAY", "FLOAT32"]),
        "kvtk.ints": ([1, -2, 3], ["ARRAY", "INT32"]),
    }
    for key, (value, types) in want.items():
        got, got_types = field(key)
        expect(key, got, value)
        expect(key + " type", got_types, types)
    expect("keys", [k for k in r.fields if not k.startswith("GGUF.")], list(want))

    tensors = {t.name: t for t in r.tensors}
    expect("tensor names", [t.name for t in r.tensors], ["a", "b", "c"])
    if not failures:
        a, b, c = tensors["a"], tensors["b"], tensors["c"]
        expect("a shape", [int(d) for d in a.shape], [3, 2])
        expect("a type", a.tensor_type, Q.F32)
        expect("a data", gguf.quants.dequantize(a.data, Q.F32).ravel().tolist(), [0, 1, 2, 3, 4, 5])
        expect("b type", b.tensor_type, Q.F16)
        expect("b data", gguf.quants.dequantize(b.data, Q.F16).ravel().tolist(), [1, -2, 0.5, 65504, -0.0])
        expect("c shape", [int(d) for d in c.shape], [32, 2])
        expect("c type", c.tensor_type, Q.Q8_0)
        want_c = [j - 16 for j in range(32)] + [0.5 * (j - 16) for j in range(32)]
        expect("c data", gguf.quants.dequantize(c.data, Q.Q8_0).ravel().tolist(), want_c)
        for t in r.tensors:
            expect(t.name + " aligned", t.data_offset % 32, 0)
    for f in failures:
        print("FAIL:", f)
    if failures:
        sys.exit(1)
    print(f"gguf-py reads {path}: {len(want)} keys and 3 tensors as expected")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check-writer"):
        sys.exit(__doc__)
    write(sys.argv[2]) if sys.argv[1] == "write" else check_writer(sys.argv[2])
