"""Bit-for-bit comparison of two snapshots with h5py, for the CLI tests:
`python3 h5same.py REF GOT` exits non-zero (with the first difference) unless every group,
dataset and attribute of REF but provenance and history is in GOT, stored with the same type."""
import re
import sys

import h5py
import numpy as np


def raw(d):
    """A dataset's stored bytes as numpy (bf16 read without conversion, as u16)."""
    t = d.id.get_type()
    if isinstance(t, h5py.h5t.TypeFloatID) and t.get_size() == 2 and t.get_fields()[2] == 8:
        a = np.empty(d.shape, dtype="<u2")
        d.id.read(h5py.h5s.ALL, h5py.h5s.ALL, a, mtype=t)
        return a
    return d[()]

def type_key(d):
    t = d.id.get_type()
    if isinstance(t, h5py.h5t.TypeFloatID):
        return ("float", t.get_size(), t.get_fields(), t.get_ebias())
    return (str(d.dtype), t.get_size())

def same_value(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype == object or b.dtype == object:
            return a.shape == b.shape and list(a.ravel()) == list(b.ravel())
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return type(a) == type(b) and a == b

def datasets(f):
    out = {}
    def visit(name, obj):
        if name.startswith("provenance"):
            return
        out[name] = obj
    f.visititems(visit)
    return out

def compare_files(ref, got, skip_kv=False):
    """Every group, dataset and attribute of `ref` (but provenance and history) is in `got`,
    bit for bit, stored with the same type; nothing extra."""
    a, b = h5py.File(ref, "r"), h5py.File(got, "r")
    kv = re.compile(r"^layers/[0-9]+/[kv](/|$)")
    da = {n: o for n, o in datasets(a).items() if not (skip_kv and kv.match(n))}
    db = {n: o for n, o in datasets(b).items() if not (skip_kv and kv.match(n))}
    assert da.keys() == db.keys(), (ref, got, sorted(set(da) ^ set(db))[:8])
    for n, o in da.items():
        p = db[n]
        assert isinstance(o, h5py.Dataset) == isinstance(p, h5py.Dataset), n
        ka = {k: v for k, v in o.attrs.items()}
        kb = {k: v for k, v in p.attrs.items()}
        assert ka.keys() == kb.keys() and all(same_value(ka[k], kb[k]) for k in ka), (n, ka, kb)
        if isinstance(o, h5py.Dataset):
            assert type_key(o) == type_key(p), (n, type_key(o), type_key(p))
            assert same_value(raw(o), raw(p)), (ref, got, n)
    at = {k: v for k, v in a.attrs.items() if k != "history"}
    bt = {k: v for k, v in b.attrs.items() if k != "history"}
    assert at.keys() == bt.keys() and all(same_value(at[k], bt[k]) for k in at), (at, bt)


if __name__ == "__main__":
    compare_files(sys.argv[1], sys.argv[2])
