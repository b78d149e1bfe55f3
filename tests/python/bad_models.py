#!/usr/bin/env python3
"""Malformed variants of a real GGUF model, for kv-capture's bad-input tests (tests/cli/capture.sh).

  bad_models.py SRC.gguf OUTDIR

Reads SRC.gguf (stories260K.gguf) with PyPI's gguf package (gguf-py's GGUFReader) and writes, with
its GGUFWriter, copies of every metadata key and tensor into OUTDIR:

  copy.gguf   unaltered (a control: the copying itself must give a model kv-capture accepts)
  arch.gguf   general.architecture = "gpt2"; everything else as in SRC
  shape.gguf  blk.0.attn_q.weight keeps only its first half of rows: ggml shape [64, 32], not [64, 64]
  type.gguf   blk.0.attn_k.weight stored as Q5_0, a ggml type kvtk does not dequantize

Each file is a well-formed GGUF v3 file (gguf-py's own reader reads it back); only the model
it describes is wrong.
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V


def copy_model(reader, path, arch="llama", tensor_hook=None):
    """Writes `reader`'s metadata (less GGUF.* and general.architecture, which the writer sets
    from `arch`) and tensors to `path`. tensor_hook(name, array) may return (array, raw_dtype)."""
    w = gguf.GGUFWriter(path, arch=arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == V.ARRAY:
            w.add_key_value(field.name, field.contents(), V.ARRAY, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, field.contents(), vtype)
    for t in reader.tensors:
        data, raw_dtype = np.array(t.data), None
        if t.tensor_type != Q.F32:
            raw_dtype = Q(t.tensor_type)
        if tensor_hook is not None:
            changed = tensor_hook(t.name, data)
            if changed is not None:
                data, raw_dtype = changed
        if raw_dtype is None:
            w.add_tensor(t.name, np.ascontiguousarray(data))
        else:
            w.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gguf.GGUFReader(path)  # reads back: the file itself is well formed


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: bad_models.py SRC.gguf OUTDIR")
    src, out = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(src)
    names = {t.name: t for t in reader.tensors}
    for need in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        if need not in names or names[need].tensor_type != Q.F32:
            sys.exit("bad_models.py: %s: expected an F32 tensor %s" % (src, need))
    os.makedirs(out, exist_ok=True)

    copy_model(reader, os.path.join(out, "copy.gguf"))
    copy_model(reader, os.path.join(out, "arch.gguf"), arch="gpt2")

    def half_q(name, data):
        if name == "blk.0.attn_q.weight":
            return data[: data.shape[0] // 2], None  # numpy [rows, cols]: ggml [cols, rows/2]
        return None

    copy_model(reader, os.path.join(out, "shape.gguf"), tensor_hook=half_q)

    def q5_0(name, data):
        if name == "blk.0.attn_k.weight":
            return gguf.quants.quantize(data.astype(np.float32), Q.Q5_0), Q.Q5_0
        return None

    copy_model(reader, os.path.join(out, "type.gguf"), tensor_hook=q5_0)

    # The alterations are what the files say (guards against a silent no-op).
    r = gguf.GGUFReader(os.path.join(out, "arch.gguf"))
    assert r.fields["general.architecture"].contents() == "gpt2"
    cols, rows = (int(d) for d in names["blk.0.attn_q.weight"].shape)
    r = gguf.GGUFReader(os.path.join(out, "shape.gguf"))
    assert [list(t.shape) for t in r.tensors if t.name == "blk.0.attn_q.weight"] == [[cols, rows // 2]]
    r = gguf.GGUFReader(os.path.join(out, "type.gguf"))
    assert [t.tensor_type for t in r.tensors if t.name == "blk.0.attn_k.weight"] == [Q.Q5_0]


if __name__ == "__main__":
    main()
