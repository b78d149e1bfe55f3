#include "kv/encoding.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "kv/error.h"
#include "kv/fp8.h"
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
  return uses_bits(s) || s == "q8_0" || s == "q4_0" || s == "fp8";
}

// ---- arrays ------------------------------------------------------------------------------------

CodeArray make_array(const std::string& name, Type type, int64_t count) {
  CodeArray a;
  a.name = name;
  a.type = type;
  a.bytes.assign(size_t(count) * CodeArray::element_size(type), 0);
  return a;
}

const CodeArray& find_array(const Encoded& enc, const std::string& name, Type type, int64_t count) {
  for (const CodeArray& a : enc.arrays)
    if (a.name == name) {
      if (a.type != type || a.count() != count)
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

void check_finite(const float* x, int64_t n, int64_t row0, int D) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i]))
      throw Error(Exit::data, str("entry ", row0 + i / D, " channel ", i % D, " is ", x[i],
                                  "; only finite values can be encoded"));
}

// Rows [a, b) of x, Hadamard-rotated when the encoding asks for it.
std::vector<float> head_rows(const Encoding& e, const float* x, int64_t a, int64_t b, int D) {
  std::vector<float> rows(x + a * D, x + b * D);
  if (e.hadamard)
    for (int64_t r = 0; r < b - a; ++r) hadamard_rotate(rows.data() + r * D, D);
  return rows;
}

void unrotate_rows(const Encoding& e, float* rows, int64_t n, int D) {
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

// ---- uniform and kivi --------------------------------------------------------------------------

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
  UniformSizes s{nq, 0, 0, r * D};
  if (e.axis == "token") {
    s.code_bytes = int64_t(quant::uniform_code_bytes(nq * D, p.bits));
    s.groups = quant::uniform_groups(nq * D, p.group);
  } else {  // each channel is its own run of nq values, so its codes start on a byte
    s.code_bytes = D * int64_t(quant::uniform_code_bytes(nq, p.bits));
    s.groups = D * quant::uniform_groups(nq, p.group);
  }
  return s;
}

Encoded encode_uniform(const Encoding& e, const float* x, const RowLayout& rows) {
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const quant::UniformParams p = uniform_params(e, D);
  auto sizes = [&](int64_t n, size_t) { return uniform_sizes(e, n, D); };
  auto codes_at = prefix(off, [&](int64_t n, size_t h) { return sizes(n, h).code_bytes; });
  auto groups_at = prefix(off, [&](int64_t n, size_t h) { return sizes(n, h).groups; });
  auto resid_at = prefix(off, [&](int64_t n, size_t h) { return sizes(n, h).residual_values; });
  Encoded out;
  out.encoding = e;
  CodeArray codes = make_array("codes", Type::u8, codes_at[H]);
  CodeArray scales = make_array("scales", Type::f16, groups_at[H]);
  CodeArray zeros = make_array("zeros", Type::f16, e.symmetric ? 0 : groups_at[H]);
  CodeArray resid = make_array("residual", Type::f16, resid_at[H]);
  Error failure(Exit::ok, "");
#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < H; ++h) {
    try {
      const UniformSizes s = sizes(off[h + 1] - off[h], size_t(h));
      check_finite(x + off[h] * D, (off[h + 1] - off[h]) * D, off[h], D);
      std::vector<float> q = head_rows(e, x, off[h], off[h] + s.quantized_rows, D);
      uint8_t* c = elements<uint8_t>(codes) + codes_at[h];
      uint16_t* sc = elements<uint16_t>(scales) + groups_at[h];
      uint16_t* zp = e.symmetric ? nullptr : elements<uint16_t>(zeros) + groups_at[h];
      if (e.axis == "token") {
        quant::encode_uniform(q.data(), int64_t(q.size()), p, c, sc, zp);
      } else {
        const int64_t nq = s.quantized_rows, cb = int64_t(quant::uniform_code_bytes(nq, p.bits));
        const int64_t ng = quant::uniform_groups(nq, p.group);
        std::vector<float> column(static_cast<size_t>(nq));
        for (int d = 0; d < D; ++d) {
          for (int64_t r = 0; r < nq; ++r) column[size_t(r)] = q[size_t(r * D + d)];
          quant::encode_uniform(column.data(), nq, p, c + d * cb, sc + d * ng,
                                zp ? zp + d * ng : nullptr);
        }
      }
      uint16_t* res = elements<uint16_t>(resid) + resid_at[h];
      const float* src = x + (off[h] + s.quantized_rows) * D;
      for (int64_t i = 0; i < s.residual_values; ++i) res[i] = kvk::f32_to_f16(src[i]);
    } catch (const Error& err) {
#pragma omp critical
      if (failure.code() == Exit::ok)
        failure = Error(err.code(), str("head ", h, ": ", err.what()));
    }
  }
  if (failure.code() != Exit::ok) throw failure;
  out.arrays = {std::move(codes), std::move(scales)};
  if (!e.symmetric) out.arrays.push_back(std::move(zeros));
  out.arrays.push_back(std::move(resid));
  return out;
}

void decode_uniform(const Encoded& enc, const RowLayout& rows, float* out) {
  const Encoding& e = enc.encoding;
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const quant::UniformParams p = uniform_params(e, D);
  auto codes_at = prefix(off, [&](int64_t n, size_t) { return uniform_sizes(e, n, D).code_bytes; });
  auto groups_at = prefix(off, [&](int64_t n, size_t) { return uniform_sizes(e, n, D).groups; });
  auto resid_at =
      prefix(off, [&](int64_t n, size_t) { return uniform_sizes(e, n, D).residual_values; });
  const CodeArray& codes = find_array(enc, "codes", Type::u8, codes_at[H]);
  const CodeArray& scales = find_array(enc, "scales", Type::f16, groups_at[H]);
  const CodeArray* zeros =
      e.symmetric ? nullptr : &find_array(enc, "zeros", Type::f16, groups_at[H]);
  const CodeArray& resid = find_array(enc, "residual", Type::f16, resid_at[H]);
#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < H; ++h) {
    const UniformSizes s = uniform_sizes(e, off[h + 1] - off[h], D);
    const uint8_t* c = elements<uint8_t>(codes) + codes_at[h];
    const uint16_t* sc = elements<uint16_t>(scales) + groups_at[h];
    const uint16_t* zp = zeros ? elements<uint16_t>(*zeros) + groups_at[h] : nullptr;
    float* q = out + off[h] * D;
    const int64_t nq = s.quantized_rows;
    if (e.axis == "token") {
      quant::decode_uniform(c, sc, zp, nq * D, p, q);
    } else {
      const int64_t cb = int64_t(quant::uniform_code_bytes(nq, p.bits));
      const int64_t ng = quant::uniform_groups(nq, p.group);
      std::vector<float> column(static_cast<size_t>(nq));
      for (int d = 0; d < D; ++d) {
        quant::decode_uniform(c + d * cb, sc + d * ng, zp ? zp + d * ng : nullptr, nq, p,
                              column.data());
        for (int64_t r = 0; r < nq; ++r) q[r * D + d] = column[size_t(r)];
      }
    }
    unrotate_rows(e, q, nq, D);
    const uint16_t* res = elements<uint16_t>(resid) + resid_at[h];
    for (int64_t i = 0; i < s.residual_values; ++i) q[nq * D + i] = kvk::f16_to_f32(res[i]);
  }
}

// ---- q8_0 and q4_0 -----------------------------------------------------------------------------

// A head's values run on through its rows; the last block is padded with zeros.
int64_t padded_values(int64_t n, int D) {
  const int64_t v = n * D;
  return (v + quant::block_values - 1) / quant::block_values * quant::block_values;
}

size_t block_bytes(const Encoding& e, int64_t values) {
  return e.scheme == "q8_0" ? quant::q8_0_bytes(values) : quant::q4_0_bytes(values);
}

Encoded encode_blocks(const Encoding& e, const float* x, const RowLayout& rows) {
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  auto at =
      prefix(off, [&](int64_t n, size_t) { return int64_t(block_bytes(e, padded_values(n, D))); });
  CodeArray blocks = make_array("blocks", Type::u8, at[H]);
  for (int h = 0; h < H; ++h) {
    const int64_t n = off[h + 1] - off[h];
    check_finite(x + off[h] * D, n * D, off[h], D);
    std::vector<float> v = head_rows(e, x, off[h], off[h + 1], D);
    v.resize(size_t(padded_values(n, D)), 0.0f);
    uint8_t* dst = elements<uint8_t>(blocks) + at[h];
    if (e.scheme == "q8_0")
      quant::encode_q8_0(v.data(), int64_t(v.size()), dst);
    else
      quant::encode_q4_0(v.data(), int64_t(v.size()), dst);
  }
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
  std::vector<float> v;
  for (int h = 0; h < H; ++h) {
    const int64_t n = off[h + 1] - off[h];
    v.resize(size_t(padded_values(n, D)));
    const uint8_t* src = elements<uint8_t>(blocks) + at[h];
    if (e.scheme == "q8_0")
      quant::decode_q8_0(src, int64_t(v.size()), v.data());
    else
      quant::decode_q4_0(src, int64_t(v.size()), v.data());
    std::copy(v.begin(), v.begin() + n * D, out + off[h] * D);
    unrotate_rows(e, out + off[h] * D, n, D);
  }
}

// ---- fp8 ---------------------------------------------------------------------------------------

Encoded encode_fp8(const Encoding& e, const float* x, const RowLayout& rows) {
  const int D = rows.model.head_dim;
  const auto& off = rows.head_offsets;
  const int H = int(off.size()) - 1;
  const fp8::Format f = fp8::parse_format(e.fp8_format);
  const bool per_head = e.scale_scope == "head";
  const int64_t N = off[H];
  check_finite(x, N * D, 0, D);
  std::vector<float> v = head_rows(e, x, 0, N, D);
  CodeArray codes = make_array("codes", Type::u8, N * D);
  CodeArray scales = make_array("scales", Type::f32, per_head ? H : 1);
  // scale = amax / max_finite puts the largest magnitude on the format's largest value.
  auto scale_of = [&](int64_t a, int64_t b) {
    float amax = 0;
    for (int64_t i = a * D; i < b * D; ++i) amax = std::max(amax, std::fabs(v[size_t(i)]));
    // Floored at FLT_MIN so that its inverse stays finite for caches of subnormal values.
    return amax > 0 ? std::max(amax / fp8::max_finite(f), std::numeric_limits<float>::min()) : 1.0f;
  };
  for (int h = 0; h < (per_head ? H : 1); ++h) {
    const int64_t a = per_head ? off[h] : 0, b = per_head ? off[h + 1] : N;
    const float s = scale_of(a, b);
    elements<float>(scales)[h] = s;
    fp8::encode_array(v.data() + a * D, (b - a) * D, s, f, elements<uint8_t>(codes) + a * D);
  }
  Encoded out;
  out.encoding = e;
  out.arrays = {std::move(codes), std::move(scales)};
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
    const int64_t a = per_head ? off[h] : 0, b = per_head ? off[h + 1] : N;
    const float s = elements<float>(scales)[h];
    if (!(s > 0) || !std::isfinite(s))
      throw Error(Exit::data,
                  str("encoding 'fp8': scale ", h, " is ", s, ", not a positive number"));
    fp8::decode_array(elements<uint8_t>(codes) + a * D, (b - a) * D, s, f, out + a * D);
  }
  unrotate_rows(e, out, N, D);
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
    elements<uint16_t>(a)[i] = kvk::f32_to_f16(v);
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
  out.arrays = {std::move(rank_array), std::move(coeffs), std::move(basis)};
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

}  // namespace

// ---- public ------------------------------------------------------------------------------------

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
  static const std::vector<std::string> names = {"dense", "uniform", "kivi", "q8_0",
                                                 "q4_0",  "fp8",     "svd"};
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
  if (e.hadamard && !allows_hadamard(e.scheme))
    throw Error(Exit::usage, str(what, "no Hadamard rotation (uniform, kivi, q8_0, q4_0, fp8)"));
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
  if (e.pre_rope && (e.scheme != "svd" || role != 'k'))
    throw Error(Exit::usage, str(what, "pre-RoPE factorization is for svd keys only"));
}

std::string Encoding::describe() const {
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
  if (hadamard) s += " hadamard";
  return s;
}

int64_t Encoded::bytes() const {
  int64_t b = 0;
  for (const CodeArray& a : arrays) b += int64_t(a.bytes.size());
  return b;
}

Encoded encode(const Encoding& e, const float* x, const RowLayout& rows) {
  if (e.scheme == "uniform" || e.scheme == "kivi") return encode_uniform(e, x, rows);
  if (e.scheme == "q8_0" || e.scheme == "q4_0") return encode_blocks(e, x, rows);
  if (e.scheme == "fp8") return encode_fp8(e, x, rows);
  if (e.scheme == "svd") return encode_svd(e, x, rows);
  throw Error(Exit::software, str("encode: scheme '", e.scheme, "' has no encoder"));
}

void decode(const Encoded& enc, const RowLayout& rows, float* out) {
  const std::string& s = enc.encoding.scheme;
  if (s == "uniform" || s == "kivi") return decode_uniform(enc, rows, out);
  if (s == "q8_0" || s == "q4_0") return decode_blocks(enc, rows, out);
  if (s == "fp8") return decode_fp8(enc, rows, out);
  if (s == "svd") return decode_svd(enc, rows, out);
  throw Error(Exit::data, str("encoding '", s, "', which this kvtk cannot decode"));
}

}  // namespace kv
