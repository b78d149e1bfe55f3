#!/usr/bin/env python3
"""gguf-py's reference q8_0 and q4_0 quantizers (PyPI's gguf package, llama.cpp's Python library)
applied to values kvtk chose, for kvtk's bit-for-bit comparison.

  quant_reference.py VALUES.f32 OUTDIR
      VALUES.f32 holds little-endian float32 values, a multiple of 32 of them (test_quant's
      QuantReference.WriteInputs writes it). For T in q8_0 q4_0 this writes OUTDIR/T.bin, the
      bytes gguf.quants.quantize gives, and OUTDIR/T.f32, gguf.quants.dequantize of those bytes
      as little-endian float32; it copies the values to OUTDIR/values.f32 unless that is the
      input. test_quant's QuantReference.MatchesGgufPy (KV_QUANT_REFERENCE=OUTDIR) compares.
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q


def main(values_path, outdir):
    x = np.fromfile(values_path, dtype="<f4")
    if x.size == 0 or x.size % 32:
        sys.exit(f"{values_path}: {x.size} values, not a positive multiple of 32")
    os.makedirs(outdir, exist_ok=True)
    copy = os.path.join(outdir, "values.f32")
    if not os.path.exists(copy) or not os.path.samefile(values_path, copy):
        x.tofile(copy)
    for name, qtype in (("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)):
        # Tiny blocks overflow 1/d and huge ones overflow d's f16: numpy warns, as C would trap
        # if it could; the results are what the comparison is about.
        with np.errstate(all="ignore"):
            q = gguf.quants.quantize(x, qtype)
            y = gguf.quants.dequantize(q, qtype)
        assert q.dtype == np.uint8 and q.size == x.size // 32 * (34 if name == "q8_0" else 18)
        assert y.size == x.size
        q.tofile(os.path.join(outdir, name + ".bin"))
        y.astype("<f4").tofile(os.path.join(outdir, name + ".f32"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
