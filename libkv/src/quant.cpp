#include "kv/quant.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
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

// roundf(v) (ties away from zero) in a form that vectorizes: v - trunc(v) is exact.
inline float round_half_away(float v) {
  const float t = std::trunc(v);
  return t + (std::fabs(v - t) >= 0.5f ? std::copysign(1.0f, v) : 0.0f);
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void
encode_q8_0_block(const float* x, uint8_t* out) {
  float amax = 0.0f;
  for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(out, kvk::f32_to_f16(d));
  for (int64_t j = 0; j < QK; ++j) {
    const float v = x[j] * id;
    // |v| <= 127 whenever id is finite; id overflows to Inf only for d below 2^-128, and then
    // x86 ggml (an out-of-range float-to-int conversion) and gguf-py both give 0.
    const int q = std::fabs(v) <= 127.5f ? int(round_half_away(v)) : 0;
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
// the value and hold for +Inf. Non-negative f16 bit patterns are ordered like their values, so
// a walk from the f16 nearest a close estimate finds it in a step or two.
template <class Covers>
uint16_t smallest_f16(float estimate, Covers covers) {
  uint32_t h = !(estimate > 0.0f) ? 0 : std::min<uint32_t>(kvk::f32_to_f16(estimate), 0x7c00);
  while (h < 0x7c00 && !covers(kvk::f16_to_f32(uint16_t(h)))) ++h;
  while (h > 0 && covers(kvk::f16_to_f32(uint16_t(h - 1)))) --h;
  return uint16_t(h);
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

// Chooses one group's stored scale (and zero) per the rules in quant.h.
// One pass for the extremes and the finiteness check; false if x holds NaN/Inf (then mn and mx
// are unspecified). Integer maxima of the magnitudes' bits find non-finite values without
// branches, so the loop vectorizes.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) bool extremes(
    const float* x, int64_t len, float& mn, float& mx) {
  float lo = x[0], hi = x[0];
  uint32_t top = 0;
  for (int64_t i = 0; i < len; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    top = std::max(top, u & 0x7fffffffu);
  }
  mn = lo;
  mx = hi;
  return top < 0x7f800000u;
}

GroupStatus group_params(const float* x, int64_t len, const UniformParams& p, uint16_t* scale,
                         uint16_t* zero, Grid* grid) {
  float mn, mx;
  if (!extremes(x, len, mn, mx)) return GroupStatus::nonfinite;
  const int L = levels(p);
  Grid g;
  uint16_t s = 0;
  if (p.symmetric) {
    const float amax = std::max(-mn, mx);
    // Q * S is exact in f32, so the top level is exactly Q * S.
    if (amax > 0.0f)
      s = smallest_f16(amax / float(L), [&](float S) { return float(L) * S >= amax; });
    g.lo = -amax;
    g.hi = amax;
  } else {
    const uint16_t z = kvk::f32_to_f16(mn);
    if (!f16_finite(z)) return GroupStatus::range;
    g.zero = kvk::f16_to_f32(z);
    // The smallest S whose top level, as the decoder computes it, reaches the max. Being the
    // smallest is what makes requantization stable: the decoded max is that top level, and no
    // smaller S reaches it either. A constant group keeps S = 0 even when f16(m) < m: its values
    // are all the min, pinned to Z, so a scale would be stored for nothing.
    if (mn < mx && g.zero < mx)
      s = smallest_f16((mx - g.zero) / float(L),
                       [&](float S) { return float(L) * S + g.zero >= mx; });
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

// Codes of one group on its grid: the nearest level, ties away from zero, found exactly: a first
// guess from a double multiply, then corrected against the exact midpoints (t -+ 0.5) * S
// (products of at most 21 significant bits, exact in double). d = x - Z is taken in double as
// well, exact unless x and Z differ in exponent by more than 29. The group's extremes are pinned
// to the end levels (min -> 0, max -> L; symmetric: +-max|x| -> +-Q): then the decoded group has
// the stored zero as its min and the top level as its max, and encoding it again chooses the
// same S and Z and the same codes. Written branch-free so that it vectorizes.
template <bool Symmetric>
inline void group_codes_on(const float* x, int64_t len, double S, double Z, double top, float lo,
                           float hi, int offset, uint8_t* q) {
  const double inv = 1.0 / S;
  for (int64_t i = 0; i < len; ++i) {
    const double d = double(x[i]) - Z;
    const double a = Symmetric ? std::fabs(d) : d;
    // Bitwise & and | keep the loop free of branches (short-circuit operators are branches).
    double t = std::floor(a * inv + 0.5);
    t = t < 0.0 ? 0.0 : t;
    t = t > top ? top : t;
    t -= double((t > 0.0) & (a < (t - 0.5) * S));
    t += double((t < top) & (a >= (t + 0.5) * S));
    t = ((x[i] == hi) | (Symmetric & (x[i] == lo))) ? top : t;
    if constexpr (Symmetric)
      t = d < 0.0 ? -t : t;
    else
      t = x[i] == lo ? 0.0 : t;
    q[i] = uint8_t(int(t) + offset);
  }
}

// The same codes for few levels (2 to 4 bits): level j + 1 is reached exactly when
// x - Z >= (j + 0.5) S, i.e. x >= T[j] with T[j] the smallest float at or above Z + (j + 0.5) S
// (exact in double). Counting the thresholds a value reaches is a few float compares per
// value, 8 or 16 values per instruction.
template <bool Symmetric>
inline void group_codes_by_thresholds(const float* x, int64_t len, float S, float Z, int L,
                                      float lo, float hi, int offset, uint8_t* q) {
  float T[15];
  for (int j = 0; j < L; ++j) {
    const double t = double(Z) + (j + 0.5) * double(S);
    float f = float(t);
    if (double(f) < t) f = std::nextafter(f, std::numeric_limits<float>::infinity());
    T[j] = f;
  }
  constexpr int64_t kChunk = 64;
  uint8_t count[kChunk];
  for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
    const int64_t n = std::min(kChunk, len - i0);
    const float* v = x + i0;
    for (int64_t i = 0; i < n; ++i) count[i] = 0;
    for (int j = 0; j < L; ++j) {
      const float t = T[j];
      for (int64_t i = 0; i < n; ++i)
        count[i] += uint8_t((Symmetric ? std::fabs(v[i]) : v[i]) >= t);
    }
    for (int64_t i = 0; i < n; ++i) {
      int c = (v[i] == hi) | (Symmetric & (v[i] == lo)) ? L : count[i];
      if constexpr (Symmetric)
        c = v[i] < 0.0f ? -c : c;
      else
        c = v[i] == lo ? 0 : c;
      q[i0 + i] = uint8_t(c + offset);
    }
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void group_codes(
    const float* x, int64_t len, float scale, float zero, float lo, float hi, bool symmetric, int L,
    uint8_t* q) {
  if (scale == 0.0f) {
    std::fill(q, q + len, uint8_t(symmetric ? L + 1 : 0));
    return;
  }
  // Symmetric codes are q + 2^(bits-1) = q + L + 1.
  if (L <= 15) {
    if (symmetric)
      group_codes_by_thresholds<true>(x, len, scale, 0.0f, L, lo, hi, L + 1, q);
    else
      group_codes_by_thresholds<false>(x, len, scale, zero, L, lo, hi, 0, q);
  } else if (symmetric) {
    group_codes_on<true>(x, len, scale, 0.0, L, lo, hi, L + 1, q);
  } else {
    group_codes_on<false>(x, len, scale, zero, L, lo, hi, 0, q);
  }
}

void check_uniform_call(const char* what, int64_t n, const UniformParams& p, const void* scales,
                        const void* zeros) {
  check_params(p);
  check_count(what, n);
  if (n > 0 && !scales) throw Error(Exit::usage, str(what, ": no scale buffer"));
  if (n > 0 && !p.symmetric && !zeros)
    throw Error(Exit::usage, str(what, ": asymmetric quantization needs a zero-point buffer"));
}

// Blocks or groups per call of a vector kernel: one per lane.
constexpr int64_t kBatch = 16;

// Runs body(i) for i < count, on OpenMP threads when `parallel` (an `if` clause would still open
// a one-thread parallel region, which costs as much as a small tile's work); true if every call
// returned true.
template <class Body>
bool all_batches(int64_t count, bool parallel, Body body) {
  bool ok = true;
  if (!parallel) {
    for (int64_t i = 0; i < count; ++i) ok = body(i) && ok;
    return ok;
  }
#pragma omp parallel for schedule(static) reduction(&& : ok)
  for (int64_t i = 0; i < count; ++i) ok = body(i) && ok;
  return ok;
}

// ---- vector kernels ----------------------------------------------------------------------------
// Written in GCC's vector extension, 16 lanes of 32 bits (one zmm register), compiled for
// AVX-512 (F, BW, DQ, VL) and called through plain-pointer wrappers, so no vector crosses a call.
// (An AVX2 build of the same code is not offered: GCC 12 lowers each 64-byte select that AVX2
// lacks one lane at a time, slower than the scalar path.) The kernels do the scalar code's
// float operations in the same order, so the results are its results:
//  - q8_0/q4_0: one lane per value; per batch of 16 blocks the scales are computed in lanes.
//  - uniform groups: 16 groups per batch, their extremes, f16 zero and f16 scale computed in
//    lanes (the scale by a 15-step bitwise search for the smallest f16 that reaches the max,
//    which is what smallest_f16's walk finds), then codes by counting the same exact float
//    thresholds as group_codes_by_thresholds, packed in registers. Groups along a row
//    ("rows": group_stride apart, values contiguous) are coded one group per vector; groups
//    down the channels ("columns": 16 adjacent groups, values value_stride apart) one group
//    per lane, so keys need no transposition.
// A batch holding NaN/Inf, or a group f16 cannot describe, is left to the scalar path, which
// throws its usual error.

// The kernels, as plain functions (no vectors in their signatures).
struct Kernels {
  bool (*encode_q8_0)(const float* x, int64_t blocks, uint8_t* out);  // <= 16 blocks
  bool (*encode_q4_0)(const float* x, int64_t blocks, uint8_t* out);
  void (*decode_q8_0)(const uint8_t* in, int64_t blocks, float* out);
  void (*decode_q4_0)(const uint8_t* in, int64_t blocks, float* out);
  bool (*quantize_rows)(const float* x, int64_t groups, int64_t stride, int bits, bool symmetric,
                        uint16_t* scales, uint16_t* zeros, uint8_t* codes);  // <= 16 groups
  bool (*quantize_columns)(const float* x, int64_t stride, int bits, bool symmetric,
                           uint16_t* scales, uint16_t* zeros, uint8_t* codes);  // 16 groups
  void (*dequantize_rows)(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros,
                          int64_t groups, int64_t stride, int bits, bool symmetric, float* out);
  void (*dequantize_columns)(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros,
                             int64_t stride, int bits, bool symmetric, float* out);
};

// GCC only: the kernels rely on __builtin_assoc_barrier (GCC 12) and on GCC's target pragmas;
// other compilers (clang builds the fuzzers) get the scalar path.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    (defined(__x86_64__) || defined(__i386__))
#define KV_VECTOR_KERNELS 1
#endif

#ifdef KV_VECTOR_KERNELS
// (Up to the end of the file, where GCC instantiates the templates: their vectors never cross a
// call, so the ABI note does not apply.)
#pragma GCC diagnostic ignored "-Wpsabi"

#define KV_INLINE __attribute__((always_inline)) inline
// The whole section: helpers compiled for the default target would be lowered for SSE2 before
// they are inlined.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")

namespace vec {

constexpr int W = int(kBatch);  // lanes: values, blocks or groups per batch
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef int64_t i64x8 __attribute__((vector_size(64)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));

template <class V, class T>
KV_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class T, class V>
KV_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}
template <class To, class From>
KV_INLINE To as(const From& v) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &v, sizeof t);
  return t;
}

KV_INLINE f32x8 low(const f32x16& v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
}
KV_INLINE f32x8 high(const f32x16& v) {
  return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
KV_INLINE u32x8 low(const u32x16& v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
}
KV_INLINE u32x8 high(const u32x16& v) {
  return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
KV_INLINE f32x16 join(const f32x8& a, const f32x8& b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// Horizontal reductions (lane order does not matter: the results are exact, and the sign of a
// zero minimum is settled separately, see first_zero_of).
KV_INLINE float hmin(const f32x16& v) {
  f32x8 a = low(v), b = high(v);
  a = b < a ? b : a;
  f32x4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3),
        d = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  c = d < c ? d : c;
  float r = c[0];
  for (int k = 1; k < 4; ++k) r = c[k] < r ? c[k] : r;
  return r;
}
KV_INLINE float hmax(const f32x16& v) {
  f32x8 a = low(v), b = high(v);
  a = b > a ? b : a;
  f32x4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3),
        d = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  c = d > c ? d : c;
  float r = c[0];
  for (int k = 1; k < 4; ++k) r = c[k] > r ? c[k] : r;
  return r;
}
KV_INLINE uint32_t hmax(const u32x8& v) {
  u32x4 c = __builtin_shufflevector(v, v, 0, 1, 2, 3),
        d = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  c = d > c ? d : c;
  uint32_t r = c[0];
  for (int k = 1; k < 4; ++k) r = c[k] > r ? c[k] : r;
  return r;
}
KV_INLINE uint32_t hmax(const u32x16& v) {
  const u32x8 a = low(v), b = high(v);
  return hmax(b > a ? b : a);
}
KV_INLINE uint32_t hor(const u32x8& v) {
  u32x4 c = __builtin_shufflevector(v, v, 0, 1, 2, 3) | __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return c[0] | c[1] | c[2] | c[3];
}
KV_INLINE uint32_t hor(const u32x16& v) {
  return hor(low(v) | high(v));
}

KV_INLINE u32x16 magnitude_bits(const f32x16& v) {
  return as<u32x16>(v) & 0x7fffffffu;
}
KV_INLINE f32x16 abs(const f32x16& v) {
  return as<f32x16>(magnitude_bits(v));
}
template <class V, class T>
KV_INLINE V splat(T v) {
  return V{} + v;
}
KV_INLINE u32x16 lane_index() {
  return u32x16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}

// kvk::f16_to_f32 on 16 lanes of f16 bits (zeros, subnormals, Inf and NaN included).
KV_INLINE f32x16 f16_to_f32(const u32x16& h) {
  const u32x16 sign = (h & 0x8000u) << 16, mag = h & 0x7fffu, mant = h & 0x3ffu;
  const u32x16 normal = (mag << 13) + (112u << 23);
  const u32x16 special = 0x7f800000u | (mant << 13);
  const f32x16 subnormal = __builtin_convertvector(as<i32x16>(mant), f32x16) * 0x1p-24f;  // exact
  u32x16 bits = mag >= 0x7c00u ? special : normal;
  bits = mag < 0x400u ? as<u32x16>(subnormal) : bits;
  return as<f32x16>(bits | sign);
}

// kvk::f32_to_f16 (nearest, ties to even) on 16 lanes of finite floats.
KV_INLINE u32x16 f32_to_f16(const f32x16& f) {
  const u32x16 u = as<u32x16>(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  // Subnormal results: a * 2^24 < 2^10 is exact, and adding 2^23 rounds it to an integer, ties
  // to even, which the low mantissa bits then hold.
  const u32x16 subnormal = as<u32x16>(as<f32x16>(a) * 0x1p24f + 0x1p23f) - 0x4b000000u;
  const u32x16 normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  u32x16 h = a < 0x38800000u ? subnormal : normal;
  h = a >= 0x477ff000u ? splat<u32x16>(0x7c00u) : h;
  return sign | h;
}

KV_INLINE u32x16 load_f16_bits(const uint16_t* p) {
  return __builtin_convertvector(load<u16x16>(p), u32x16);
}
KV_INLINE void store_f16_bits(uint16_t* p, const u32x16& h, int64_t n) {
  const u16x16 v = __builtin_convertvector(h, u16x16);
  if (n == W)
    store(p, v);
  else
    std::memcpy(p, &v, size_t(n) * 2);
}

// ---- q8_0 / q4_0: up to 16 blocks per call ----

// False if a block holds NaN/Inf (nothing is promised about `out` then).
template <bool Q4>
KV_INLINE bool encode_blocks16(const float* x, int64_t nb, uint8_t* out) {
  constexpr size_t step = Q4 ? 18 : 34;
  alignas(64) float extreme[W] = {};  // q8_0: max|x|; q4_0: the first value of largest magnitude
  for (int64_t b = 0; b < nb; ++b) {
    const f32x16 a0 = load<f32x16>(x + b * QK), a1 = load<f32x16>(x + b * QK + 16);
    const u32x16 m0 = magnitude_bits(a0), m1 = magnitude_bits(a1);
    const uint32_t top = hmax(m1 > m0 ? m1 : m0);  // non-negative floats order like their bits
    if (top >= 0x7f800000u) return false;
    if constexpr (Q4) {
      // ggml keeps the first value of largest magnitude (and +0 for a block of zeros).
      const u32x16 none = splat<u32x16>(99u);
      const u32x16 i0 = m0 == top ? lane_index() : none, i1 = m1 == top ? lane_index() + 16u : none;
      const uint32_t first = ~hmax(~(i1 < i0 ? i1 : i0));
      extreme[b] = top ? x[b * QK + first] : 0.0f;
    } else {
      extreme[b] = as<float>(top);
    }
  }
  const f32x16 d = load<f32x16>(extreme) / (Q4 ? -8.0f : 127.0f);
  alignas(64) float id[W];
  store(id, d != 0.0f ? 1.0f / d : f32x16{});
  alignas(64) uint32_t scale[W];
  store(scale, f32_to_f16(d));
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    uint8_t* ob = out + size_t(b) * step;
    store_u16(ob, uint16_t(scale[b]));
    const f32x16 a0 = load<f32x16>(xb), a1 = load<f32x16>(xb + 16);
    if constexpr (Q4) {
      i32x16 c[2];
      for (int k = 0; k < 2; ++k) {
        // x * id rounded before 8.5 is added, as rounded_product() keeps it.
        const f32x16 t = __builtin_assoc_barrier((k ? a1 : a0) * id[b]) + 8.5f;
        f32x16 clamped = t < 0.0f ? f32x16{} : t;
        clamped = clamped > 15.0f ? splat<f32x16>(15.0f) : clamped;
        const i32x16 q = __builtin_convertvector(clamped, i32x16);
        c[k] = magnitude_bits(t) < 0x7f800000u ? q : i32x16{};
      }
      store(ob + 2, __builtin_convertvector(c[0] | (c[1] << 4), u8x16));
    } else {
      for (int k = 0; k < 2; ++k) {
        const f32x16 v = (k ? a1 : a0) * id[b];
        // roundf: v - trunc(v) is exact; out-of-range v (id overflowed) gives 0, see above.
        const i32x16 t = __builtin_convertvector(v, i32x16);
        const f32x16 frac = abs(v - __builtin_convertvector(t, f32x16));
        const i32x16 away = v < 0.0f ? splat<i32x16>(-1) : splat<i32x16>(1);
        i32x16 q = t + (frac >= 0.5f ? away : i32x16{});
        q = abs(v) <= 127.5f ? q : i32x16{};
        store(ob + 2 + 16 * k, __builtin_convertvector(q, i8x16));
      }
    }
  }
  return true;
}

template <bool Q4>
KV_INLINE void decode_blocks16(const uint8_t* in, int64_t nb, float* out) {
  constexpr size_t step = Q4 ? 18 : 34;
  alignas(64) uint32_t bits[W] = {};
  for (int64_t b = 0; b < nb; ++b) bits[b] = load_u16(in + b * step);
  alignas(64) float d[W];
  store(d, f16_to_f32(load<u32x16>(bits)));
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = in + b * step + 2;
    float* y = out + b * QK;
    if constexpr (Q4) {
      const i32x16 q = __builtin_convertvector(load<u8x16>(blk), i32x16);
      store(y, __builtin_convertvector((q & 15) - 8, f32x16) * d[b]);
      store(y + 16, __builtin_convertvector((q >> 4) - 8, f32x16) * d[b]);
    } else {
      for (int k = 0; k < 2; ++k)
        store(y + 16 * k, __builtin_convertvector(
                              __builtin_convertvector(load<i8x16>(blk + 16 * k), i32x16), f32x16) *
                              d[b]);
    }
  }
}

// ---- uniform groups of 32, 16 groups per batch ----

constexpr int64_t kGroup = 32;

// One batch's grids, lane l for group l: group_params' S and Z (bits and values), the pinned
// extremes, and group_codes_by_thresholds' thresholds T[j] (the smallest float at or above
// Z + (j + 0.5) S).
// Levels of a group: above the zero (asymmetric) or on each side of 0 (symmetric).
template <int bits, bool Symmetric>
constexpr int kLevels = Symmetric ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;

template <int L>
struct Grids {
  f32x16 scale, zero, lo, hi;
  u32x16 scale_bits, zero_bits;
  f32x16 threshold[L];
};

// group_params for 16 groups with extremes mn, mx; false if one cannot be stored (range).
template <int L, bool Symmetric>
KV_INLINE bool make_grids(const f32x16& mn, const f32x16& mx, Grids<L>& g) {
  // (Comparisons only ever feed a ?: here: GCC lowers those for AVX2 two halves at a time, but
  // scalarizes a comparison used as a value.)
  const u32x16 one = splat<u32x16>(1u);
  f32x16 top, zero;
  u32x16 bad = {};
  if constexpr (Symmetric) {
    const f32x16 neg = -mn;
    top = neg < mx ? mx : neg;  // std::max(-mn, mx)
    zero = f32x16{};
    g.zero_bits = u32x16{};
    g.lo = -top;
    g.hi = top;
  } else {
    g.zero_bits = f32_to_f16(mn);
    bad = (g.zero_bits & 0x7c00u) == 0x7c00u ? one : bad;
    zero = f16_to_f32(g.zero_bits);
    top = mx;
    g.lo = mn;
    g.hi = mx;
  }
  // The smallest f16 S with L * S + Z >= top is one above the largest that falls short, which
  // a bitwise search finds in 15 steps (non-negative f16 bits order like their values, and
  // L * S is exact, so the test is monotone and is the scalar code's). Candidates from 0x7c00
  // up are Inf and NaN, whose levels never fall short.
  u32x16 short_of = {};
  for (uint32_t bit = 1u << 14; bit; bit >>= 1) {
    const u32x16 candidate = short_of | bit;
    const f32x16 level = float(L) * f16_to_f32(candidate) + zero;
    short_of = level < top ? candidate : short_of;
  }
  // A scale is needed when the top level must rise above Z (max > min and Z < max), or, for
  // symmetric groups, when max|x| > 0.
  g.scale_bits = short_of + 1u;
  if constexpr (Symmetric) {
    g.scale_bits = top > 0.0f ? g.scale_bits : u32x16{};
  } else {
    g.scale_bits = mn < mx ? g.scale_bits : u32x16{};
    g.scale_bits = zero < mx ? g.scale_bits : u32x16{};
  }
  bad = g.scale_bits == 0x7c00u ? one : bad;
  g.scale = f16_to_f32(g.scale_bits);
  g.zero = zero;
  // Thresholds in double (exact: at most 41 significant bits), rounded up to a float.
  const f64x8 S[2] = {__builtin_convertvector(low(g.scale), f64x8),
                      __builtin_convertvector(high(g.scale), f64x8)};
  const f64x8 Z[2] = {__builtin_convertvector(low(zero), f64x8),
                      __builtin_convertvector(high(zero), f64x8)};
  for (int j = 0; j < L; ++j) {
    f32x8 half[2];
    for (int k = 0; k < 2; ++k) {
      const f64x8 t = Z[k] + (j + 0.5) * S[k];
      const f32x8 f = __builtin_convertvector(t, f32x8);
      // nextafter(f, +Inf) where f < t: one more ulp away from 0 if f >= +0, one less if f < 0.
      // f < t exactly when t - f (exact) is above +0, i.e. its bits as an integer are positive.
      const i64x8 residual = as<i64x8>(t - __builtin_convertvector(f, f64x8));
      const i32x8 below = __builtin_convertvector(as<u64x8>(-residual) >> 63, i32x8);  // 0 or 1
      const i32x8 b = as<i32x8>(f);
      half[k] = as<f32x8>(b + below * (1 - 2 * as<i32x8>(as<u32x8>(b) >> 31)));
    }
    g.threshold[j] = join(half[0], half[1]);
  }
  return !hor(as<u32x16>(bad));
}

// Codes of 16 values v: the thresholds reached, pinned at the extremes; `flat` marks S = 0.
// Threshold, Lo, Hi, Flat are vectors (one group per lane) or scalars (one group per vector).
template <int L, bool Symmetric, class Threshold, class Bound>
KV_INLINE u32x16 codes16(const f32x16& v, const Threshold* T, const Bound& lo, const Bound& hi,
                         const Bound& scale) {
  const f32x16 a = Symmetric ? abs(v) : v;
  const i32x16 one = splat<i32x16>(1), top = splat<i32x16>(L);
  i32x16 c = {};
  for (int j = 0; j < L; ++j) c += a >= T[j] ? one : i32x16{};
  c = v == hi ? top : c;
  if constexpr (Symmetric) {
    c = v == lo ? top : c;
    c = v < 0.0f ? -c : c;
    c = scale == 0.0f ? i32x16{} : c;
    c += L + 1;
  } else {
    c = v == lo ? i32x16{} : c;
    c = scale == 0.0f ? i32x16{} : c;
  }
  return as<u32x16>(c);
}

// The sign of a zero minimum: the scalar loop keeps the first value equal to the minimum.
template <class At>
KV_INLINE float first_zero_of(At at) {
  for (int64_t i = 0;; ++i)
    if (at(i) == 0.0f) return at(i);
}

// 16 groups of 32 values down adjacent columns: group l's value i at x[i * stride + l].
template <int bits, bool Symmetric>
KV_INLINE bool quantize_columns16(const float* x, int64_t stride, uint16_t* scales, uint16_t* zeros,
                                  uint8_t* codes) {
  constexpr int L = kLevels<bits, Symmetric>;
  f32x16 mn = load<f32x16>(x), mx = mn;
  u32x16 top = {};
  for (int64_t i = 0; i < kGroup; ++i) {
    const f32x16 v = load<f32x16>(x + i * stride);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    const u32x16 m = magnitude_bits(v);
    top = m > top ? m : top;
  }
  if (hmax(top) >= 0x7f800000u) return false;
  if (hor(mn == 0.0f ? splat<u32x16>(1u) : u32x16{}))
    for (int l = 0; l < W; ++l)
      if (mn[l] == 0.0f) mn[l] = first_zero_of([&](int64_t i) { return x[i * stride + l]; });
  Grids<L> g;
  if (!make_grids<L, Symmetric>(mn, mx, g)) return false;
  store_f16_bits(scales, g.scale_bits, W);
  if (!Symmetric) store_f16_bits(zeros, g.zero_bits, W);
  constexpr int per_word = 32 / bits;
  u32x16 words[bits] = {};
  for (int64_t i = 0; i < kGroup; ++i) {
    const u32x16 c =
        codes16<L, Symmetric>(load<f32x16>(x + i * stride), g.threshold, g.lo, g.hi, g.scale);
    words[i / per_word] |= c << (bits * (i % per_word));
  }
  // Group l's codes are `bits` little-endian words, lane l of each.
  alignas(64) uint32_t w[bits][W];
  for (int k = 0; k < bits; ++k) store(w[k], words[k]);
  for (int l = 0; l < W; ++l)
    for (int k = 0; k < bits; ++k) std::memcpy(codes + (l * bits + k) * 4, &w[k][l], 4);
  return true;
}

// Up to 16 groups of 32 contiguous values, group g at x + g * stride.
template <int bits, bool Symmetric>
KV_INLINE bool quantize_rows16(const float* x, int64_t n, int64_t stride, uint16_t* scales,
                               uint16_t* zeros, uint8_t* codes) {
  constexpr int L = kLevels<bits, Symmetric>;
  alignas(64) float mn[W] = {}, mx[W] = {};
  for (int64_t l = 0; l < n; ++l) {
    const float* xg = x + l * stride;
    const f32x16 a0 = load<f32x16>(xg), a1 = load<f32x16>(xg + 16);
    const u32x16 m0 = magnitude_bits(a0), m1 = magnitude_bits(a1);
    if (hmax(m1 > m0 ? m1 : m0) >= 0x7f800000u) return false;
    mn[l] = hmin(a1 < a0 ? a1 : a0);
    mx[l] = hmax(a1 > a0 ? a1 : a0);
    if (mn[l] == 0.0f) mn[l] = first_zero_of([&](int64_t i) { return xg[i]; });
  }
  Grids<L> g;
  if (!make_grids<L, Symmetric>(load<f32x16>(mn), load<f32x16>(mx), g)) return false;
  store_f16_bits(scales, g.scale_bits, n);
  if (!Symmetric) store_f16_bits(zeros, g.zero_bits, n);
  alignas(64) float T[L][W], lo[W], hi[W], scale[W];
  for (int j = 0; j < L; ++j) store(T[j], g.threshold[j]);
  store(lo, g.lo);
  store(hi, g.hi);
  store(scale, g.scale);
  // Code i of a group sits at bit bits * i of its words: lane shifts within each word.
  const u32x16 shift = bits * (lane_index() % (32 / bits));
  for (int64_t l = 0; l < n; ++l) {
    const float* xg = x + l * stride;
    float t[L];
    for (int j = 0; j < L; ++j) t[j] = T[j][l];
    u32x16 c[2];
    for (int k = 0; k < 2; ++k)
      c[k] = codes16<L, Symmetric>(load<f32x16>(xg + 16 * k), t, lo[l], hi[l], scale[l]) << shift;
    uint32_t w[bits];
    if constexpr (bits == 2) {
      w[0] = hor(c[0]);
      w[1] = hor(c[1]);
    } else {
      w[0] = hor(low(c[0]));
      w[1] = hor(high(c[0]));
      w[2] = hor(low(c[1]));
      w[3] = hor(high(c[1]));
    }
    std::memcpy(codes + l * bits * 4, w, sizeof w);
  }
  return true;
}

// Decoded values of 16 codes: q * S + Z (Z when S = 0), or (q - 2^(bits-1)) * S.
template <bool Symmetric, int bits, class Value>
KV_INLINE f32x16 dequantize16(const u32x16& q, const Value& scale, const Value& zero) {
  if constexpr (Symmetric) {
    return __builtin_convertvector(as<i32x16>(q) - (1 << (bits - 1)), f32x16) * scale;
  } else {
    const f32x16 v = __builtin_convertvector(as<i32x16>(q), f32x16) * scale + zero;
    return scale == 0.0f ? f32x16{} + zero : v;
  }
}

template <int bits, bool Symmetric>
KV_INLINE void dequantize_columns16(const uint8_t* codes, const uint16_t* scales,
                                    const uint16_t* zeros, int64_t stride, float* out) {
  const f32x16 S = f16_to_f32(load_f16_bits(scales));
  const f32x16 Z = Symmetric ? f32x16{} : f16_to_f32(load_f16_bits(zeros));
  alignas(64) uint32_t w[bits][W];
  for (int l = 0; l < W; ++l)
    for (int k = 0; k < bits; ++k) std::memcpy(&w[k][l], codes + (l * bits + k) * 4, 4);
  u32x16 words[bits];
  for (int k = 0; k < bits; ++k) words[k] = load<u32x16>(w[k]);
  constexpr int per_word = 32 / bits;
  for (int64_t i = 0; i < kGroup; ++i) {
    const u32x16 q = (words[i / per_word] >> (bits * (i % per_word))) & ((1u << bits) - 1);
    store(out + i * stride, dequantize16<Symmetric, bits>(q, S, Z));
  }
}

template <int bits, bool Symmetric>
KV_INLINE void dequantize_rows16(const uint8_t* codes, const uint16_t* scales,
                                 const uint16_t* zeros, int64_t n, int64_t stride, float* out) {
  alignas(64) uint16_t sb[W] = {}, zb[W] = {};
  std::memcpy(sb, scales, size_t(n) * 2);
  if (!Symmetric) std::memcpy(zb, zeros, size_t(n) * 2);
  alignas(64) float S[W], Z[W];
  store(S, f16_to_f32(load_f16_bits(sb)));
  store(Z, f16_to_f32(load_f16_bits(zb)));
  const u32x16 shift = bits * (lane_index() % (32 / bits));
  for (int64_t l = 0; l < n; ++l) {
    uint32_t w[bits];
    std::memcpy(w, codes + l * bits * 4, sizeof w);
    for (int k = 0; k < 2; ++k) {
      u32x16 word;
      if constexpr (bits == 2)
        word = splat<u32x16>(w[k]);
      else
        word = lane_index() < 8u ? splat<u32x16>(w[2 * k]) : splat<u32x16>(w[2 * k + 1]);
      const u32x16 q = (word >> shift) & ((1u << bits) - 1);
      store(out + l * stride + 16 * k, dequantize16<Symmetric, bits>(q, S[l], Z[l]));
    }
  }
}

}  // namespace vec

// Calls the kernel template for the bit width (2 or 4) and symmetry.
#define KV_BY_WIDTH(kernel, bits, symmetric, args)                            \
  ((bits) == 2 ? ((symmetric) ? kernel<2, true> args : kernel<2, false> args) \
               : ((symmetric) ? kernel<4, true> args : kernel<4, false> args))

namespace avx512 {
bool encode_q8_0(const float* x, int64_t nb, uint8_t* out) {
  return vec::encode_blocks16<false>(x, nb, out);
}
bool encode_q4_0(const float* x, int64_t nb, uint8_t* out) {
  return vec::encode_blocks16<true>(x, nb, out);
}
void decode_q8_0(const uint8_t* in, int64_t nb, float* out) {
  vec::decode_blocks16<false>(in, nb, out);
}
void decode_q4_0(const uint8_t* in, int64_t nb, float* out) {
  vec::decode_blocks16<true>(in, nb, out);
}
bool quantize_rows(const float* x, int64_t n, int64_t stride, int bits, bool sym, uint16_t* s,
                   uint16_t* z, uint8_t* c) {
  return KV_BY_WIDTH(vec::quantize_rows16, bits, sym, (x, n, stride, s, z, c));
}
bool quantize_columns(const float* x, int64_t stride, int bits, bool sym, uint16_t* s, uint16_t* z,
                      uint8_t* c) {
  return KV_BY_WIDTH(vec::quantize_columns16, bits, sym, (x, stride, s, z, c));
}
void dequantize_rows(const uint8_t* c, const uint16_t* s, const uint16_t* z, int64_t n,
                     int64_t stride, int bits, bool sym, float* out) {
  KV_BY_WIDTH(vec::dequantize_rows16, bits, sym, (c, s, z, n, stride, out));
}
void dequantize_columns(const uint8_t* c, const uint16_t* s, const uint16_t* z, int64_t stride,
                        int bits, bool sym, float* out) {
  KV_BY_WIDTH(vec::dequantize_columns16, bits, sym, (c, s, z, stride, out));
}
const Kernels kernels{encode_q8_0,   encode_q4_0,      decode_q8_0,     decode_q4_0,
                      quantize_rows, quantize_columns, dequantize_rows, dequantize_columns};
}  // namespace avx512

#pragma GCC pop_options
#endif  // KV_VECTOR_KERNELS

Simd detect_simd() {
#ifdef KV_VECTOR_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return Simd::avx512;
#endif
  return Simd::scalar;
}

std::atomic<Simd> simd_in_use{simd_supported()};

// The kernels of the level in use, or null for the scalar path.
const Kernels* vector_kernels() {
#ifdef KV_VECTOR_KERNELS
  switch (simd_in_use.load(std::memory_order_relaxed)) {
    case Simd::avx512:
      return &avx512::kernels;
    case Simd::scalar:
      break;
  }
#endif
  return nullptr;
}

void encode_block_batches(const char* what, const float* x, int64_t n, uint8_t* out,
                          size_t block_bytes, bool (*kernel)(const float*, int64_t, uint8_t*)) {
  check_blocks(what, n);
  const int64_t nb = n / QK;
  const bool ok = all_batches((nb + kBatch - 1) / kBatch, n >= parallel_min, [&](int64_t i) {
    const int64_t b = i * kBatch;
    return kernel(x + b * QK, std::min(kBatch, nb - b), out + size_t(b) * block_bytes);
  });
  if (!ok) throw_nonfinite(what, x, n);
}

void decode_block_batches(const uint8_t* in, int64_t n, float* out, size_t block_bytes,
                          void (*kernel)(const uint8_t*, int64_t, float*)) {
  const int64_t nb = n / QK;
  all_batches((nb + kBatch - 1) / kBatch, n >= parallel_min, [&](int64_t i) {
    const int64_t b = i * kBatch;
    kernel(in + size_t(b) * block_bytes, std::min(kBatch, nb - b), out + b * QK);
    return true;
  });
}

// Whether quantize_groups/dequantize_groups have a vector kernel for these groups.
bool vector_groups(const UniformParams& p) {
  return p.group == 32 && (p.bits == 2 || p.bits == 4);
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
  if (const Kernels* k = vector_kernels())
    return encode_block_batches("q8_0", x, n, out, 34, k->encode_q8_0);
  encode_blocks("q8_0", x, n, out, 34, encode_q8_0_block);
}

void encode_q4_0(const float* x, int64_t n, uint8_t* out) {
  if (const Kernels* k = vector_kernels())
    return encode_block_batches("q4_0", x, n, out, 18, k->encode_q4_0);
  encode_blocks("q4_0", x, n, out, 18, encode_q4_0_block);
}

void decode_q8_0(const uint8_t* in, int64_t n, float* out) {
  check_blocks("q8_0", n);
  if (const Kernels* k = vector_kernels())
    return decode_block_batches(in, n, out, 34, k->decode_q8_0);
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
  if (const Kernels* k = vector_kernels())
    return decode_block_batches(in, n, out, 18, k->decode_q4_0);
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

// Eight codes of b bits are exactly b bytes: the unit both loops work in. 2, 4 and 8 bits, whose
// codes never straddle a byte, get byte-wise loops that vectorize.
void pack_codes(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  const int64_t total = int64_t(uniform_code_bytes(n, bits));
  if (bits == 8) {
    std::copy(codes, codes + n, out);
    return;
  }
  if ((bits == 4 || bits == 2) && n % (8 / bits) == 0) {
    const int per_byte = 8 / bits;
    for (int64_t i = 0; i < total; ++i) {
      uint32_t byte = 0;
      for (int k = 0; k < per_byte; ++k) byte |= uint32_t(codes[i * per_byte + k]) << (k * bits);
      out[i] = uint8_t(byte);
    }
    return;
  }
  for (int64_t c = 0; c < (n + 7) / 8; ++c) {
    uint64_t acc = 0;
    for (int64_t k = 0; k < 8 && c * 8 + k < n; ++k)
      acc |= uint64_t(codes[c * 8 + k]) << (k * bits);
    const int64_t first = c * bits, count = std::min<int64_t>(bits, total - first);
    for (int64_t j = 0; j < count; ++j) out[first + j] = uint8_t(acc >> (8 * j));
  }
}

void unpack_codes(const uint8_t* in, int64_t n, int bits, uint8_t* codes) {
  const int64_t total = int64_t(uniform_code_bytes(n, bits));
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  if (bits == 8) {
    std::copy(in, in + n, codes);
    return;
  }
  if ((bits == 4 || bits == 2) && n % (8 / bits) == 0) {
    const int per_byte = 8 / bits;
    for (int64_t i = 0; i < total; ++i)
      for (int k = 0; k < per_byte; ++k)
        codes[i * per_byte + k] = uint8_t((in[i] >> (k * bits)) & mask);
    return;
  }
  for (int64_t c = 0; c < (n + 7) / 8; ++c) {
    uint64_t acc = 0;
    const int64_t first = c * bits, count = std::min<int64_t>(bits, total - first);
    for (int64_t j = 0; j < count; ++j) acc |= uint64_t(in[first + j]) << (8 * j);
    for (int64_t k = 0; k < 8 && c * 8 + k < n; ++k)
      codes[c * 8 + k] = uint8_t((acc >> (k * bits)) & mask);
  }
}

int64_t uniform_groups(int64_t n, int group) {
  check_params(UniformParams{2, group, false});
  check_count("uniform quantization", n);
  return (n + group - 1) / group;
}

void quantize_group(const float* x, int64_t len, const UniformParams& p, uint16_t* scale,
                    uint16_t* zero, uint8_t* codes) {
  const char* what = "uniform quantization";
  check_uniform_call(what, len, p, scale, zero);
  if (len == 0) return;
  Grid g;
  const GroupStatus st = group_params(x, len, p, scale, p.symmetric ? nullptr : zero, &g);
  if (st == GroupStatus::nonfinite) throw_nonfinite(what, x, len);
  if (st == GroupStatus::range)
    throw Error(Exit::data, str(what, ": a group spans a range an f16 scale and zero cannot hold"));
  group_codes(x, len, g.scale, g.zero, g.lo, g.hi, p.symmetric, levels(p), codes);
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void dequantize_group(
    const uint8_t* codes, int64_t len, const UniformParams& p, uint16_t scale, uint16_t zero,
    float* out) {
  const float S = kvk::f16_to_f32(scale);
  if (p.symmetric) {
    const int offset = 1 << (p.bits - 1);
    for (int64_t i = 0; i < len; ++i) out[i] = float(int(codes[i]) - offset) * S;
    return;
  }
  // q * S is exact in f32 (at most 8 + 11 significant bits), so the one rounding is the
  // addition, fused or not: the same value as the encoder's top level.
  const float Z = kvk::f16_to_f32(zero);
  if (S == 0.0f) {
    std::fill(out, out + len, Z);
    return;
  }
  for (int64_t i = 0; i < len; ++i) out[i] = float(codes[i]) * S + Z;
}

void quantize_groups(const float* x, int64_t groups, int64_t group_stride, int64_t value_stride,
                     const UniformParams& p, uint16_t* scales, uint16_t* zeros, uint8_t* codes) {
  const char* what = "uniform quantization";
  check_params(p);
  check_count(what, groups);
  check_uniform_call(what, groups * p.group, p, scales, zeros);
  const int64_t len = p.group;
  int64_t g = 0;  // groups before g are done
  if (const Kernels* k = vector_kernels(); k && vector_groups(p)) {
    const int64_t group_bytes = len * p.bits / 8;
    auto at = [&](int64_t g) {
      return std::tuple(scales + g, zeros ? zeros + g : nullptr, codes + g * group_bytes);
    };
    if (value_stride == 1) {
      for (; g < groups; g += kBatch) {
        const auto [s, z, c] = at(g);
        if (!k->quantize_rows(x + g * group_stride, std::min(kBatch, groups - g), group_stride,
                              p.bits, p.symmetric, s, z, c))
          break;
      }
    } else if (group_stride == 1) {
      for (; g + kBatch <= groups; g += kBatch) {
        const auto [s, z, c] = at(g);
        if (!k->quantize_columns(x + g, value_stride, p.bits, p.symmetric, s, z, c)) break;
      }
    }
  }
  if (g >= groups) return;
  // The scalar path for the rest (and for a batch a kernel left: it throws the error there).
  // Groups whose codes fill whole bytes (all the kernels code) start on a byte of `codes`.
  std::vector<uint8_t> q(static_cast<size_t>((groups - g) * len));
  std::vector<float> gathered(value_stride == 1 ? 0 : static_cast<size_t>(len));
  for (int64_t i = g; i < groups; ++i) {
    const float* xg = x + i * group_stride;
    if (value_stride != 1) {
      for (int64_t j = 0; j < len; ++j) gathered[size_t(j)] = xg[j * value_stride];
      xg = gathered.data();
    }
    quantize_group(xg, len, p, scales + i, zeros ? zeros + i : nullptr, q.data() + (i - g) * len);
  }
  pack_codes(q.data(), (groups - g) * len, p.bits, codes + g * len * p.bits / 8);
}

void dequantize_groups(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros,
                       int64_t groups, int64_t group_stride, int64_t value_stride,
                       const UniformParams& p, float* out) {
  check_params(p);
  check_count("uniform dequantization", groups);
  check_uniform_call("uniform dequantization", groups * p.group, p, scales, zeros);
  const int64_t len = p.group;
  int64_t g = 0;
  if (const Kernels* k = vector_kernels(); k && vector_groups(p)) {
    const int64_t group_bytes = len * p.bits / 8;
    const uint16_t* z = zeros;
    if (value_stride == 1) {
      for (; g < groups; g += kBatch)
        k->dequantize_rows(codes + g * group_bytes, scales + g, z ? z + g : nullptr,
                           std::min(kBatch, groups - g), group_stride, p.bits, p.symmetric,
                           out + g * group_stride);
    } else if (group_stride == 1) {
      for (; g + kBatch <= groups; g += kBatch)
        k->dequantize_columns(codes + g * group_bytes, scales + g, z ? z + g : nullptr,
                              value_stride, p.bits, p.symmetric, out + g);
    }
  }
  if (g >= groups) return;
  std::vector<uint8_t> q(static_cast<size_t>((groups - g) * len));
  unpack_codes(codes + g * len * p.bits / 8, (groups - g) * len, p.bits, q.data());
  std::vector<float> values(static_cast<size_t>(len));
  for (int64_t i = g; i < groups; ++i) {
    float* y = value_stride == 1 ? out + i * group_stride : values.data();
    dequantize_group(q.data() + (i - g) * len, len, p, scales[i], zeros ? zeros[i] : 0, y);
    if (value_stride != 1)
      for (int64_t j = 0; j < len; ++j) out[i * group_stride + j * value_stride] = y[j];
  }
}

void encode_uniform(const float* x, int64_t n, const UniformParams& p, uint8_t* codes,
                    uint16_t* scales, uint16_t* zeros) {
  const char* what = "uniform quantization";
  check_uniform_call(what, n, p, scales, zeros);
  const int64_t G = p.group, ng = uniform_groups(n, p.group);
  [[maybe_unused]] const bool parallel = n >= parallel_min;
  // Codes one per byte, then packed: groups can be coded in parallel whatever their bit offset.
  std::vector<uint8_t> q(static_cast<size_t>(n));
  bool bad = false;
#pragma omp parallel for schedule(static) reduction(|| : bad) if (parallel)
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t len = std::min(G, n - g * G);
    Grid grid;
    if (group_params(x + g * G, len, p, scales + g, p.symmetric ? nullptr : zeros + g, &grid) !=
        GroupStatus::ok) {
      bad = true;
      continue;
    }
    group_codes(x + g * G, len, grid.scale, grid.zero, grid.lo, grid.hi, p.symmetric, levels(p),
                q.data() + g * G);
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
  pack_codes(q.data(), n, p.bits, codes);
}

void decode_uniform(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros, int64_t n,
                    const UniformParams& p, float* out) {
  check_uniform_call("uniform dequantization", n, p, scales, zeros);
  const int64_t G = p.group, ng = uniform_groups(n, p.group);
  std::vector<uint8_t> q(static_cast<size_t>(n));
  unpack_codes(codes, n, p.bits, q.data());
#pragma omp parallel for schedule(static) if (n >= parallel_min)
  for (int64_t g = 0; g < ng; ++g)
    dequantize_group(q.data() + g * G, std::min(G, n - g * G), p, scales[g],
                     p.symmetric ? 0 : zeros[g], out + g * G);
}

// ---- vector paths ------------------------------------------------------------------------------

Simd simd_supported() {
  static const Simd supported = detect_simd();
  return supported;
}

Simd simd_level() {
  return simd_in_use.load(std::memory_order_relaxed);
}

Simd set_simd_level(Simd level) {
  const Simd used = std::min(level, simd_supported());
  simd_in_use.store(used, std::memory_order_relaxed);
  return used;
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
