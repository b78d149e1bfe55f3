// libFuzzer target for the snapshot reader's validation of untrusted content.
//
// Mutating raw HDF5 bytes mostly exercises libhdf5's own parser (whose bugs we cannot fix here),
// so this target is structure-aware: the input decides the *content* of a well-formed HDF5 file
// — model shape attributes, format version, token counts, head offsets, positions, dataset
// shapes and element types, NaNs, missing or extra objects — written with the raw HDF5 API,
// bypassing libkv's writer checks. libkv must then either read it or throw kv::Error; any crash,
// sanitizer report or other exception is a bug.
#include <hdf5.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kv/encoding.h"
#include "kv/error.h"
#include "kv/snapshot.h"
#include "kv/snapshot_io.h"

namespace {

struct Bytes {
  const uint8_t* p;
  size_t n;
  uint8_t u8() {
    if (!n) return 0;
    --n;
    return *p++;
  }
  int64_t small(int64_t lo, int64_t hi) { return lo + int64_t(u8()) % (hi - lo + 1); }
  int64_t wide() {
    int64_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | u8();
    return int32_t(v);
  }
};

void attr_int(hid_t loc, const char* name, int64_t v) {
  hid_t s = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(loc, name, H5T_NATIVE_INT64, s, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_INT64, &v);
  H5Aclose(a);
  H5Sclose(s);
}

void attr_str(hid_t loc, const char* name, const std::string& v) {
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, v.size() + 1);
  hid_t s = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(loc, name, t, s, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, t, v.c_str());
  H5Aclose(a);
  H5Sclose(s);
  H5Tclose(t);
}

template <class T>
void dataset(hid_t loc, const char* name, hid_t type, std::vector<hsize_t> dims,
             const std::vector<T>& data) {
  hsize_t n = 1;
  for (auto d : dims) n *= d;
  std::vector<T> full(n);
  for (size_t i = 0; i < n && !data.empty(); ++i) full[i] = data[i % data.size()];
  hid_t s = H5Screate_simple(int(dims.size()), dims.data(), nullptr);
  hid_t d = H5Dcreate2(loc, name, type, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (n) H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, full.data());
  H5Dclose(d);
  H5Sclose(s);
}

void attr_double(hid_t loc, const char* name, double v) {
  hid_t s = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(loc, name, H5T_NATIVE_DOUBLE, s, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_DOUBLE, &v);
  H5Aclose(a);
  H5Sclose(s);
}

// An encoded k or v (kvsnap section 9): when the layer's layout is sound, a real encoding of
// random values by libkv (so decoding gets past the length checks), then damaged: a parameter
// changed, an array dropped, shortened, lengthened or its bytes overwritten; otherwise arrays
// of arbitrary lengths. Every parameter and array name of every scheme can appear.
void encoded_group(Bytes& in, hid_t layer, const char* name, int64_t D, int64_t Hkv,
                   const std::vector<int64_t>& off, const std::vector<int32_t>& pos) {
  std::vector<std::string> names = kv::scheme_names();
  names.push_back("paged");      // written by kv-offload only
  names.push_back("minicache");  // written by kv-merge only
  names.push_back("external");   // written by kv-offload only (its object parser: test_page_store)
  kv::Encoding e;
  try {
    e = kv::default_encoding(names[1 + in.u8() % (names.size() - 1)], name[0]);
  } catch (const kv::Error&) {
  }
  if (e.scheme == "paged") e.store = in.u8() & 1 ? "/nonexistent-kvtk-store" : "";
  if (e.scheme == "minicache") e.partner = int(in.small(-1, 3));
  if (e.scheme == "external") {
    e.inner = names[in.u8() % names.size()];
    e.store = in.u8() & 1 ? "/nonexistent-kvtk-store" : "";
  }
  const uint8_t knobs = in.u8();
  if (knobs & 1) e.bits = int(in.small(0, 9));
  if (knobs & 2) e.group = int(in.small(-1, 40));
  if (knobs & 4) e.residual = int(in.small(-1, 9));
  if (knobs & 8) e.rank = int(in.small(-1, 7));
  if (knobs & 16) e.hadamard = true;
  if (knobs & 32) e.axis = in.u8() & 1 ? "token" : "channel";
  if (knobs & 64) e.high_share = double(in.small(-1, 11)) / 10;
  if (knobs & 128) e.outliers = double(in.small(0, 10)) / 10;
  std::vector<kv::CodeArray> arrays;
  bool layout_ok = Hkv > 0 && D > 0 && int64_t(off.size()) == Hkv + 1 && off[0] == 0 &&
                   off.back() == int64_t(pos.size());
  for (size_t h = 0; layout_ok && h + 1 < off.size(); ++h) layout_ok = off[h + 1] >= off[h];
  for (int32_t p : pos) layout_ok = layout_ok && p >= 0;
  if (layout_ok) {
    kv::ModelInfo model;
    model.n_layers = 1;
    model.n_kv_heads = model.n_q_heads = int(Hkv);
    model.head_dim = int(D);
    model.rope_dims = int(D - D % 2);
    std::vector<float> x(size_t(off.back() * D)), importance(pos.size(), 1.0f);
    for (float& v : x) v = float(int(in.u8()) - 128) / 16;
    kv::RowLayout rows{model, off, pos, importance.data()};
    try {
      kv::check_encoding(e, model, name[0]);
      arrays = kv::encode(e, x.data(), rows).arrays;
    } catch (const kv::Error&) {
    }
  }
  // Damage.
  const uint8_t damage = in.u8();
  if (!arrays.empty() && (damage & 3) == 1) arrays.erase(arrays.begin() + in.u8() % arrays.size());
  if (!arrays.empty() && (damage & 3) == 2) {
    kv::CodeArray& a = arrays[in.u8() % arrays.size()];
    a.bytes.resize(size_t(std::max<int64_t>(0, int64_t(a.bytes.size()) + in.small(-8, 8))));
  }
  if (!arrays.empty() && (damage & 3) == 3) {
    kv::CodeArray& a = arrays[in.u8() % arrays.size()];
    for (uint8_t& b : a.bytes) b = in.n ? in.u8() : b;
  }
  if (arrays.empty() || (damage & 4)) {  // arbitrary arrays
    const char* all[] = {
        "codes",         "scales",        "zeros",        "residual",   "blocks",
        "ranks",         "coeffs",        "basis",        "levels",     "outlier_counts",
        "outlier_index", "outlier_value", "high",         "codes_high", "scales_high",
        "zeros_high",    "codes_low",     "scales_low",   "zeros_low",  "local",
        "external",      "ids",           "page_key_min", "merged",     "norms",
        "rows"};
    const kv::CodeArray::Type types[] = {kv::CodeArray::Type::u8, kv::CodeArray::Type::f16,
                                         kv::CodeArray::Type::f32, kv::CodeArray::Type::i32};
    for (int i = 0, n = int(in.small(0, 4)); i < n; ++i) {
      kv::CodeArray a;
      a.name = all[in.u8() % std::size(all)];
      a.type = types[in.u8() % 4];
      a.bytes.resize(kv::CodeArray::element_size(a.type) * size_t(in.small(0, 24)));
      for (uint8_t& b : a.bytes) b = in.u8();
      arrays.push_back(std::move(a));
    }
  }
  hid_t g = H5Gcreate2(layer, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (!(damage & 8)) attr_str(g, "scheme", damage & 16 ? "wavelet" : e.scheme);
  attr_int(g, "bits", e.bits);
  attr_int(g, "group", e.group);
  attr_str(g, "axis", e.axis);
  attr_int(g, "symmetric", e.symmetric);
  attr_int(g, "residual", e.residual);
  attr_str(g, "format", damage & 32 ? "e3m4" : e.fp8_format);
  attr_str(g, "scale", e.scale_scope);
  attr_int(g, "rank", e.rank);
  attr_double(g, "energy", e.energy);
  attr_str(g, "factors", e.factors);
  attr_int(g, "pre_rope", e.pre_rope);
  attr_double(g, "outliers", e.outliers);
  attr_int(g, "high_bits", damage & 64 ? 99 : e.high_bits);
  attr_double(g, "high_share", e.high_share);
  attr_int(g, "hadamard", e.hadamard);
  attr_int(g, "page", e.page_size);
  attr_str(g, "store", e.store);
  attr_str(g, "dtype", e.dtype);
  attr_int(g, "partner", e.partner);
  attr_str(g, "inner", e.inner);
  for (const kv::CodeArray& a : arrays) {
    // f16 as kvsnap section 8 defines it, sometimes replaced by uint16 (a wrong type).
    hid_t f16 = H5Tcopy(H5T_IEEE_F32LE);
    H5Tset_fields(f16, 15, 10, 5, 0, 10);
    H5Tset_size(f16, 2);
    H5Tset_ebias(f16, 15);
    const hid_t t = a.type == kv::CodeArray::Type::u8    ? H5T_STD_U8LE
                    : a.type == kv::CodeArray::Type::i32 ? H5T_STD_I32LE
                    : a.type == kv::CodeArray::Type::f32 ? H5T_IEEE_F32LE
                    : (damage & 128)                     ? H5T_NATIVE_UINT16
                                                         : f16;
    const hsize_t n = hsize_t(a.count());
    hid_t sp = H5Screate_simple(1, &n, nullptr);
    hid_t d = H5Dcreate2(g, a.name.c_str(), t, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (n) H5Dwrite(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, a.bytes.data());
    H5Dclose(d);
    H5Sclose(sp);
    H5Tclose(f16);
  }
  H5Gclose(g);
}

std::string write_case(Bytes& in, const std::string& path) {
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  const uint8_t flags = in.u8();
  attr_str(f, "format", flags & 1 ? "kvsnap" : "other");
  {
    int32_t v[2] = {int32_t(in.small(0, 2)), int32_t(in.small(0, 3))};
    hsize_t two = 2;
    hid_t s = H5Screate_simple(1, &two, nullptr);
    hid_t a = H5Acreate2(f, "format_version", H5T_NATIVE_INT32, s, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, H5T_NATIVE_INT32, v);
    H5Aclose(a);
    H5Sclose(s);
  }
  const int64_t L = in.small(-1, 3), Hq = in.small(0, 4), Hkv = in.small(0, 4), D = in.small(0, 6);
  const int64_t T = in.small(-1, 8);
  for (const char* s : {"model_arch", "model_name", "model_sha256"}) attr_str(f, s, "x");
  attr_int(f, "n_layers", L);
  attr_int(f, "n_q_heads", Hq);
  attr_int(f, "n_kv_heads", Hkv);
  attr_int(f, "head_dim", D);
  attr_int(f, "context_length", 16);
  attr_int(f, "rope_dims", in.small(-1, 6));
  attr_str(f, "rope_style", flags & 2 ? "pairs" : "zigzag");
  attr_str(f, "key_rope", "applied");
  attr_int(f, "n_tokens", T);
  if (flags & 4) {  // rope_theta sometimes as a string: wrong attribute type
    attr_str(f, "rope_theta", "1e4");
  } else {
    hid_t s = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, "rope_theta", H5T_NATIVE_DOUBLE, s, H5P_DEFAULT, H5P_DEFAULT);
    double th = 10000;
    H5Awrite(a, H5T_NATIVE_DOUBLE, &th);
    H5Aclose(a);
    H5Sclose(s);
  }
  const int64_t n_tok = std::max<int64_t>(0, T + in.small(-1, 1));
  dataset<int32_t>(f, "tokens", H5T_NATIVE_INT32, {hsize_t(n_tok)}, {1, 2, 3});
  const int64_t W = flags & 8 ? in.small(0, 3) : 0;
  if (W) {
    hid_t g = H5Gcreate2(f, "window", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    dataset<int32_t>(g, "positions", H5T_NATIVE_INT32, {hsize_t(W)}, {int32_t(in.wide() % 10)});
    H5Gclose(g);
  }
  if (flags & 16) H5Gclose(H5Gcreate2(f, "attn_stats", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  hid_t layers = H5Gcreate2(f, "layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  for (int64_t l = 0; l < std::max<int64_t>(L, 0) + in.small(-1, 1); ++l) {
    char name[8];
    std::snprintf(name, sizeof name, "%03d", int(l));
    hid_t g = H5Gcreate2(layers, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    const int64_t N = in.small(0, 12);
    std::vector<int32_t> pos;
    std::vector<int64_t> off;
    if (Hkv > 0 && (in.u8() & 1)) {
      // A sound layout (heads of consecutive positions), so encoded tensors reach decoding.
      off.push_back(0);
      for (int64_t h = 0; h < Hkv; ++h) {
        off.push_back(N * (h + 1) / Hkv);
        for (int64_t i = off[size_t(h)]; i < off.back(); ++i)
          pos.push_back(int32_t(i - off[size_t(h)]));
      }
      dataset<int32_t>(g, "positions", H5T_NATIVE_INT32, {hsize_t(N)}, pos);
    } else {
      for (int64_t i = 0; i < N; ++i) pos.push_back(int32_t(in.small(-1, 9)));
      dataset<int32_t>(g, "positions", H5T_NATIVE_INT32, {hsize_t(N + in.small(-1, 1) * (N > 0))},
                       pos);
      for (int64_t h = 0; h <= std::max<int64_t>(Hkv, 0) + in.small(-1, 1); ++h)
        off.push_back(in.u8() & 0x80 ? in.wide() : in.small(0, 12));
    }
    if (!off.empty())
      dataset<int64_t>(g, "head_offsets", H5T_NATIVE_INT64, {hsize_t(off.size())}, off);
    const hid_t types[4] = {H5T_IEEE_F32LE, H5T_IEEE_F64LE, H5T_NATIVE_INT16, H5T_IEEE_F32BE};
    for (const char* kv : {"k", "v"}) {
      const uint8_t shape = in.u8();
      std::vector<float> vals = {1.0f, flags & 32 ? NAN : 2.0f, -1.0f};
      std::vector<hsize_t> dims = {hsize_t(N + (shape & 1)),
                                   hsize_t(std::max<int64_t>(D, 0) + ((shape >> 1) & 1))};
      if (shape & 4) dims.push_back(2);
      if (shape & 8) {
        encoded_group(in, g, kv, D, Hkv, off, pos);
      } else if (shape & 16) {
        std::vector<double> dv(vals.begin(), vals.end());
        dataset<double>(g, kv, H5T_NATIVE_DOUBLE, dims, dv);
      } else {
        hid_t t = types[(shape >> 5) & 3];
        if (t == H5T_NATIVE_INT16)
          dataset<int16_t>(g, kv, t, dims, {1, 2});
        else
          dataset<float>(g, kv, H5T_NATIVE_FLOAT, dims, vals);  // converted by HDF5 to type f32
      }
    }
    if (flags & 64)
      dataset<float>(g, "mass", H5T_NATIVE_FLOAT, {hsize_t(N)}, {float(in.small(-1, 3))});
    if (W)
      dataset<float>(g, "window_q", H5T_NATIVE_FLOAT,
                     {hsize_t(Hq), hsize_t(W + in.small(-1, 1)), hsize_t(std::max<int64_t>(D, 0))},
                     {0.5f});
    if (flags & 16) {
      dataset<float>(g, "attn_acc", H5T_NATIVE_FLOAT,
                     {hsize_t(std::max<int64_t>(Hq, 0)), hsize_t(std::max<int64_t>(T, 0))}, {0.1f});
      dataset<float>(g, "attn_last", H5T_NATIVE_FLOAT, {hsize_t(std::max<int64_t>(Hq, 0))}, {0.1f});
    }
    H5Gclose(g);
  }
  H5Gclose(layers);
  H5Fclose(f);
  return path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/kv-fuzz-" + std::to_string(getpid()) + ".h5";
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  Bytes in{data, size};
  write_case(in, path);
  try {
    kv::SnapshotReader reader(path);
    kv::Layer layer;
    for (int l = 0; l < reader.n_layers(); ++l) {
      reader.read_layer(l, layer);
      reader.layer_storage(l);
    }
  } catch (const kv::Error&) {
    // Rejected with a message: the expected outcome for most inputs.
  }
  return 0;
}
