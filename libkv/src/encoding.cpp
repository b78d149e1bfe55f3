#include "kv/encoding.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <numeric>

#include "kv/error.h"
#include "kv/fp8.h"
#include "kv/page_store.h"
#include "kv/quant.h"
#include "kv/rope.h"
#include "kv/snapshot.h"
#include "kv/str.h"
#include "kvk/ops.h"

namespace kv {
namespace {

using Type = CodeArray::Type;

bool is_power_of_two(int n) {
  return n > 0 && (n & (n - 1)) == 0;
}

bool uses_bits(const std::string& s) {
  return s == "uniform" || s == "kivi";
}
bool allows_hadamard(const std::string& s) {
  return uses_bits(s) || s == "q8_0" || s == "q4_0" || s == "fp8" || s == "mikv";
}

// ---- arrays ------------------------------------------------------------------------------------

// Storage of arrays handed back by recycle(): a layer's arrays are about the size of the last
// layer's, and reusing them spares the page faults of fresh memory (as Tensor does for values).
std::mutex pool_mutex;
std::vector<std::vector<uint8_t>> pool;

CodeArray make_array(const std::string& name, Type type, int64_t count) {
  CodeArray a;
  a.name = name;
  a.type = type;
  const size_t bytes = size_t(count) * CodeArray::element_size(type);
  {
    std::lock_guard<std::mutex> lock(pool_mutex);
    // The smallest pooled buffer that is big enough.
    auto best = pool.end();
    for (auto it = pool.begin(); it != pool.end(); ++it)
      if (it->capacity() >= bytes && (best == pool.end() || it->capacity() < best->capacity()))
        best = it;
    if (best != pool.end()) {
      a.bytes.swap(*best);
      pool.erase(best);
    }
  }
  a.bytes.assign(bytes, 0);
  return a;
}

const CodeArray& find_array(const Encoded& enc, const std::string& name, Type type, int64_t count) {
  for (const CodeArray& a : enc.arrays)
    if (a.name == name) {
      if (a.type != type)
        throw Error(Exit::data, str("encoding '", enc.encoding.scheme, "': array '", name,
                                    "' has the wrong element type"));
      if (a.count() != count)
        throw Error(Exit::data, str("encoding '", enc.encoding.scheme, "': array '", name, "' has ",
                                    a.count(), " elements; the layout needs ", count));
      return a;
    }
  throw Error(Exit::data, str("encoding '", enc.encoding.scheme, "' lacks its array '", name, "'"));
}

template <class T>
T* elements(CodeArray& a) {
  return reinterpret_cast<T*>(a.bytes.data());
}
template <class T>
const T* elements(const CodeArray& a) {
  return reinterpret_cast<const T*>(a.bytes.data());
}

// Whether x holds no NaN/Inf: the largest |x| as bits (an unsigned max, which vectorizes) is
// below the all-ones exponent.
__attribute__((target_clones("arch=x86-64-v3", "default"))) bool all_finite(const float* x,
                                                                            int64_t n) {
  uint32_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    top = std::max(top, u & 0x7fffffffu);
  }
  return top < 0x7f800000u;
}

// The largest |x| of f16 values, as bits (non-negative f16 values order like their bits):
// 0x7c00 or more if one is NaN/Inf.
__attribute__((target_clones("arch=x86-64-v3", "default"))) uint16_t largest_f16_magnitude(
    const uint16_t* x, int64_t n) {
  uint16_t top = 0;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, uint16_t(x[i] & 0x7fff));
  return top;
}

// Throws naming the first NaN/Inf of rows [row0, row0 + n / D).
void check_finite(const float* x, int64_t n, int64_t row0, int D) {
  if (all_finite(x, n)) return;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i]))
      throw Error(Exit::data, str("entry ", row0 + i / D, " channel ", i % D, " is ", x[i],
                                  "; only finite values can be encoded"));
}

// Stores values as f16, refusing those beyond its range (they would be stored as Inf).
void store_f16(const float* x, int64_t n, uint16_t* out, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = kvk::f32_to_f16(x[i]);
    if ((out[i] & 0x7c00) == 0x7c00)
      throw Error(Exit::data, str(what, " holds ", x[i], ", beyond f16's range (65504)"));
  }
}

void rotate_rows(const Encoding& e, float* rows, int64_t n, int D) {
  if (e.hadamard)
    for (int64_t r = 0; r < n; ++r) hadamard_rotate(rows + r * D, D);
}

// Per head prefix sums of one array's element counts; [H + 1].
template <class Count>
std::vector<int64_t> prefix(const std::vector<int64_t>& off, Count count) {
  std::vector<int64_t> p(off.size(), 0);
  for (size_t h = 0; h + 1 < off.size(); ++h) p[h + 1] = p[h] + count(off[h + 1] - off[h], h);
  return p;
}

// ---- tiles -------------------------------------------------------------------------------------
// Encoders and decoders stream through each head in tiles of a few thousand values: rows are
// converted to f32 (and rotated) in a small per-thread buffer and coded straight into the
// arrays, so a layer is read once and no f32 copy of it is ever made. Tiles are independent
// (each starts on a byte of every array), so they run in parallel.

struct Tile {
  int h;
  int64_t first, rows;  // rows [first, first + rows) of head h, counted from the head's start
};

// Tiles of `step` rows (the last one shorter) over rows [0, count(h)) of every head.
template <class Count>
std::vector<Tile> tiles(int H, int64_t step, Count count) {
  std::vector<Tile> out;
  for (int h = 0; h < H; ++h)
    for (int64_t r = 0, n = count(h); r < n; r += step)
      out.push_back({h, r, std::min(step, n - r)});
  return out;
}

// A multiple of `unit` rows holding about 8192 values: small enough for L1/L2, large enough
// that per-tile work is amortized.
int64_t tile_rows(int64_t unit, int D) {
  int64_t t = unit;
  while (t * 2 * D <= 8192) t *= 2;
  return t;
}

// Rows [row, row + n) of the layer as f32, Hadamard-rotated when the encoding asks; throws for
// NaN/Inf.
void load_rows(const Encoding& e, const Tensor& x, int64_t row, int64_t n, float* dst) {
  if (n == 0) return;  // (an empty layer has no storage to point into)
  const int D = int(x.cols());
  const auto* src =
      static_cast<const std::byte*>(x.data()) + size_t(row) * D * kvk::dtype_size(x.dtype());
  if (x.dtype() == DType::f32)
    std::memcpy(dst, src, size_t(n) * D * sizeof(float));
  else
    kvk::cpu_ops().to_f32(x.dtype(), src, dst, size_t(n) * D);
  check_finite(dst, n * D, row, D);
  rotate_rows(e, dst, n, D);
}

// The f16 bits of an f16 layer from row `row` on, when the encoders may read them as they are
// (no rotation to apply first: the quant kernels take f16); null otherwise, for load_rows.
const uint16_t* f16_rows(const Encoding& e, const Tensor& x, int64_t row) {
  return x.dtype() == DType::f16 && !e.hadamard ? x.as<uint16_t>() + row * x.cols() : nullptr;
}

// Runs body(tile, buffer) over the tiles in parallel; the first error (lowest tile) is rethrown
// with the head it happened in.
template <class Body>
void for_tiles(const std::vector<Tile>& work, int64_t buffer_floats, Body body) {
  std::vector<Error> errors;
  int64_t failed = int64_t(work.size());
#pragma omp parallel
  {
    std::vector<float> buffer(static_cast<size_t>(buffer_floats));
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < int64_t(work.size()); ++i) {
      try {
        body(work[size_t(i)], buffer.data());
      } catch (const Error& err) {
#pragma omp critical
        if (i < failed) {
          failed = i;
          errors.assign(1, Error(err.code(), str("head ", work[size_t(i)].h, ": ", err.what())));
        }
      }
    }
  }
  if (!errors.empty()) throw errors.front();
}

// ---- uniform and kivi --------------------------------------------------------------------------
// Codes form one LSB-first stream per head. Axis token: row-major, groups of min(group, D)
// values within a row. Axis channel: group-major: for each group of `group` consecutive rows
// (the last one shorter), for each channel, that channel's codes for those rows; scales and
// zeros [group][channel].

struct UniformSizes {
  int64_t quantized_rows, code_bytes, groups, residual_values;
};

quant::UniformParams uniform_params(const Encoding& e, int D) {
  quant::UniformParams p;
  p.bits = e.bits;
  p.symmetric = e.symmetric;
  p.group = e.axis == "token" ? std::min(e.group, D) : e.group;
  return p;
}

UniformSizes uniform_sizes(const Encoding& e, int64_t n, int D) {
  const int64_t r = std::min<int64_t>(e.residual, n), nq = n - r;
  const quant::UniformParams p = uniform_params(e, D);
  return {nq, int64_t(quant::uniform_code_bytes(nq * D, p.bits)),
          e.axis == "token" ? nq * D / p.group : D * quant::uniform_groups(nq, p.group), r * D};
}

// Axis channel: whether each group of rows starts on a byte of the codes (then its channels are
// coded in place by quant::quantize_groups; otherwise a tile is transposed and packed at once).
bool channel_groups_fill_bytes(const Encoding& e, int D) {
  return (int64_t(e.group) * D * e.bits) % 8 == 0;
}

// Rows per tile: whole groups (axis channel) whose codes fill whole bytes.
int64_t uniform_tile_rows(const Encoding& e, int D) {
  int64_t unit = e.axis == "token" ? 1 : e.group;
  while ((unit * D * e.bits) % 8) unit *= 2;
  return tile_rows(unit, D);
}

struct UniformArrays {
  std::vector<int64_t> codes_at, groups_at, residual_at;
  UniformArrays(const Encoding& e, const std::vector<int64_t>& off, int D) {
    codes_at = prefix(off, [&](int64_t n, size_t) { return uniform_sizes(e, n, D).code_bytes; });
    groups_at = prefix(off, [&](int64_t n, size_t) { return uniform_sizes(e, n, D).groups; });
    residual_at =
        prefix(off, [&](int64_t n, size_t) { return uniform_sizes(e, n, D).residual_values; });
  }
};

// `suffix` is appended to the array names (mikv stores two uniform encodings side by side).
Encoded encode_uniform(const Encoding& e, const Tensor& x, const RowLayout& rows,
                       const std::string& suffix = "") {
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const quant::UniformParams p = uniform_params(e, D);
  const UniformArrays at(e, off, D);
  CodeArray codes = make_array("codes" + suffix, Type::u8, at.codes_at[H]);
  CodeArray scales = make_array("scales" + suffix, Type::f16, at.groups_at[H]);
  CodeArray zeros = make_array("zeros" + suffix, Type::f16, e.symmetric ? 0 : at.groups_at[H]);
  CodeArray resid = make_array("residual" + suffix, Type::f16, at.residual_at[H]);
  const int64_t T = uniform_tile_rows(e, D);
  const auto work =
      tiles(H, T, [&](int h) { return uniform_sizes(e, off[h + 1] - off[h], D).quantized_rows; });
  // Buffer: T rows of values, then T * D one-byte codes, then a transposed group (axis channel).
  for_tiles(work, T * D * 2 + T * D / 4 + 1, [&](const Tile& t, float* buf) {
    float* values = buf;
    float* column = buf + T * D;
    auto* q = reinterpret_cast<uint8_t*>(buf + T * D * 2);
    uint16_t* sc = elements<uint16_t>(scales) + at.groups_at[t.h];
    uint16_t* zp = e.symmetric ? nullptr : elements<uint16_t>(zeros) + at.groups_at[t.h];
    uint8_t* dst = elements<uint8_t>(codes) + at.codes_at[t.h] + t.first * D * e.bits / 8;
    // The tile's groups through `quantize` (quant::quantize_groups, or its f16 form, which may
    // leave the tile to the float path by returning false); false if it did.
    auto quantize_tile = [&](const auto* rows, auto quantize) {
      if (e.axis == "token") {
        const int64_t first_group = t.first * D / p.group;
        return quantize(rows, t.rows * D / p.group, p.group, 1, p, sc + first_group,
                        zp ? zp + first_group : nullptr, dst);
      }
      // Straight down the channels of each group of rows, no transposition.
      for (int64_t r0 = 0; r0 < t.rows; r0 += e.group) {
        quant::UniformParams block = p;
        block.group = int(std::min<int64_t>(e.group, t.rows - r0));
        const int64_t group = (t.first + r0) / e.group * D;  // index of its channel 0
        if (!quantize(rows + r0 * D, D, 1, D, block, sc + group, zp ? zp + group : nullptr,
                      dst + r0 * D * e.bits / 8))
          return false;
      }
      return true;
    };
    const bool whole_bytes = e.axis == "token" || channel_groups_fill_bytes(e, D);
    if (const uint16_t* rows = f16_rows(e, x, off[t.h] + t.first);
        rows && whole_bytes && quantize_tile(rows, quant::quantize_groups_f16))
      return;
    load_rows(e, x, off[t.h] + t.first, t.rows, values);
    if (whole_bytes) {
      quantize_tile(values, [](auto... args) {
        quant::quantize_groups(args...);
        return true;
      });
      return;
    }
    for (int64_t r0 = 0; r0 < t.rows; r0 += e.group) {
      const int64_t len = std::min<int64_t>(e.group, t.rows - r0);
      const int64_t group = (t.first + r0) / e.group * D;  // index of its channel 0
      for (int64_t r = 0; r < len; ++r)
        for (int d = 0; d < D; ++d) column[d * len + r] = values[(r0 + r) * D + d];
      for (int d = 0; d < D; ++d)
        quant::quantize_group(column + d * len, len, p, sc + group + d,
                              zp ? zp + group + d : nullptr, q + r0 * D + d * len);
    }
    quant::pack_codes(q, t.rows * D, e.bits, dst);
  });
  // The residual: the most recent rows as f16 (their bytes, when the layer is f16).
  for (int h = 0; h < H; ++h) {
    const UniformSizes s = uniform_sizes(e, off[h + 1] - off[h], D);
    if (s.residual_values == 0) continue;  // (an empty array has no storage to point into)
    const int64_t row = off[h] + s.quantized_rows;
    uint16_t* res = elements<uint16_t>(resid) + at.residual_at[h];
    if (x.dtype() == DType::f16) {
      std::memcpy(res, x.as<uint16_t>() + row * D, size_t(s.residual_values) * 2);
    } else {
      std::vector<float> v(static_cast<size_t>(s.residual_values));
      Encoding plain = e;
      plain.hadamard = false;  // the residual is stored as it is
      load_rows(plain, x, row, s.residual_values / D, v.data());
      store_f16(v.data(), s.residual_values, res, "a residual row");
    }
  }
  Encoded out;
  out.encoding = e;
  // (One at a time: a braced list would copy the arrays, from its const elements.)
  out.arrays.push_back(std::move(codes));
  out.arrays.push_back(std::move(scales));
  if (!e.symmetric) out.arrays.push_back(std::move(zeros));
  out.arrays.push_back(std::move(resid));
  return out;
}

// Decodes with the parameters of `e` the arrays of `enc` named with `suffix`; the residual may
// be absent when no row is residual (mikv's parts).
void decode_uniform(const Encoding& e, const Encoded& enc, const RowLayout& rows, float* out,
                    const std::string& suffix = "") {
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const quant::UniformParams p = uniform_params(e, D);
  const UniformArrays at(e, off, D);
  const CodeArray& codes = find_array(enc, "codes" + suffix, Type::u8, at.codes_at[H]);
  const CodeArray& scales = find_array(enc, "scales" + suffix, Type::f16, at.groups_at[H]);
  const CodeArray* zeros =
      e.symmetric ? nullptr : &find_array(enc, "zeros" + suffix, Type::f16, at.groups_at[H]);
  const CodeArray* resid = at.residual_at[H] || suffix.empty()
                               ? &find_array(enc, "residual" + suffix, Type::f16, at.residual_at[H])
                               : nullptr;
  const int64_t T = uniform_tile_rows(e, D);
  const auto work =
      tiles(H, T, [&](int h) { return uniform_sizes(e, off[h + 1] - off[h], D).quantized_rows; });
  for_tiles(work, T * D + T * D / 4 + 1, [&](const Tile& t, float* buf) {
    float* column = buf;
    auto* q = reinterpret_cast<uint8_t*>(buf + T * D);
    const uint8_t* src = elements<uint8_t>(codes) + at.codes_at[t.h] + t.first * D * e.bits / 8;
    const uint16_t* sc = elements<uint16_t>(scales) + at.groups_at[t.h];
    const uint16_t* zp = zeros ? elements<uint16_t>(*zeros) + at.groups_at[t.h] : nullptr;
    float* values = out + (off[t.h] + t.first) * D;
    if (e.axis == "token") {
      const int64_t first_group = t.first * D / p.group;
      quant::dequantize_groups(src, sc + first_group, zp ? zp + first_group : nullptr,
                               t.rows * D / p.group, p.group, 1, p, values);
    } else if (channel_groups_fill_bytes(e, D)) {
      for (int64_t r0 = 0; r0 < t.rows; r0 += e.group) {
        quant::UniformParams block = p;
        block.group = int(std::min<int64_t>(e.group, t.rows - r0));
        const int64_t group = (t.first + r0) / e.group * D;
        quant::dequantize_groups(src + r0 * D * e.bits / 8, sc + group, zp ? zp + group : nullptr,
                                 D, 1, D, block, values + r0 * D);
      }
    } else {
      quant::unpack_codes(src, t.rows * D, e.bits, q);
      for (int64_t r0 = 0; r0 < t.rows; r0 += e.group) {
        const int64_t len = std::min<int64_t>(e.group, t.rows - r0);
        const int64_t group = (t.first + r0) / e.group * D;
        for (int d = 0; d < D; ++d)
          quant::dequantize_group(q + r0 * D + d * len, len, p, sc[group + d],
                                  zp ? zp[group + d] : 0, column + d * len);
        for (int64_t r = 0; r < len; ++r)
          for (int d = 0; d < D; ++d) values[(r0 + r) * D + d] = column[d * len + r];
      }
    }
    rotate_rows(e, values, t.rows, D);
  });
  for (int h = 0; h < H; ++h) {
    const UniformSizes s = uniform_sizes(e, off[h + 1] - off[h], D);
    if (!resid) break;
    const uint16_t* res = elements<uint16_t>(*resid) + at.residual_at[h];
    kvk::cpu_ops().to_f32(DType::f16, res, out + (off[h] + s.quantized_rows) * D,
                          size_t(s.residual_values));
  }
}

}  // namespace

std::vector<kvk::Kivi2Head> kivi2_heads(const Encoded& k, const Encoded& v, const RowLayout& rows) {
  const int D = rows.model.head_dim;
  auto fits = [&](const Encoding& e, const char* axis) {
    return (e.scheme == "kivi" || e.scheme == "uniform") && e.bits == 2 && !e.hadamard &&
           e.axis == axis && uniform_params(e, D).group == 32;
  };
  if (!fits(k.encoding, "channel") || !fits(v.encoding, "token") ||
      k.encoding.residual != v.encoding.residual || D % 32)
    return {};
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const UniformArrays ka(k.encoding, off, D), va(v.encoding, off, D);
  const CodeArray& kc = find_array(k, "codes", Type::u8, ka.codes_at[H]);
  const CodeArray& ks = find_array(k, "scales", Type::f16, ka.groups_at[H]);
  const CodeArray* kz =
      k.encoding.symmetric ? nullptr : &find_array(k, "zeros", Type::f16, ka.groups_at[H]);
  const CodeArray& kr = find_array(k, "residual", Type::f16, ka.residual_at[H]);
  const CodeArray& vc = find_array(v, "codes", Type::u8, va.codes_at[H]);
  const CodeArray& vs = find_array(v, "scales", Type::f16, va.groups_at[H]);
  const CodeArray* vz =
      v.encoding.symmetric ? nullptr : &find_array(v, "zeros", Type::f16, va.groups_at[H]);
  const CodeArray& vr = find_array(v, "residual", Type::f16, va.residual_at[H]);
  std::vector<kvk::Kivi2Head> heads(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h) {
    const UniformSizes sz = uniform_sizes(k.encoding, off[h + 1] - off[h], D);
    kvk::Kivi2Head& out = heads[size_t(h)];
    out.n_quant = sz.quantized_rows;
    out.n_residual = sz.residual_values / D;
    out.k_codes = elements<uint8_t>(kc) + ka.codes_at[h];
    out.k_scales = elements<uint16_t>(ks) + ka.groups_at[h];
    out.k_zeros = kz ? elements<uint16_t>(*kz) + ka.groups_at[h] : nullptr;
    out.k_residual = elements<uint16_t>(kr) + ka.residual_at[h];
    out.v_codes = elements<uint8_t>(vc) + va.codes_at[h];
    out.v_scales = elements<uint16_t>(vs) + va.groups_at[h];
    out.v_zeros = vz ? elements<uint16_t>(*vz) + va.groups_at[h] : nullptr;
    out.v_residual = elements<uint16_t>(vr) + va.residual_at[h];
  }
  return heads;
}

namespace {

// ---- q8_0 and q4_0 -----------------------------------------------------------------------------

// A head's values run on through its rows; the last block is padded with zeros.
int64_t padded_values(int64_t n, int D) {
  const int64_t v = n * D;
  return (v + quant::block_values - 1) / quant::block_values * quant::block_values;
}

size_t block_bytes(const Encoding& e, int64_t values) {
  return e.scheme == "q8_0" ? quant::q8_0_bytes(values) : quant::q4_0_bytes(values);
}

// Tiles of whole blocks: 32 rows always are.
constexpr int64_t kBlockTileUnit = quant::block_values;

Encoded encode_blocks(const Encoding& e, const Tensor& x, const RowLayout& rows) {
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  auto at =
      prefix(off, [&](int64_t n, size_t) { return int64_t(block_bytes(e, padded_values(n, D))); });
  CodeArray blocks = make_array("blocks", Type::u8, at[H]);
  const int64_t T = tile_rows(kBlockTileUnit, D);
  // The block scale is an f16: max|x| / 127 (q8_0) or / 8 (q4_0) must stay below 65520, or
  // ggml's rule stores it as Inf.
  const float limit = e.scheme == "q8_0" ? 65504.0f * 127 : 65504.0f * 8;
  for_tiles(tiles(H, T, [&](int h) { return off[h + 1] - off[h]; }), T * D + quant::block_values,
            [&](const Tile& t, float* v) {
              const int64_t n = padded_values(t.rows, D);
              uint8_t* dst = elements<uint8_t>(blocks) + at[t.h] + block_bytes(e, t.first * D);
              // f16 rows straight into the blocks, when no padding is needed.
              const uint16_t* rows = f16_rows(e, x, off[t.h] + t.first);
              if (!rows || n != t.rows * D ||
                  !(e.scheme == "q8_0" ? quant::encode_q8_0_f16(rows, n, dst)
                                       : quant::encode_q4_0_f16(rows, n, dst))) {
                load_rows(e, x, off[t.h] + t.first, t.rows, v);
                std::fill(v + t.rows * D, v + n, 0.0f);
                if (e.scheme == "q8_0")
                  quant::encode_q8_0(v, n, dst);
                else
                  quant::encode_q4_0(v, n, dst);
              }
              const size_t step = block_bytes(e, quant::block_values);
              for (int64_t b = 0; b < n / quant::block_values; ++b)
                if ((dst[b * step + 1] & 0x7c) == 0x7c)  // the f16 scale's exponent: Inf
                  throw Error(Exit::data,
                              str("a value beyond ", e.scheme, "'s range (|x| <= ", limit,
                                  ") near entry ", off[t.h] + t.first + b * 32 / D));
            });
  Encoded out;
  out.encoding = e;
  out.arrays.push_back(std::move(blocks));
  return out;
}

void decode_blocks(const Encoded& enc, const RowLayout& rows, float* out) {
  const Encoding& e = enc.encoding;
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  auto at =
      prefix(off, [&](int64_t n, size_t) { return int64_t(block_bytes(e, padded_values(n, D))); });
  const CodeArray& blocks = find_array(enc, "blocks", Type::u8, at[H]);
  const int64_t T = tile_rows(kBlockTileUnit, D);
  for_tiles(tiles(H, T, [&](int h) { return off[h + 1] - off[h]; }), T * D + quant::block_values,
            [&](const Tile& t, float* v) {
              const uint8_t* src =
                  elements<uint8_t>(blocks) + at[t.h] + block_bytes(e, t.first * D);
              auto decode = [&](const uint8_t* in, int64_t n, float* y) {
                if (e.scheme == "q8_0")
                  quant::decode_q8_0(in, n, y);
                else
                  quant::decode_q4_0(in, n, y);
              };
              // Whole blocks straight into the output; a head's padded last block via v.
              const int64_t n = t.rows * D, whole = n / quant::block_values * quant::block_values;
              float* values = out + (off[t.h] + t.first) * D;
              decode(src, whole, values);
              if (whole < n) {
                decode(src + block_bytes(e, whole), quant::block_values, v);
                std::copy(v, v + (n - whole), values + whole);
              }
              rotate_rows(e, values, t.rows, D);
            });
}

// ---- fp8 ---------------------------------------------------------------------------------------

Encoded encode_fp8(const Encoding& e, const Tensor& x, const RowLayout& rows) {
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const fp8::Format f = fp8::parse_format(e.fp8_format);
  const int64_t N = off[H];
  CodeArray codes = make_array("codes", Type::u8, N * D);
  const int64_t T = tile_rows(1, D);
  const auto work = tiles(H, T, [&](int h) { return off[h + 1] - off[h]; });
  // Pass 1: each head's largest magnitude (after any rotation).
  std::vector<float> tile_amax(work.size(), 0.0f);
  for_tiles(work, T * D, [&](const Tile& t, float* v) {
    if (const uint16_t* rows = f16_rows(e, x, off[t.h] + t.first)) {
      // From the f16 bits, unless NaN/Inf (load_rows then says where).
      const uint16_t top = largest_f16_magnitude(rows, t.rows * D);
      if (top < 0x7c00) {
        tile_amax[size_t(&t - work.data())] = kvk::f16_to_f32(top);
        return;
      }
    }
    load_rows(e, x, off[t.h] + t.first, t.rows, v);
    float amax = 0;
    for (int64_t i = 0; i < t.rows * D; ++i) amax = std::max(amax, std::fabs(v[i]));
    tile_amax[size_t(&t - work.data())] = amax;
  });
  std::vector<float> head_amax(static_cast<size_t>(H), 0.0f);
  for (size_t i = 0; i < work.size(); ++i)
    head_amax[size_t(work[i].h)] = std::max(head_amax[size_t(work[i].h)], tile_amax[i]);
  const bool per_head = e.scale_scope == "head";
  // scale = amax / max_finite puts the largest magnitude on the format's largest value; floored
  // at FLT_MIN so that its inverse stays finite for caches of subnormal values.
  auto scale_of = [&](float amax) {
    return amax > 0 ? std::max(amax / fp8::max_finite(f), std::numeric_limits<float>::min()) : 1.0f;
  };
  CodeArray scales = make_array("scales", Type::f32, per_head ? H : 1);
  const float tensor_scale = scale_of(*std::max_element(head_amax.begin(), head_amax.end()));
  for (int h = 0; h < (per_head ? H : 1); ++h)
    elements<float>(scales)[h] = per_head ? scale_of(head_amax[size_t(h)]) : tensor_scale;
  // Pass 2: the codes.
  for_tiles(work, T * D, [&](const Tile& t, float* v) {
    if (const uint16_t* rows = f16_rows(e, x, off[t.h] + t.first))
      kvk::cpu_ops().to_f32(DType::f16, rows, v, size_t(t.rows) * D);  // finite: see pass 1
    else
      load_rows(e, x, off[t.h] + t.first, t.rows, v);
    fp8::encode_array(v, t.rows * D, elements<float>(scales)[per_head ? t.h : 0], f,
                      elements<uint8_t>(codes) + (off[t.h] + t.first) * D);
  });
  Encoded out;
  out.encoding = e;
  out.arrays.push_back(std::move(codes));  // (a braced list would copy them)
  out.arrays.push_back(std::move(scales));
  return out;
}

void decode_fp8(const Encoded& enc, const RowLayout& rows, float* out) {
  const Encoding& e = enc.encoding;
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const fp8::Format f = fp8::parse_format(e.fp8_format);
  const bool per_head = e.scale_scope == "head";
  const int64_t N = off[H];
  const CodeArray& codes = find_array(enc, "codes", Type::u8, N * D);
  const CodeArray& scales = find_array(enc, "scales", Type::f32, per_head ? H : 1);
  for (int h = 0; h < (per_head ? H : 1); ++h) {
    const float s = elements<float>(scales)[h];
    if (!(s > 0) || !std::isfinite(s))
      throw Error(Exit::data,
                  str("encoding 'fp8': scale ", h, " is ", s, ", not a positive number"));
  }
  const int64_t T = tile_rows(1, D);
  for_tiles(tiles(H, T, [&](int h) { return off[h + 1] - off[h]; }), 0, [&](const Tile& t, float*) {
    float* values = out + (off[t.h] + t.first) * D;
    fp8::decode_array(elements<uint8_t>(codes) + (off[t.h] + t.first) * D, t.rows * D,
                      elements<float>(scales)[per_head ? t.h : 0], f, values);
    rotate_rows(e, values, t.rows, D);
  });
}

// ---- svd ---------------------------------------------------------------------------------------

// Eigen-decomposition of the symmetric D x D matrix a (row-major, destroyed) by cyclic Jacobi
// rotations: accurate to working precision for the small D of attention heads, and short.
// Returns eigenvalues in decreasing order; column i of `vectors` [D, D] belongs to value i.
std::vector<double> symmetric_eigen(std::vector<double>& a, int n, std::vector<double>& vectors) {
  vectors.assign(size_t(n) * n, 0.0);
  for (int i = 0; i < n; ++i) vectors[size_t(i) * n + i] = 1.0;
  auto A = [&](int i, int j) -> double& { return a[size_t(i) * n + j]; };
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off_diag = 0, diag = 0;
    for (int i = 0; i < n; ++i) {
      diag += A(i, i) * A(i, i);
      for (int j = i + 1; j < n; ++j) off_diag += A(i, j) * A(i, j);
    }
    if (off_diag <= 1e-30 * diag || off_diag == 0) break;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) {
        if (A(p, q) == 0) continue;
        const double theta = (A(q, q) - A(p, p)) / (2 * A(p, q));
        const double t = (theta >= 0 ? 1 : -1) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; ++k) {  // columns p, q
          const double akp = A(k, p), akq = A(k, q);
          A(k, p) = c * akp - s * akq;
          A(k, q) = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {  // rows p, q
          const double apk = A(p, k), aqk = A(q, k);
          A(p, k) = c * apk - s * aqk;
          A(q, k) = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {
          double& vp = vectors[size_t(k) * n + p];
          double& vq = vectors[size_t(k) * n + q];
          const double x = vp, y = vq;
          vp = c * x - s * y;
          vq = s * x + c * y;
        }
      }
  }
  std::vector<int> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return A(i, i) > A(j, j); });
  std::vector<double> values(static_cast<size_t>(n)), sorted(vectors.size());
  for (int c = 0; c < n; ++c) {
    values[size_t(c)] = std::max(0.0, A(order[size_t(c)], order[size_t(c)]));
    for (int k = 0; k < n; ++k)
      sorted[size_t(k) * n + c] = vectors[size_t(k) * n + order[size_t(c)]];
  }
  vectors.swap(sorted);
  return values;
}

void rope_rows(const Encoding& e, const RowLayout& rows, float* x, int64_t a, int64_t b, int sign) {
  if (!e.pre_rope || rows.model.rope_dims == 0 || a == b) return;
  const int D = rows.model.head_dim;
  int64_t max_pos = 0;
  for (int64_t r = a; r < b; ++r) max_pos = std::max<int64_t>(max_pos, rows.positions[size_t(r)]);
  RopeTable rope(rows.model.rope_dims, rows.model.rope_theta, max_pos + 1);
  for (int64_t r = a; r < b; ++r)
    rope.apply(x + (r - a) * D, rows.positions[size_t(r)], rows.model.rope_style == "pairs", sign);
}

float stored_factor(const Encoding& e, float v) {
  return e.factors == "f16" ? kvk::f16_to_f32(kvk::f32_to_f16(v)) : v;
}

void put_factor(CodeArray& a, int64_t i, float v) {
  if (a.type == Type::f16)
    store_f16(&v, 1, elements<uint16_t>(a) + i, "an svd factor");
  else
    elements<float>(a)[i] = v;
}
float get_factor(const CodeArray& a, int64_t i) {
  return a.type == Type::f16 ? kvk::f16_to_f32(elements<uint16_t>(a)[i]) : elements<float>(a)[i];
}

Encoded encode_svd(const Encoding& e, const float* x, const RowLayout& rows) {
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const Type ft = e.factors == "f16" ? Type::f16 : Type::f32;
  // Per head: the basis (top eigenvectors of X^T X) and its rank.
  std::vector<std::vector<float>> head_x(static_cast<size_t>(H));
  std::vector<std::vector<double>> head_vectors(static_cast<size_t>(H));
  std::vector<int32_t> ranks(static_cast<size_t>(H), 0);
  for (int h = 0; h < H; ++h) {
    const int64_t n = off[h + 1] - off[h];
    check_finite(x + off[h] * D, n * D, off[h], D);
    std::vector<float>& X = head_x[size_t(h)];
    X.assign(x + off[h] * D, x + off[h + 1] * D);
    rope_rows(e, rows, X.data(), off[h], off[h + 1], -1);
    std::vector<double> gram(size_t(D) * D, 0.0);
    for (int64_t r = 0; r < n; ++r)
      for (int i = 0; i < D; ++i) {
        const double xi = X[size_t(r * D + i)];
        for (int j = i; j < D; ++j) gram[size_t(i) * D + j] += xi * X[size_t(r * D + j)];
      }
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < i; ++j) gram[size_t(i) * D + j] = gram[size_t(j) * D + i];
    const std::vector<double> values = symmetric_eigen(gram, D, head_vectors[size_t(h)]);
    const double total = std::accumulate(values.begin(), values.end(), 0.0);
    int r = 0;
    if (e.rank > 0) {
      r = int(std::min<int64_t>({e.rank, n, D}));
    } else if (total > 0) {
      for (double kept = 0; r < D && kept < e.energy * total;) kept += values[size_t(r++)];
    }
    ranks[size_t(h)] = r;
  }
  auto coeff_at = prefix(off, [&](int64_t n, size_t h) { return n * ranks[h]; });
  auto basis_at = prefix(off, [&](int64_t, size_t h) { return int64_t(D) * ranks[h]; });
  CodeArray rank_array = make_array("ranks", Type::i32, H);
  std::memcpy(rank_array.bytes.data(), ranks.data(), ranks.size() * 4);
  CodeArray coeffs = make_array("coeffs", ft, coeff_at[H]);
  CodeArray basis = make_array("basis", ft, basis_at[H]);
  for (int h = 0; h < H; ++h) {
    const int64_t n = off[h + 1] - off[h];
    const int r = ranks[size_t(h)];
    // B [D, r] as stored; A = X B with the stored B, so A absorbs B's rounding.
    std::vector<float> B(static_cast<size_t>(D) * r);
    for (int i = 0; i < D; ++i)
      for (int c = 0; c < r; ++c) {
        B[size_t(i) * r + c] = stored_factor(e, float(head_vectors[size_t(h)][size_t(i) * D + c]));
        put_factor(basis, basis_at[h] + i * r + c, B[size_t(i) * r + c]);
      }
    const std::vector<float>& X = head_x[size_t(h)];
    for (int64_t row = 0; row < n; ++row)
      for (int c = 0; c < r; ++c) {
        double acc = 0;
        for (int i = 0; i < D; ++i) acc += double(X[size_t(row * D + i)]) * B[size_t(i) * r + c];
        put_factor(coeffs, coeff_at[h] + row * r + c, float(acc));
      }
  }
  Encoded out;
  out.encoding = e;
  for (CodeArray* a : {&rank_array, &coeffs, &basis})
    out.arrays.push_back(std::move(*a));  // (a braced list of arrays would copy them)
  return out;
}

void decode_svd(const Encoded& enc, const RowLayout& rows, float* out) {
  const Encoding& e = enc.encoding;
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const Type ft = e.factors == "f16" ? Type::f16 : Type::f32;
  const CodeArray& rank_array = find_array(enc, "ranks", Type::i32, H);
  const int32_t* ranks = elements<int32_t>(rank_array);
  for (int h = 0; h < H; ++h)
    if (ranks[h] < 0 || ranks[h] > D)
      throw Error(Exit::data, str("encoding 'svd': head ", h, " has rank ", ranks[h],
                                  ", outside [0, ", D, "]"));
  auto coeff_at = prefix(off, [&](int64_t n, size_t h) { return n * ranks[h]; });
  auto basis_at = prefix(off, [&](int64_t, size_t h) { return int64_t(D) * ranks[h]; });
  const CodeArray& coeffs = find_array(enc, "coeffs", ft, coeff_at[H]);
  const CodeArray& basis = find_array(enc, "basis", ft, basis_at[H]);
  for (int h = 0; h < H; ++h) {
    const int64_t n = off[h + 1] - off[h];
    const int r = ranks[h];
    std::vector<float> B(static_cast<size_t>(D) * r);
    for (int64_t i = 0; i < int64_t(B.size()); ++i)
      B[size_t(i)] = get_factor(basis, basis_at[h] + i);
    float* X = out + off[h] * D;
    for (int64_t row = 0; row < n; ++row) {
      std::vector<float> a(static_cast<size_t>(r));
      for (int c = 0; c < r; ++c) a[size_t(c)] = get_factor(coeffs, coeff_at[h] + row * r + c);
      for (int i = 0; i < D; ++i) {
        double acc = 0;
        for (int c = 0; c < r; ++c) acc += double(a[size_t(c)]) * B[size_t(i) * r + c];
        X[row * D + i] = float(acc);
      }
    }
    rope_rows(e, rows, X, off[h], off[h + 1], +1);
  }
}

// ---- kvquant -----------------------------------------------------------------------------------

// K levels for sorted values by 1-D k-means (Lloyd's iterations from the quantile levels), stored
// as f16 and returned sorted. Values with at most K distinct entries get exactly those (so a
// decoded vector encodes to itself). Cluster means come from prefix sums: each iteration costs
// K binary searches, not a pass over the values.
std::vector<float> kmeans_levels(const std::vector<float>& sorted, int K) {
  std::vector<float> levels(static_cast<size_t>(K), 0.0f);
  const size_t m = sorted.size();
  if (m == 0) return levels;
  std::vector<float> distinct;
  for (float v : sorted)
    if (distinct.empty() || v != distinct.back()) {
      distinct.push_back(v);
      if (int(distinct.size()) > K) break;
    }
  if (int(distinct.size()) <= K) {
    for (int j = 0; j < K; ++j)
      levels[size_t(j)] = distinct[std::min(size_t(j), distinct.size() - 1)];
  } else {
    std::vector<double> sum(m + 1, 0.0);
    for (size_t i = 0; i < m; ++i) sum[i + 1] = sum[i] + sorted[i];
    std::vector<double> c(static_cast<size_t>(K));
    for (int j = 0; j < K; ++j)
      c[size_t(j)] = sorted[std::min(m - 1, size_t((j + 0.5) / K * double(m)))];
    for (int iter = 0; iter < 25; ++iter) {
      bool moved = false;
      size_t begin = 0;
      for (int j = 0; j < K; ++j) {
        const size_t end =
            j + 1 == K ? m
                       : size_t(std::upper_bound(sorted.begin(), sorted.end(),
                                                 float((c[size_t(j)] + c[size_t(j) + 1]) / 2)) -
                                sorted.begin());
        if (end > begin) {
          const double mean = (sum[end] - sum[begin]) / double(end - begin);
          moved |= mean != c[size_t(j)];
          c[size_t(j)] = mean;
        }
        begin = std::max(begin, end);
      }
      std::sort(c.begin(), c.end());
      if (!moved) break;
    }
    for (int j = 0; j < K; ++j) levels[size_t(j)] = float(c[size_t(j)]);
  }
  for (float& l : levels) l = kvk::f16_to_f32(kvk::f32_to_f16(l));
  std::sort(levels.begin(), levels.end());
  return levels;
}

uint8_t nearest_level(float x, const float* levels, int K) {
  uint8_t q = 0;
  for (int j = 1; j < K; ++j) q += x - levels[j - 1] > levels[j] - x;  // strictly closer to j
  return q;
}

struct Outlier {
  int32_t index;  // within the head: row * D + channel
  float value;
};

// The values of v below its k-th smallest or above its k-th largest, k = round(share * n / 2)
// (exact, appended to `out`), and the sorted inliers the levels are fitted to.
std::vector<float> split_outliers(const float* v, int64_t n, int64_t stride, int64_t index0,
                                  int64_t index_step, double share, std::vector<Outlier>& out) {
  std::vector<float> sorted(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) sorted[size_t(i)] = v[i * stride];
  std::sort(sorted.begin(), sorted.end());
  // round(share * n / 2) values at each end, at most: fewer when ties straddle the threshold.
  const auto k = size_t(std::llround(share * double(n) / 2));
  if (k == 0 || 2 * k >= size_t(n)) return sorted;
  const float lo = sorted[k], hi = sorted[size_t(n) - 1 - k];
  for (int64_t i = 0; i < n; ++i) {
    const float x = v[i * stride];
    if (x < lo || x > hi) out.push_back({int32_t(index0 + i * index_step), x});
  }
  const auto first = std::lower_bound(sorted.begin(), sorted.end(), lo);
  const auto last = std::upper_bound(sorted.begin(), sorted.end(), hi);
  return std::vector<float>(first, last);
}

// The largest inlier magnitude of a row as an f16 at or above it (so scaled inliers are in
// [-1, 1]), or 1 for a row of zeros.
float row_scale(const float* x, int D, double share, std::vector<Outlier>& scratch) {
  scratch.clear();
  const std::vector<float> in = split_outliers(x, D, 1, 0, 1, share, scratch);
  float amax = 0;
  for (float v : in) amax = std::max(amax, std::fabs(v));
  if (amax == 0) return 1.0f;
  uint16_t h = kvk::f32_to_f16(amax);
  if (kvk::f16_to_f32(h) < amax) ++h;
  return kvk::f16_to_f32(h);
}

struct KvquantSizes {
  int64_t levels, codes, scales;
};

KvquantSizes kvquant_sizes(const Encoding& e, int64_t n, int D) {
  const int K = 1 << e.bits;
  if (e.axis == "channel")
    return {int64_t(D) * K, D * int64_t(quant::uniform_code_bytes(n, e.bits)), 0};
  return {K, int64_t(quant::uniform_code_bytes(n * D, e.bits)), n};
}

Encoded encode_kvquant(const Encoding& e, const float* x, const RowLayout& rows) {
  const int D = rows.model.head_dim, K = 1 << e.bits;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const bool per_channel = e.axis == "channel";
  auto levels_at = prefix(off, [&](int64_t n, size_t) { return kvquant_sizes(e, n, D).levels; });
  auto codes_at = prefix(off, [&](int64_t n, size_t) { return kvquant_sizes(e, n, D).codes; });
  auto scales_at = prefix(off, [&](int64_t n, size_t) { return kvquant_sizes(e, n, D).scales; });
  CodeArray levels = make_array("levels", Type::f16, levels_at[H]);
  CodeArray codes = make_array("codes", Type::u8, codes_at[H]);
  CodeArray scales = make_array("scales", Type::f16, scales_at[H]);
  std::vector<std::vector<Outlier>> outliers(static_cast<size_t>(H));
  Error failure(Exit::ok, "");
#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < H; ++h) {
    try {
      const int64_t n = off[h + 1] - off[h];
      check_finite(x + off[h] * D, n * D, off[h], D);
      if (n * D > INT32_MAX)  // outlier_index is an i32 within the head
        throw Error(Exit::usage, str("kvquant encodes heads of at most 2^31 values, not ", n * D));
      std::vector<float> X(x + off[h] * D, x + off[h + 1] * D);
      rope_rows(e, rows, X.data(), off[h], off[h + 1], -1);
      std::vector<Outlier>& sparse = outliers[size_t(h)];
      uint16_t* lv = elements<uint16_t>(levels) + levels_at[h];
      uint8_t* packed = elements<uint8_t>(codes) + codes_at[h];
      std::vector<uint8_t> q(static_cast<size_t>(per_channel ? n : n * D));
      if (n == 0) continue;  // its levels stay zero, it has no codes
      if (per_channel) {
        const int64_t cb = int64_t(quant::uniform_code_bytes(n, e.bits));
        for (int d = 0; d < D; ++d) {
          const std::vector<float> inliers =
              split_outliers(X.data() + d, n, D, d, D, e.outliers, sparse);
          const std::vector<float> l = kmeans_levels(inliers, K);
          for (int j = 0; j < K; ++j) lv[d * K + j] = kvk::f32_to_f16(l[size_t(j)]);
          for (int64_t r = 0; r < n; ++r)
            q[size_t(r)] = nearest_level(X[size_t(r * D + d)], l.data(), K);
          quant::pack_codes(q.data(), n, e.bits, packed + d * cb);
        }
      } else {
        // Rows scaled into [-1, 1] by their inlier magnitude; one set of levels for the head,
        // fitted to (at most 2^16 evenly spaced) scaled inliers.
        uint16_t* sc = elements<uint16_t>(scales) + scales_at[h];
        std::vector<Outlier> row_outliers;
        std::vector<float> u(X.size());
        std::vector<char> is_outlier(X.size(), 0);
        for (int64_t r = 0; r < n; ++r) {
          const float s = row_scale(X.data() + r * D, D, e.outliers, row_outliers);
          sc[r] = kvk::f32_to_f16(s);
          for (const Outlier& o : row_outliers) {
            sparse.push_back({int32_t(r * D + o.index), o.value});
            is_outlier[size_t(r * D + o.index)] = 1;
          }
          for (int d = 0; d < D; ++d) u[size_t(r * D + d)] = X[size_t(r * D + d)] / s;
        }
        std::vector<float> sample;
        const int64_t step = (n * D + 65535) / 65536;
        for (int64_t i = 0; i < n * D; i += step)
          if (!is_outlier[size_t(i)]) sample.push_back(u[size_t(i)]);
        std::sort(sample.begin(), sample.end());
        const std::vector<float> l = kmeans_levels(sample, K);
        for (int j = 0; j < K; ++j) lv[j] = kvk::f32_to_f16(l[size_t(j)]);
        for (int64_t i = 0; i < n * D; ++i) q[size_t(i)] = nearest_level(u[size_t(i)], l.data(), K);
        quant::pack_codes(q.data(), n * D, e.bits, packed);
      }
    } catch (const Error& err) {
#pragma omp critical
      if (failure.code() == Exit::ok)
        failure = Error(err.code(), str("head ", h, ": ", err.what()));
    }
  }
  if (failure.code() != Exit::ok) throw failure;
  CodeArray counts = make_array("outlier_counts", Type::i32, H);
  int64_t total = 0;
  for (int h = 0; h < H; ++h) {
    elements<int32_t>(counts)[h] = int32_t(outliers[size_t(h)].size());
    total += int64_t(outliers[size_t(h)].size());
  }
  CodeArray index = make_array("outlier_index", Type::i32, total);
  CodeArray value = make_array("outlier_value", Type::f32, total);
  int64_t o = 0;
  for (const auto& head : outliers)
    for (const Outlier& out : head) {
      elements<int32_t>(index)[o] = out.index;
      elements<float>(value)[o++] = out.value;
    }
  Encoded out;
  out.encoding = e;
  for (CodeArray* a : {&levels, &codes}) out.arrays.push_back(std::move(*a));  // (not copied)
  if (!per_channel) out.arrays.push_back(std::move(scales));
  out.arrays.push_back(std::move(counts));
  out.arrays.push_back(std::move(index));
  out.arrays.push_back(std::move(value));
  return out;
}

void decode_kvquant(const Encoded& enc, const RowLayout& rows, float* out) {
  const Encoding& e = enc.encoding;
  const int D = rows.model.head_dim, K = 1 << e.bits;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const bool per_channel = e.axis == "channel";
  auto levels_at = prefix(off, [&](int64_t n, size_t) { return kvquant_sizes(e, n, D).levels; });
  auto codes_at = prefix(off, [&](int64_t n, size_t) { return kvquant_sizes(e, n, D).codes; });
  auto scales_at = prefix(off, [&](int64_t n, size_t) { return kvquant_sizes(e, n, D).scales; });
  const CodeArray& levels = find_array(enc, "levels", Type::f16, levels_at[H]);
  const CodeArray& codes = find_array(enc, "codes", Type::u8, codes_at[H]);
  const CodeArray* scales =
      per_channel ? nullptr : &find_array(enc, "scales", Type::f16, scales_at[H]);
  const CodeArray& counts = find_array(enc, "outlier_counts", Type::i32, H);
  std::vector<int64_t> outliers_at(static_cast<size_t>(H) + 1, 0);
  for (int h = 0; h < H; ++h) {
    const int32_t c = elements<int32_t>(counts)[h];
    if (c < 0 || c > (off[h + 1] - off[h]) * D)
      throw Error(Exit::data, str("encoding 'kvquant': head ", h, " has ", c, " outliers"));
    outliers_at[size_t(h) + 1] = outliers_at[size_t(h)] + c;
  }
  const CodeArray& index = find_array(enc, "outlier_index", Type::i32, outliers_at[size_t(H)]);
  const CodeArray& value = find_array(enc, "outlier_value", Type::f32, outliers_at[size_t(H)]);
  for (int h = 0; h < H; ++h) {
    const int64_t n = off[h + 1] - off[h];
    float* X = out + off[h] * D;
    const uint16_t* lv = elements<uint16_t>(levels) + levels_at[h];
    const uint8_t* packed = elements<uint8_t>(codes) + codes_at[h];
    std::vector<uint8_t> q(static_cast<size_t>(per_channel ? n : n * D));
    if (per_channel) {
      const int64_t cb = int64_t(quant::uniform_code_bytes(n, e.bits));
      for (int d = 0; d < D; ++d) {
        quant::unpack_codes(packed + d * cb, n, e.bits, q.data());
        for (int64_t r = 0; r < n; ++r) X[r * D + d] = kvk::f16_to_f32(lv[d * K + q[size_t(r)]]);
      }
    } else {
      const uint16_t* sc = elements<uint16_t>(*scales) + scales_at[h];
      quant::unpack_codes(packed, n * D, e.bits, q.data());
      for (int64_t r = 0; r < n; ++r) {
        const float s = kvk::f16_to_f32(sc[r]);
        for (int d = 0; d < D; ++d) X[r * D + d] = kvk::f16_to_f32(lv[q[size_t(r * D + d)]]) * s;
      }
    }
    for (int64_t o = outliers_at[size_t(h)]; o < outliers_at[size_t(h) + 1]; ++o) {
      const int32_t i = elements<int32_t>(index)[o];
      if (i < 0 || i >= n * D)
        throw Error(Exit::data, str("encoding 'kvquant': head ", h, " outlier index ", i,
                                    " is outside its ", n * D, " values"));
      X[i] = elements<float>(value)[o];
    }
    rope_rows(e, rows, X, off[h], off[h + 1], +1);
  }
}

// ---- mikv --------------------------------------------------------------------------------------
// Two uniform encodings along tokens, one for the rows marked in `high` (a bit per row, each
// head's bits starting on a byte, LSB-first) and one for the others; their arrays carry the
// suffixes _high and _low.

Encoding mikv_part(const Encoding& e, bool high) {
  Encoding u = default_encoding("uniform", 'k');
  u.bits = high ? e.high_bits : e.bits;
  u.group = e.group;
  u.hadamard = e.hadamard;
  return u;
}

// The rows of each head in one part, as a layout of their own.
struct MikvPart {
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> positions;
  std::vector<int64_t> rows;  // their indices in the layer
};

MikvPart mikv_rows(const std::vector<int64_t>& off, const std::vector<int32_t>& positions,
                   const uint8_t* mask, bool high) {
  MikvPart part;
  int64_t byte = 0;
  for (size_t h = 0; h + 1 < off.size(); ++h) {
    const int64_t n = off[h + 1] - off[h];
    for (int64_t i = 0; i < n; ++i)
      if (bool((mask[byte + i / 8] >> (i % 8)) & 1) == high) {
        part.rows.push_back(off[h] + i);
        part.positions.push_back(positions[size_t(off[h] + i)]);
      }
    part.offsets.push_back(int64_t(part.rows.size()));
    byte += (n + 7) / 8;
  }
  return part;
}

Encoded encode_mikv(const Encoding& e, const Tensor& x, const RowLayout& rows) {
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  if (!rows.importance) throw Error(Exit::software, "mikv: no importance given for the rows");
  CodeArray mask =
      make_array("high", Type::u8, prefix(off, [](int64_t n, size_t) { return (n + 7) / 8; })[H]);
  int64_t byte = 0;
  for (int h = 0; h < H; ++h) {
    const int64_t n = off[h + 1] - off[h];
    // The round(share * n) rows with the most attention; ties go to the later row.
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    const float* imp = rows.importance + off[h];
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return imp[a] > imp[b] || (imp[a] == imp[b] && a > b);
    });
    const auto keep = int64_t(std::llround(e.high_share * double(n)));
    for (int64_t k = 0; k < keep; ++k)
      elements<uint8_t>(mask)[byte + order[size_t(k)] / 8] |= uint8_t(1u << (order[size_t(k)] % 8));
    byte += (n + 7) / 8;
  }
  Encoded out;
  out.encoding = e;
  out.arrays.push_back(mask);
  for (bool high : {true, false}) {
    const MikvPart part = mikv_rows(off, rows.positions, elements<uint8_t>(out.arrays[0]), high);
    const size_t row_bytes = size_t(x.cols()) * kvk::dtype_size(x.dtype());
    Tensor sub(x.dtype(), int64_t(part.rows.size()), x.cols());
    for (size_t i = 0; i < part.rows.size(); ++i)
      std::memcpy(static_cast<std::byte*>(sub.data()) + i * row_bytes,
                  static_cast<const std::byte*>(x.data()) + size_t(part.rows[i]) * row_bytes,
                  row_bytes);
    Encoded coded =
        encode_uniform(mikv_part(e, high), sub, {rows.model, part.offsets, part.positions},
                       high ? "_high" : "_low");
    for (CodeArray& a : coded.arrays)
      if (!a.name.starts_with("residual")) out.arrays.push_back(std::move(a));  // always empty
  }
  return out;
}

void decode_mikv(const Encoded& enc, const RowLayout& rows, float* out) {
  const Encoding& e = enc.encoding;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const int D = rows.model.head_dim;
  const CodeArray& mask = find_array(enc, "high", Type::u8,
                                     prefix(off, [](int64_t n, size_t) { return (n + 7) / 8; })[H]);
  for (bool high : {true, false}) {
    const MikvPart part = mikv_rows(off, rows.positions, elements<uint8_t>(mask), high);
    std::vector<float> values(part.rows.size() * size_t(D));
    decode_uniform(mikv_part(e, high), enc, {rows.model, part.offsets, part.positions},
                   values.data(), high ? "_high" : "_low");
    for (size_t i = 0; i < part.rows.size(); ++i)
      std::copy(values.begin() + i * D, values.begin() + (i + 1) * D, out + part.rows[i] * D);
  }
}

// ---- paged -------------------------------------------------------------------------------------
// Each head's rows in pages of page_size (the last shorter); `external` flags the pages in the
// store, `ids` holds their SHA-256 ids (32 bytes each, in page order), `local` the bytes of the
// other pages' rows in `dtype`, in order.


void decode_paged(const Encoded& enc, const RowLayout& rows, float* out) {
  const Encoding& e = enc.encoding;
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const DType dt = dense_dtype(e.dtype);
  const size_t row_bytes = size_t(D) * kvk::dtype_size(dt);
  int64_t pages = 0;
  for (int h = 0; h < H; ++h) pages += (off[h + 1] - off[h] + e.page_size - 1) / e.page_size;
  const CodeArray& external = find_array(enc, "external", Type::u8, pages);
  int64_t n_external = 0, local_rows = 0, page = 0;
  for (int h = 0; h < H; ++h)
    for (int64_t r = off[h]; r < off[h + 1]; r += e.page_size, ++page) {
      const int64_t n = std::min<int64_t>(e.page_size, off[h + 1] - r);
      if (external.bytes[size_t(page)])
        ++n_external;
      else
        local_rows += n;
    }
  const CodeArray& ids = find_array(enc, "ids", Type::u8, n_external * 32);
  const CodeArray& local = find_array(enc, "local", Type::u8, local_rows * int64_t(row_bytes));
  for (const char* meta : {"page_key_min", "page_key_max", "page_key_mean"})  // optional
    for (const CodeArray& a : enc.arrays)
      if (a.name == meta) find_array(enc, meta, Type::f32, pages * D);
  const std::shared_ptr<const PageStore> store = PageStore::open_for_reading(e.store);
  const uint8_t* next_local = local.bytes.data();
  int64_t next_id = 0;
  page = 0;
  for (int h = 0; h < H; ++h)
    for (int64_t r = off[h]; r < off[h + 1]; r += e.page_size, ++page) {
      const int64_t n = std::min<int64_t>(e.page_size, off[h + 1] - r);
      const size_t bytes = size_t(n) * row_bytes;
      if (external.bytes[size_t(page)]) {
        const std::string id = PageStore::id_from_bytes(&ids.bytes[size_t(next_id++ * 32)]);
        const std::vector<uint8_t> data = store->get(id, int64_t(bytes));  // (head h's rows)
        kvk::cpu_ops().to_f32(dt, data.data(), out + r * D, size_t(n) * D);
      } else {
        kvk::cpu_ops().to_f32(dt, next_local, out + r * D, size_t(n) * D);
        next_local += bytes;
      }
    }
}

}  // namespace

// ---- public ------------------------------------------------------------------------------------

std::vector<float> entry_importance(const ModelInfo& model, const std::vector<int64_t>& offsets,
                                    const std::vector<int32_t>& positions, const Tensor& attn_acc) {
  if (attn_acc.empty())
    throw Error(Exit::data,
                "mikv ranks entries by attention statistics, which this snapshot lacks "
                "(kv-capture --attn-stats)");
  const std::vector<float> acc = attn_acc.to_f32();
  const int G = model.group_size();
  const int64_t T = attn_acc.cols();
  std::vector<float> out(positions.size(), 0.0f);
  for (size_t h = 0; h + 1 < offsets.size(); ++h)
    for (int64_t i = offsets[h]; i < offsets[h + 1]; ++i)
      for (int j = int(h) * G; j < int(h + 1) * G; ++j)
        out[size_t(i)] += acc[size_t(j * T + positions[size_t(i)])];
  return out;
}

void decode_minicache(const Encoded& enc, int64_t n_rows, int dim, const float* partner,
                      float* out) {
  const CodeArray& merged = find_array(enc, "merged", Type::u8, (n_rows + 7) / 8);
  auto is_merged = [&](int64_t r) { return (merged.bytes[size_t(r / 8)] >> (r % 8)) & 1; };
  int64_t n_merged = 0;
  for (int64_t r = 0; r < n_rows; ++r) n_merged += is_merged(r);
  const DType dt = dense_dtype(enc.encoding.dtype);
  const CodeArray& norms = find_array(enc, "norms", Type::f16, n_merged);
  const CodeArray& rest =
      find_array(enc, "rows", Type::u8, (n_rows - n_merged) * dim * int64_t(kvk::dtype_size(dt)));
  const auto* raw = rest.bytes.data();
  int64_t m = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    float* y = out + r * dim;
    if (is_merged(r)) {
      const float* p = partner + r * dim;
      double sq = 0;
      for (int c = 0; c < dim; ++c) sq += double(p[c]) * p[c];
      const double norm = kvk::f16_to_f32(elements<uint16_t>(norms)[m]);
      const double scale = sq > 0 ? norm / std::sqrt(sq) : 0.0;
      for (int c = 0; c < dim; ++c) y[c] = float(p[c] * scale);
      ++m;
    } else {
      kvk::cpu_ops().to_f32(dt, raw, y, size_t(dim));
      raw += size_t(dim) * kvk::dtype_size(dt);
    }
  }
}

void hadamard_rotate(float* x, int n) {
  for (int len = 1; len < n; len <<= 1)
    for (int i = 0; i < n; i += 2 * len)
      for (int j = i; j < i + len; ++j) {
        const float a = x[j], b = x[j + len];
        x[j] = a + b;
        x[j + len] = a - b;
      }
  const float norm = 1.0f / std::sqrt(float(n));
  for (int i = 0; i < n; ++i) x[i] *= norm;
}

const std::vector<std::string>& scheme_names() {
  static const std::vector<std::string> names = {"dense", "uniform", "kivi",    "q8_0", "q4_0",
                                                 "fp8",   "svd",     "kvquant", "mikv"};
  return names;
}

Encoding default_encoding(const std::string& scheme, char role) {
  Encoding e;
  e.scheme = scheme;
  if (scheme == "uniform") {
    e.bits = 4;
    e.group = 32;
    e.axis = "token";
  } else if (scheme == "kivi") {
    e.bits = 2;
    e.group = 32;
    e.residual = 128;
    e.axis = role == 'k' ? "channel" : "token";
  } else if (scheme == "fp8") {
    e.fp8_format = "e4m3";
    e.scale_scope = "head";
  } else if (scheme == "svd") {
    e.energy = 0.99;
    e.factors = "f16";
  } else if (scheme == "minicache") {
    e.dtype = "f16";
    e.partner = 0;
  } else if (scheme == "paged") {
    e.page_size = 16;
    e.dtype = "f16";
  } else if (scheme == "external") {
    e.inner = "q8_0";
  } else if (scheme == "mikv") {
    e.bits = 2;
    e.high_bits = 8;
    e.high_share = 0.2;
    e.group = 32;
    e.axis = "token";
  } else if (scheme == "kvquant") {
    e.bits = 3;
    e.outliers = 0.01;
    e.axis = role == 'k' ? "channel" : "token";
    e.pre_rope = role == 'k';
  } else if (scheme != "dense" && scheme != "q8_0" && scheme != "q4_0") {
    std::string known;
    for (const std::string& s : scheme_names()) known += (known.empty() ? "" : ", ") + s;
    throw Error(Exit::usage, str("unknown scheme '", scheme, "' (known: ", known, ")"));
  }
  return e;
}

void check_encoding(const Encoding& e, const ModelInfo& model, char role) {
  default_encoding(e.scheme, role);  // known scheme
  const int D = model.head_dim;
  const std::string what = str("scheme ", e.scheme, ": ");
  if (uses_bits(e.scheme)) {
    if (e.bits != 2 && e.bits != 3 && e.bits != 4 && e.bits != 8)
      throw Error(Exit::usage, str(what, "bits ", e.bits, " is not 2, 3, 4 or 8"));
    if (e.group < 1 || e.group > (1 << 20))
      throw Error(Exit::usage, str(what, "group ", e.group, " is outside [1, 1048576]"));
    if (e.axis != "token" && e.axis != "channel")
      throw Error(Exit::usage, str(what, "axis '", e.axis, "' is not token or channel"));
    if (e.axis == "token" && D % std::min(e.group, D))
      throw Error(Exit::usage, str(what, "group ", e.group, " along a token must divide head_dim ",
                                   D, " (or be at least it)"));
    if (e.residual < 0) throw Error(Exit::usage, str(what, "residual ", e.residual, " < 0"));
  }
  if (e.scheme == "mikv") {
    for (int b : {e.bits, e.high_bits})
      if (b != 2 && b != 3 && b != 4 && b != 8)
        throw Error(Exit::usage, str(what, "bits ", b, " is not 2, 3, 4 or 8"));
    if (e.high_bits < e.bits)
      throw Error(Exit::usage,
                  str(what, "high bits ", e.high_bits, " are fewer than bits ", e.bits));
    if (!(e.high_share >= 0 && e.high_share <= 1))
      throw Error(Exit::usage, str(what, "high share ", e.high_share, " is outside [0, 1]"));
    if (e.group < 1 || e.group > (1 << 20))
      throw Error(Exit::usage, str(what, "group ", e.group, " is outside [1, 1048576]"));
    if (D % std::min(e.group, D))
      throw Error(Exit::usage, str(what, "group ", e.group, " along a token must divide head_dim ",
                                   D, " (or be at least it)"));
  }
  if (e.scheme == "minicache") {
    if (e.dtype != "f16" && e.dtype != "bf16" && e.dtype != "f32")
      throw Error(Exit::usage, str(what, "dtype '", e.dtype, "' is not f16, bf16 or f32"));
    if (e.partner < 0) throw Error(Exit::usage, str(what, "partner layer ", e.partner, " < 0"));
  }
  if (e.scheme == "paged") {
    if (e.page_size < 16 || e.page_size > 256)
      throw Error(Exit::usage, str(what, "page size ", e.page_size, " is outside 16..256"));
    if (e.dtype != "f16" && e.dtype != "bf16" && e.dtype != "f32")
      throw Error(Exit::usage, str(what, "dtype '", e.dtype, "' is not f16, bf16 or f32"));
    if (e.store.empty()) throw Error(Exit::usage, str(what, "no page store"));
  }
  if (e.scheme == "external") {
    if (e.inner == "dense" || e.inner == "paged" || e.inner == "external" || e.inner.empty())
      throw Error(Exit::usage, str(what, "inner scheme '", e.inner, "' is not an encoding"));
    if (e.store.empty()) throw Error(Exit::usage, str(what, "no page store"));
    check_encoding(e.inner_encoding(), model, role);
    return;
  }
  if (e.hadamard && !allows_hadamard(e.scheme))
    throw Error(Exit::usage,
                str(what, "no Hadamard rotation (uniform, kivi, q8_0, q4_0, fp8, mikv)"));
  if (e.hadamard && !is_power_of_two(D))
    throw Error(Exit::usage, str(what, "Hadamard rotation needs head_dim a power of 2, not ", D));
  if (e.scheme == "fp8") {
    fp8::parse_format(e.fp8_format);
    if (e.scale_scope != "tensor" && e.scale_scope != "head")
      throw Error(Exit::usage, str(what, "scale '", e.scale_scope, "' is not tensor or head"));
  }
  if (e.scheme == "svd") {
    if (e.rank < 0 || e.rank > D)
      throw Error(Exit::usage, str(what, "rank ", e.rank, " is outside [1, head_dim ", D, "]"));
    if (e.rank == 0 && !(e.energy > 0 && e.energy <= 1))
      throw Error(Exit::usage, str(what, "energy ", e.energy, " is outside (0, 1]"));
    if (e.factors != "f16" && e.factors != "f32")
      throw Error(Exit::usage, str(what, "factors '", e.factors, "' are not f16 or f32"));
  }
  if (e.scheme == "kvquant") {
    if (e.bits < 2 || e.bits > 4)
      throw Error(Exit::usage, str(what, "bits ", e.bits, " is not 2, 3 or 4"));
    if (e.axis != "token" && e.axis != "channel")
      throw Error(Exit::usage, str(what, "axis '", e.axis, "' is not token or channel"));
    if (!(e.outliers >= 0 && e.outliers < 1))
      throw Error(Exit::usage, str(what, "outliers ", e.outliers, " is outside [0, 1)"));
  }
  if (e.pre_rope && ((e.scheme != "svd" && e.scheme != "kvquant") || role != 'k'))
    throw Error(Exit::usage, str(what, "pre-RoPE encoding is for svd and kvquant keys only"));
}

Encoding Encoding::inner_encoding() const {
  Encoding e = *this;
  e.scheme = inner;
  e.inner.clear();
  e.store.clear();
  return e;
}

std::string Encoding::describe() const {
  if (scheme == "external") return str("external(", inner_encoding().describe(), ") store=", store);
  std::string s = scheme;
  if (uses_bits(scheme)) {
    s += str(" bits=", bits, " group=", group, " axis=", axis);
    if (symmetric) s += " symmetric";
    if (residual) s += str(" residual=", residual);
  }
  if (scheme == "fp8") s += str(" format=", fp8_format, " scale=", scale_scope);
  if (scheme == "svd") {
    s += rank ? str(" rank=", rank) : str(" energy=", energy);
    s += str(" factors=", factors);
    if (pre_rope) s += " pre-rope";
  }
  if (scheme == "mikv")
    s +=
        str(" bits=", bits, " high_bits=", high_bits, " high_share=", high_share, " group=", group);
  if (scheme == "kvquant") {
    s += str(" bits=", bits, " axis=", axis, " outliers=", outliers);
    if (pre_rope) s += " pre-rope";
  }
  if (scheme == "paged") s += str(" page=", page_size, " dtype=", dtype, " store=", store);
  if (scheme == "minicache") s += str(" partner=", partner, " dtype=", dtype);
  if (hadamard) s += " hadamard";
  return s;
}

void recycle(Encoded&& enc) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  for (CodeArray& a : enc.arrays)
    if (a.bytes.capacity() >= (size_t(1) << 16) && pool.size() < 32)
      pool.push_back(std::move(a.bytes));
  enc.arrays.clear();
}

int64_t Encoded::bytes() const {
  int64_t b = 0;
  for (const CodeArray& a : arrays) b += int64_t(a.bytes.size());
  return b;
}

Encoded encode(const Encoding& e, const Tensor& x, const RowLayout& rows) {
  if (x.rows() != rows.head_offsets.back() || x.cols() != rows.model.head_dim)
    throw Error(Exit::software, "encode: values do not match the row layout");
  if (e.scheme == "uniform" || e.scheme == "kivi") return encode_uniform(e, x, rows);
  if (e.scheme == "q8_0" || e.scheme == "q4_0") return encode_blocks(e, x, rows);
  if (e.scheme == "fp8") return encode_fp8(e, x, rows);
  if (e.scheme == "mikv") return encode_mikv(e, x, rows);
  // Whole-head schemes: they factorize or fit each head at once.
  const std::vector<float> values = x.to_f32();
  if (e.scheme == "svd") return encode_svd(e, values.data(), rows);
  if (e.scheme == "kvquant") return encode_kvquant(e, values.data(), rows);
  throw Error(Exit::software, str("encode: scheme '", e.scheme, "' has no encoder"));
}

Encoded encode(const Encoding& e, const float* x, const RowLayout& rows) {
  return encode(e, Tensor::from_f32(DType::f32, rows.head_offsets.back(), rows.model.head_dim, x),
                rows);
}

void decode(const Encoded& enc, const RowLayout& rows, float* out) {
  const std::string& s = enc.encoding.scheme;
  if (s == "uniform" || s == "kivi") return decode_uniform(enc.encoding, enc, rows, out);
  if (s == "q8_0" || s == "q4_0") return decode_blocks(enc, rows, out);
  if (s == "fp8") return decode_fp8(enc, rows, out);
  if (s == "svd") return decode_svd(enc, rows, out);
  if (s == "kvquant") return decode_kvquant(enc, rows, out);
  if (s == "mikv") return decode_mikv(enc, rows, out);
  if (s == "paged") return decode_paged(enc, rows, out);
  if (s == "minicache")
    throw Error(Exit::software, "minicache decodes against its partner layer (decode_minicache)");
  throw Error(Exit::data, str("encoding '", s, "', which this kvtk cannot decode"));
}

DType dense_dtype(const std::string& name) {
  return name == "f32" ? DType::f32 : name == "bf16" ? DType::bf16 : DType::f16;
}

}  // namespace kv
