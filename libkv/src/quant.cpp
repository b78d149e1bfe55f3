#include "kv/quant.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kv/error.h"
#include "kv/str.h"
#include "kvk/ops.h"

// Bit-identity with ggml rests on doing exactly its f32 operations in its order. The one place a
// compiler may change them is q4_0's x * id + 8.5f, which it can fuse into an FMA (one rounding
// instead of two) when the target has FMA (-march=native, x86-64-v3): GCC does so even across
// statements and in ISO mode, and clang with -ffp-contract=fast. rounded_product() keeps the
// product rounded. tests/cli/quant_reference.sh compares with gguf-py on values where fusing
// changes the code.

namespace kv::quant {
namespace {

constexpr int64_t QK = block_values;
// Below this many values a parallel region costs more than it saves.
constexpr int64_t parallel_min = int64_t(1) << 15;

void check_count(const char* what, int64_t n) {
  if (n < 0) throw Error(Exit::usage, str(what, ": negative value count ", n));
}

void check_blocks(const char* what, int64_t n) {
  check_count(what, n);
  if (n % QK)
    throw Error(Exit::usage, str(what, " encodes blocks of ", QK, " values; ", n,
                                 " values is not a multiple of ", QK));
}

uint16_t load_u16(const uint8_t* p) {
  return uint16_t(p[0] | (p[1] << 8));
}
void store_u16(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
}

bool finite_run(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

[[noreturn]] void throw_nonfinite(const char* what, const float* x, int64_t n) {
  int64_t i = 0;
  while (i < n && std::isfinite(x[i])) ++i;
  throw Error(Exit::data,
              str(what, ": value ", i, " is ", x[i], "; only finite values can be quantized"));
}

// ---- q8_0 / q4_0 (ggml-quants.c, quantize_row_q8_0_ref and quantize_row_q4_0_ref) ----

void encode_q8_0_block(const float* x, uint8_t* out) {
  float amax = 0.0f;
  for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(out, kvk::f32_to_f16(d));
  for (int64_t j = 0; j < QK; ++j) {
    const float v = x[j] * id;
    // |v| <= 127 whenever id is finite; id overflows to Inf only for d below 2^-128, and then
    // x86 ggml (an out-of-range float-to-int conversion) and gguf-py both give 0.
    const int q = std::isfinite(v) ? int(std::clamp(std::round(v), -128.0f, 127.0f)) : 0;
    out[2 + j] = uint8_t(int8_t(q));
  }
}

// a * b rounded to f32, never fused with a following addition (see the top of the file).
inline float rounded_product(float a, float b) {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  return __builtin_assoc_barrier(a * b);
#else
  // An empty asm the value must pass through in a register: opaque, so nothing fuses across it
  // (clang's -ffp-contract=fast ignores source-level pragmas).
  float p = a * b;
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(p));
#elif defined(__aarch64__)
  __asm__("" : "+w"(p));
#else
  volatile float v = p;
  p = v;
#endif
  return p;
#endif
}

// trunc(v + 8.5) limited to 15, with v = x * id in [-8, 8] up to rounding; out-of-range and
// non-finite sums (id overflowed, see above) map to 0 like x86 ggml and gguf-py.
uint8_t q4_0_code(float v) {
  const float t = v + 8.5f;
  return std::isfinite(t) ? uint8_t(int(std::clamp(t, 0.0f, 15.0f))) : 0;
}

void encode_q4_0_block(const float* x, uint8_t* out) {
  // ggml keeps the first value of largest magnitude, starting from +0: strict comparison.
  float amax = 0.0f, max = 0.0f;
  for (int64_t j = 0; j < QK; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(out, kvk::f32_to_f16(d));
  for (int64_t j = 0; j < QK / 2; ++j) {
    const float lo = rounded_product(x[j], id);
    const float hi = rounded_product(x[j + QK / 2], id);
    out[2 + j] = uint8_t(q4_0_code(lo) | (q4_0_code(hi) << 4));
  }
}

template <class EncodeBlock>
void encode_blocks(const char* what, const float* x, int64_t n, uint8_t* out, size_t block_bytes,
                   EncodeBlock encode_block) {
  check_blocks(what, n);
  const int64_t nb = n / QK;
  bool bad = false;
#pragma omp parallel for schedule(static) reduction(|| : bad) if (n >= parallel_min)
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    if (!finite_run(xb, QK)) {
      bad = true;
      continue;
    }
    encode_block(xb, out + size_t(b) * block_bytes);
  }
  if (bad) throw_nonfinite(what, x, n);
}

// ---- uniform groups ----

bool f16_finite(uint16_t h) {
  return (h & 0x7c00) != 0x7c00;
}

// The smallest non-negative f16 (as bits) for which covers() holds; covers must be monotone in
// the value and hold for +Inf. Non-negative f16 bit patterns are ordered like their values.
template <class Covers>
uint16_t smallest_f16(Covers covers) {
  uint32_t lo = 0, hi = 0x7c00;
  while (lo < hi) {
    const uint32_t mid = (lo + hi) / 2;
    if (covers(kvk::f16_to_f32(uint16_t(mid))))
      hi = mid;
    else
      lo = mid + 1;
  }
  return uint16_t(lo);
}

enum class GroupStatus { ok, nonfinite, range };

// One group's grid as the encoder and decoder see it, plus the extremes the encoder pins.
struct Grid {
  float scale = 0, zero = 0;
  float lo = 0, hi = 0;  // encoder only: min and max (asymmetric), or -max|x| and max|x|
};

// Levels above the zero (asymmetric) or on each side of 0 (symmetric).
int levels(const UniformParams& p) {
  return p.symmetric ? (1 << (p.bits - 1)) - 1 : (1 << p.bits) - 1;
}

// The value the decoder gives for level q >= 0 above the zero: q * S is exact in f32 (at most
// 8 + 11 significant bits), so the one rounding is the addition, the same in encoder and decoder.
float asym_value(int q, const Grid& g) {
  return g.scale == 0.0f ? g.zero : float(q) * g.scale + g.zero;
}

// Chooses one group's stored scale (and zero) per the rules in quant.h.
GroupStatus group_params(const float* x, int64_t len, const UniformParams& p, uint16_t* scale,
                         uint16_t* zero, Grid* grid) {
  if (!finite_run(x, len)) return GroupStatus::nonfinite;
  const int L = levels(p);
  Grid g;
  uint16_t s = 0;
  if (p.symmetric) {
    float amax = 0.0f;
    for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[i]));
    // Q * S is exact in f32, so the top level is exactly Q * S.
    if (amax > 0.0f) s = smallest_f16([&](float S) { return float(L) * S >= amax; });
    g.lo = -amax;
    g.hi = amax;
  } else {
    float mn = x[0], mx = x[0];
    for (int64_t i = 1; i < len; ++i) {
      mn = std::min(mn, x[i]);
      mx = std::max(mx, x[i]);
    }
    const uint16_t z = kvk::f32_to_f16(mn);
    if (!f16_finite(z)) return GroupStatus::range;
    g.zero = kvk::f16_to_f32(z);
    // The smallest S whose top level, as the decoder computes it, reaches the max. Being the
    // smallest is what makes requantization stable: the decoded max is that top level, and no
    // smaller S reaches it either. A constant group keeps S = 0 even when f16(m) < m: its values
    // are all the min, pinned to Z, so a scale would be stored for nothing.
    if (mn < mx && g.zero < mx)
      s = smallest_f16([&](float S) { return float(L) * S + g.zero >= mx; });
    g.lo = mn;
    g.hi = mx;
    *zero = z;
  }
  if (!f16_finite(s)) return GroupStatus::range;
  g.scale = kvk::f16_to_f32(s);
  *scale = s;
  if (grid) *grid = g;
  return GroupStatus::ok;
}

// Code of x on its group's grid: the nearest level, computed in double so that it is the
// nearest up to 2^-52 relative whatever the magnitudes of x and Z. The group's extremes are
// pinned to the end levels (min -> 0, max -> L; symmetric: +-max|x| -> +-Q): then the decoded
// group has the stored zero as its min and the top level as its max, and encoding it again
// chooses the same S and Z and the same codes.
uint32_t uniform_code(float x, const Grid& g, const UniformParams& p, int L) {
  if (p.symmetric) {
    const int offset = 1 << (p.bits - 1);
    if (g.scale == 0.0f) return uint32_t(offset);
    double q;
    if (x == g.hi)
      q = L;
    else if (x == g.lo)
      q = -L;
    else
      q = std::clamp(std::round(double(x) / g.scale), double(-L), double(L));
    return uint32_t(int(q) + offset);
  }
  if (g.scale == 0.0f || x == g.lo) return 0;
  if (x == g.hi) return uint32_t(L);
  return uint32_t(std::clamp(std::round((double(x) - g.zero) / g.scale), 0.0, double(L)));
}

float uniform_value(uint32_t code, const Grid& g, const UniformParams& p) {
  if (p.symmetric) return float(int(code) - (1 << (p.bits - 1))) * g.scale;
  return asym_value(int(code), g);
}

std::vector<Grid> grids(const uint16_t* scales, const uint16_t* zeros, int64_t ng,
                        const UniformParams& p) {
  std::vector<Grid> out(static_cast<size_t>(ng));
  for (int64_t i = 0; i < ng; ++i) {
    out[size_t(i)].scale = kvk::f16_to_f32(scales[i]);
    out[size_t(i)].zero = p.symmetric ? 0.0f : kvk::f16_to_f32(zeros[i]);
  }
  return out;
}

void check_uniform_call(const char* what, int64_t n, const UniformParams& p, const void* scales,
                        const void* zeros) {
  check_params(p);
  check_count(what, n);
  if (n > 0 && !scales) throw Error(Exit::usage, str(what, ": no scale buffer"));
  if (n > 0 && !p.symmetric && !zeros)
    throw Error(Exit::usage, str(what, ": asymmetric quantization needs a zero-point buffer"));
}

}  // namespace

// ---- q8_0 / q4_0 -----------------------------------------------------------------------------

size_t q8_0_bytes(int64_t n) {
  check_blocks("q8_0", n);
  return size_t(n / QK) * 34;
}

size_t q4_0_bytes(int64_t n) {
  check_blocks("q4_0", n);
  return size_t(n / QK) * 18;
}

void encode_q8_0(const float* x, int64_t n, uint8_t* out) {
  encode_blocks("q8_0", x, n, out, 34, encode_q8_0_block);
}

void encode_q4_0(const float* x, int64_t n, uint8_t* out) {
  encode_blocks("q4_0", x, n, out, 18, encode_q4_0_block);
}

void decode_q8_0(const uint8_t* in, int64_t n, float* out) {
  check_blocks("q8_0", n);
  const int64_t nb = n / QK;
#pragma omp parallel for schedule(static) if (n >= parallel_min)
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = in + b * 34;
    const float d = kvk::f16_to_f32(load_u16(blk));
    for (int64_t j = 0; j < QK; ++j) out[b * QK + j] = float(int8_t(blk[2 + j])) * d;
  }
}

void decode_q4_0(const uint8_t* in, int64_t n, float* out) {
  check_blocks("q4_0", n);
  const int64_t nb = n / QK;
#pragma omp parallel for schedule(static) if (n >= parallel_min)
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = in + b * 18;
    const float d = kvk::f16_to_f32(load_u16(blk));
    float* y = out + b * QK;
    for (int64_t j = 0; j < QK / 2; ++j) {
      y[j] = float((blk[2 + j] & 15) - 8) * d;
      y[j + QK / 2] = float((blk[2 + j] >> 4) - 8) * d;
    }
  }
}

// ---- uniform -----------------------------------------------------------------------------------

void check_params(const UniformParams& p) {
  if (p.bits != 2 && p.bits != 3 && p.bits != 4 && p.bits != 8)
    throw Error(Exit::usage, str("uniform quantization: ", p.bits, " bits (use 2, 3, 4 or 8)"));
  if (p.group < 1)
    throw Error(Exit::usage,
                str("uniform quantization: group of ", p.group, " values (need >= 1)"));
}

size_t uniform_code_bytes(int64_t n, int bits) {
  check_params(UniformParams{bits, 1, false});
  check_count("uniform quantization", n);
  return size_t((n * bits + 7) / 8);
}

int64_t uniform_groups(int64_t n, int group) {
  check_params(UniformParams{2, group, false});
  check_count("uniform quantization", n);
  return (n + group - 1) / group;
}

void encode_uniform(const float* x, int64_t n, const UniformParams& p, uint8_t* codes,
                    uint16_t* scales, uint16_t* zeros) {
  const char* what = "uniform quantization";
  check_uniform_call(what, n, p, scales, zeros);
  const int64_t G = p.group, ng = uniform_groups(n, p.group);
  [[maybe_unused]] const bool parallel = n >= parallel_min;

  // Pass 1: each group's scale and zero.
  std::vector<Grid> grid(static_cast<size_t>(ng));
  bool bad = false;
#pragma omp parallel for schedule(static) reduction(|| : bad) if (parallel)
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t len = std::min(G, n - g * G);
    if (group_params(x + g * G, len, p, scales + g, p.symmetric ? nullptr : zeros + g,
                     &grid[size_t(g)]) != GroupStatus::ok)
      bad = true;
  }
  if (bad) {
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t len = std::min(G, n - g * G);
      uint16_t s, z;
      const GroupStatus st = group_params(x + g * G, len, p, &s, &z, nullptr);
      if (st == GroupStatus::nonfinite) throw_nonfinite(what, x, n);
      if (st == GroupStatus::range)
        throw Error(Exit::data, str(what, ": group ", g, " (values ", g * G, "..", g * G + len - 1,
                                    ") spans a range an f16 scale and zero cannot hold"));
    }
  }

  // Pass 2: the codes, 8 at a time. 8 codes of b bits are exactly b bytes, so no two chunks
  // share a byte and the chunks can be written in parallel.
  const int b = p.bits, L = levels(p);
  const int64_t chunks = (n + 7) / 8, total = int64_t(uniform_code_bytes(n, b));
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    uint64_t acc = 0;
    for (int64_t k = 0; k < 8 && c * 8 + k < n; ++k) {
      const int64_t i = c * 8 + k;
      acc |= uint64_t(uniform_code(x[i], grid[size_t(i / G)], p, L)) << (k * b);
    }
    const int64_t first = c * b, count = std::min<int64_t>(b, total - first);
    for (int64_t j = 0; j < count; ++j) codes[first + j] = uint8_t(acc >> (8 * j));
  }
}

void decode_uniform(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros, int64_t n,
                    const UniformParams& p, float* out) {
  check_uniform_call("uniform dequantization", n, p, scales, zeros);
  const int64_t G = p.group, ng = uniform_groups(n, p.group);
  const std::vector<Grid> grid = grids(scales, zeros, ng, p);
  const int b = p.bits;
  const uint32_t mask = (uint32_t(1) << b) - 1;
  const int64_t chunks = (n + 7) / 8, total = int64_t(uniform_code_bytes(n, b));
#pragma omp parallel for schedule(static) if (n >= parallel_min)
  for (int64_t c = 0; c < chunks; ++c) {
    uint64_t acc = 0;
    const int64_t first = c * b, count = std::min<int64_t>(b, total - first);
    for (int64_t j = 0; j < count; ++j) acc |= uint64_t(codes[first + j]) << (8 * j);
    for (int64_t k = 0; k < 8 && c * 8 + k < n; ++k) {
      const int64_t i = c * 8 + k;
      out[i] = uniform_value(uint32_t(acc >> (k * b)) & mask, grid[size_t(i / G)], p);
    }
  }
}

// ---- evaluation --------------------------------------------------------------------------------

double relative_error(const float* a, const float* ref, int64_t n) {
  check_count("relative error", n);
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  if (den == 0) return num == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(num / den);
}

}  // namespace kv::quant
