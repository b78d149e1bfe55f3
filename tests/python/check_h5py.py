"""Reads a kvsnap file with h5py and checks one layer's keys against libkv's own f32 dump.

usage: check_h5py.py FILE LAYER KEYS.f32 DTYPE
"""
import sys

import h5py
import numpy as np

path, layer, dump, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with h5py.File(path, "r") as f:
    assert f.attrs["format"] == b"kvsnap" or f.attrs["format"] == "kvsnap", f.attrs["format"]
    assert list(f.attrs["format_version"]) == [1, 1]
    g = f["layers/%03d" % layer]
    k = g["k"][...]
    want_dtype = {"f16": np.float16, "f32": np.float32}[dtype]
    assert k.dtype == want_dtype, k.dtype
    n_kv, d = int(f.attrs["n_kv_heads"]), int(f.attrs["head_dim"])
    off = g["head_offsets"][...]
    assert off[0] == 0 and off[-1] == k.shape[0] and len(off) == n_kv + 1
    assert k.shape[1] == d
    pos = g["positions"][...]
    for h in range(n_kv):
        p = pos[off[h]:off[h + 1]]
        assert np.all(np.diff(p) > 0)
    want = np.fromfile(dump, dtype=np.float32).reshape(k.shape)
    assert np.array_equal(k.astype(np.float32), want), np.abs(k.astype(np.float32) - want).max()
print("ok", path, k.dtype, k.shape)
