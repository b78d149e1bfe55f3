#include "kv/quant.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

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

// quantize_groups' and dequantize_groups' checks.
void check_groups_call(const char* what, int64_t groups, const UniformParams& p, const void* scales,
                       const void* zeros) {
  check_params(p);
  check_count(what, groups);
  check_uniform_call(what, groups * p.group, p, scales, zeros);
}

// Blocks or groups per call of a vector kernel: one per lane.
constexpr int64_t kBatch = 16;
// Batches per call of the column decoder (128 groups: a row of an 8B-shaped head).
constexpr int64_t kColumnBatches = 8;

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
//  - q8_0/q4_0: one lane per value; per batch of 16 blocks the block maxima are reduced 16
//    vectors at a time (reduce_each) and the scales computed in lanes.
//  - uniform groups: 16 groups per batch, their extremes, f16 zero and f16 scale computed in
//    lanes (the scale is the smallest f16 that reaches the max, which is what smallest_f16's
//    walk finds: the f16 nearest an estimate or the one above, checked against its neighbours,
//    or else a 15-step bitwise search), then codes from the same exact float thresholds as
//    group_codes_by_thresholds (each one fused multiply-add rounded up): counted or found by a
//    binary search for 2 bits, for 4 bits an arithmetic guess checked against one threshold;
//    packed in registers; the extremes are pinned only in groups where that can change a
//    code. Groups along a row ("rows": group_stride apart, values contiguous) are coded one
//    group per vector; groups down the channels ("columns": 16 adjacent groups, values
//    value_stride apart) one group per lane, so keys need no transposition.
//  - the encoders read floats or f16 bits (widened exactly in registers, so kv-compress's f16
//    layers need no float copy), and test for NaN/Inf on the way; f16 conversions are the
//    AVX-512 instructions, whose values are kvk's.
//  - the decoders write with streaming stores where their output is 64-byte aligned.
// A batch holding NaN/Inf, or a group f16 cannot describe, is left to the scalar path, which
// throws its usual error.

// The encoding kernels for one input type (float, or f16 bits), as plain functions.
template <class In>
struct EncodeKernels {
  bool (*encode_q8_0)(const In* x, int64_t blocks, uint8_t* out);  // <= 16 blocks
  bool (*encode_q4_0)(const In* x, int64_t blocks, uint8_t* out);
  bool (*quantize_rows)(const In* x, int64_t groups, int64_t stride, int bits, bool symmetric,
                        uint16_t* scales, uint16_t* zeros, uint8_t* codes);  // <= 16 groups
  bool (*quantize_columns)(const In* x, int64_t stride, int bits, bool symmetric, uint16_t* scales,
                           uint16_t* zeros, uint8_t* codes);  // 16 groups
};

// The kernels, as plain functions (no vectors in their signatures).
struct Kernels {
  EncodeKernels<float> from_f32;
  EncodeKernels<uint16_t> from_f16;
  // The decoders take any number of blocks or groups (columns: a multiple of 16 groups).
  void (*decode_q8_0)(const uint8_t* in, int64_t blocks, float* out);
  void (*decode_q4_0)(const uint8_t* in, int64_t blocks, float* out);
  void (*dequantize_rows)(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros,
                          int64_t groups, int64_t stride, int bits, bool symmetric, float* out);
  void (*dequantize_columns)(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros,
                             int64_t groups, int64_t stride, int bits, bool symmetric, float* out);

  const EncodeKernels<float>& encoders(const float*) const { return from_f32; }
  const EncodeKernels<uint16_t>& encoders(const uint16_t*) const { return from_f16; }
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
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));

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

KV_INLINE u32x8 low(const u32x16& v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
}
KV_INLINE u32x8 high(const u32x16& v) {
  return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}

// Horizontal reductions.
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

// Reductions of 16 vectors at once: lane g of the result is v[g]'s lanes reduced by `pick` (a
// min or max, whose results do not depend on the order). Four rounds pair up the halves, the
// quarters, ... of the vectors: 15 picks and 30 shuffles, instead of a horizontal reduction
// (a dozen dependent instructions) per vector.
template <class V, class Pick>
KV_INLINE V reduce_each(const V (&v)[W], Pick pick) {
  V a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = pick(__builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                        19, 20, 21, 22, 23),
                __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                        25, 26, 27, 28, 29, 30, 31));
  for (int i = 0; i < 4; ++i)
    b[i] = pick(__builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17,
                                        18, 19, 24, 25, 26, 27),
                __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                        22, 23, 28, 29, 30, 31));
  for (int i = 0; i < 2; ++i)
    c[i] = pick(__builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17,
                                        20, 21, 24, 25, 28, 29),
                __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                        22, 23, 26, 27, 30, 31));
  return pick(__builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                      28, 30),
              __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                      29, 31));
}
template <class V>
KV_INLINE V min_of(const V& a, const V& b) {
  return b < a ? b : a;
}
template <class V>
KV_INLINE V max_of(const V& a, const V& b) {
  return b > a ? b : a;
}
struct Min {
  template <class V>
  KV_INLINE V operator()(const V& a, const V& b) const {
    return min_of(a, b);
  }
};
struct Max {
  template <class V>
  KV_INLINE V operator()(const V& a, const V& b) const {
    return max_of(a, b);
  }
};

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

// kvk::f16_to_f32 on 16 lanes of f16 bits, NaN payloads included (decoders meet any bits).
KV_INLINE f32x16 f16_to_f32(const u32x16& h) {
  const u32x16 sign = (h & 0x8000u) << 16, mag = h & 0x7fffu, mant = h & 0x3ffu;
  const u32x16 normal = (mag << 13) + (112u << 23);
  const u32x16 special = 0x7f800000u | (mant << 13);
  const f32x16 subnormal = __builtin_convertvector(as<i32x16>(mant), f32x16) * 0x1p-24f;  // exact
  u32x16 bits = mag >= 0x7c00u ? special : normal;
  bits = mag < 0x400u ? as<u32x16>(subnormal) : bits;
  return as<f32x16>(bits | sign);
}

// The encoders' conversions, by AVX-512's vcvtph2ps / vcvtps2ph: the values of kvk::f16_to_f32
// and kvk::f32_to_f16 (nearest, ties to even, Inf from 65520 up) for every non-NaN input. (NaN
// comes out quiet, which only the decoders could tell; the encoders only compare it.)
// (The zero-masked forms: the plain intrinsics start from an "undefined" register, which GCC 12
// reports as maybe uninitialized.)
KV_INLINE f32x16 widen(const u16x16& h) {
  return as<f32x16>(_mm512_maskz_cvtph_ps(0xffff, as<__m256i>(h)));
}
KV_INLINE u16x16 round_to_f16(const f32x16& f) {
  return as<u16x16>(
      _mm512_maskz_cvtps_ph(0xffff, as<__m512>(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// 16 input values as floats: floats as they are, f16 bits widened (exactly).
KV_INLINE f32x16 load_values(const float* p) {
  return load<f32x16>(p);
}
KV_INLINE f32x16 load_values(const uint16_t* p) {
  return widen(load<u16x16>(p));
}
KV_INLINE float value_at(const float* p) {
  return *p;
}
KV_INLINE float value_at(const uint16_t* p) {
  return widen(u16x16{*p})[0];
}

KV_INLINE u32x16 load_f16_bits(const uint16_t* p) {
  return __builtin_convertvector(load<u16x16>(p), u32x16);
}
KV_INLINE void store_f16_bits(uint16_t* p, const u16x16& h, int64_t n) {
  if (n == W)
    store(p, h);
  else
    std::memcpy(p, &h, size_t(n) * 2);
}

// Mask-register forms, where the vector extension's ?: cannot mix lane widths (a float
// comparison choosing between 16-bit lanes).
KV_INLINE __mmask16 less(const f32x16& a, const f32x16& b) {
  return _mm512_cmp_ps_mask(as<__m512>(a), as<__m512>(b), _CMP_LT_OQ);
}
KV_INLINE u16x16 select(__mmask16 take, const u16x16& yes, const u16x16& no) {
  return as<u16x16>(_mm256_mask_mov_epi16(as<__m256i>(no), take, as<__m256i>(yes)));
}
template <class V>
KV_INLINE bool any_of(const V& lanes) {  // lanes of 16 bits: any not 0
  return hor(as<u32x8>(lanes)) != 0;
}

// Decoded values go out with plain stores, or, where the output is 64-byte aligned, with
// streaming stores: a decoded layer (an 8B-shaped layer is 128 MiB of f32) is far larger than
// the caches, and streaming stores skip reading each line before it is written over (decoders
// are bound by memory writes: 2 bytes of f16 input are 4 of output). The caller fences.
template <bool Stream>
KV_INLINE void put(float* p, const f32x16& v) {
  if constexpr (Stream)
    _mm512_stream_ps(p, as<__m512>(v));
  else
    store(p, v);
}

// ---- q8_0 / q4_0: up to 16 blocks per call ----

// False if a block holds NaN/Inf (nothing is promised about `out` then).
template <bool Q4, class In>
KV_INLINE bool encode_blocks16(const In* x, int64_t nb, uint8_t* out) {
  constexpr size_t step = Q4 ? 18 : 34;
  f32x16 extreme;  // q8_0: max|x|; q4_0: the first value of largest magnitude
  if constexpr (Q4 && std::is_same_v<In, uint16_t>) {
    // From f16 bits, in one pass: per value a key of its magnitude (bits 16-30), its place
    // counted from the end of the block (bits 8-12, so that of equal magnitudes the first has
    // the largest key) and its sign (bit 0); the largest key of a block names its value.
    const u32x16 place0 = (31u - lane_index()) << 8, place1 = (15u - lane_index()) << 8;
    u32x16 block_key[W];
    for (int b = 0; b < W; ++b) {
      if (b >= nb) {
        block_key[b] = u32x16{};
        continue;
      }
      const u32x16 h0 = load_f16_bits(x + b * QK), h1 = load_f16_bits(x + b * QK + 16);
      const u32x16 k0 = ((h0 & 0x7fffu) << 16) | (h0 >> 15) | place0;
      const u32x16 k1 = ((h1 & 0x7fffu) << 16) | (h1 >> 15) | place1;
      block_key[b] = max_of(k0, k1);
    }
    const u32x16 key = reduce_each(block_key, Max{});
    const u32x16 magnitude = key >> 16;
    if (hmax(magnitude) >= 0x7c00u) return false;
    // ggml starts from +0 and keeps a larger magnitude only: a block of zeros gives +0.
    const u32x16 sign = magnitude != 0u ? (key & 1u) << 15 : u32x16{};
    extreme = widen(__builtin_convertvector(magnitude | sign, u16x16));
  } else {
    // Each block's max|x|, as bits (non-negative floats order like their bits), in lanes.
    u32x16 block_top[W];
    for (int b = 0; b < W; ++b) {
      if (b >= nb) {
        block_top[b] = u32x16{};
        continue;
      }
      const u32x16 m0 = magnitude_bits(load_values(x + b * QK));
      const u32x16 m1 = magnitude_bits(load_values(x + b * QK + 16));
      block_top[b] = max_of(m0, m1);
    }
    const u32x16 top = reduce_each(block_top, Max{});
    if (hmax(top) >= 0x7f800000u) return false;
    if constexpr (Q4) {
      // ggml keeps the first value of largest magnitude (and +0 for a block of zeros).
      alignas(64) uint32_t tops[W];
      alignas(64) float first_largest[W] = {};
      store(tops, top);
      for (int64_t b = 0; b < nb; ++b) {
        if (!tops[b]) continue;
        const In* xb = x + b * QK;
        const __m512i t = as<__m512i>(splat<u32x16>(tops[b]));
        const uint32_t at_top =
            _mm512_cmpeq_epi32_mask(as<__m512i>(magnitude_bits(load_values(xb))), t) |
            uint32_t(_mm512_cmpeq_epi32_mask(as<__m512i>(magnitude_bits(load_values(xb + 16))), t))
                << 16;
        first_largest[b] = value_at(xb + __builtin_ctz(at_top));
      }
      extreme = load<f32x16>(first_largest);
    } else {
      extreme = as<f32x16>(top);
    }
  }
  const f32x16 d = extreme / (Q4 ? -8.0f : 127.0f);
  alignas(64) float id[W];
  store(id, d != 0.0f ? 1.0f / d : f32x16{});
  alignas(64) uint16_t scale[W];
  store(scale, round_to_f16(d));
  for (int64_t b = 0; b < nb; ++b) {
    const In* xb = x + b * QK;
    uint8_t* ob = out + size_t(b) * step;
    store_u16(ob, scale[b]);
    // id overflows to Inf only for blocks of tiny values (see encode_q8_0_block); then the
    // products are Inf or NaN (or beyond 127.5), which both codes map to 0.
    if (std::isinf(id[b])) {  // (q4_0's d, and so id, may be negative)
      std::memset(ob + 2, 0, Q4 ? 16 : 32);
      continue;
    }
    const f32x16 a0 = load_values(xb), a1 = load_values(xb + 16);
    if constexpr (Q4) {
      i32x16 c[2];
      for (int k = 0; k < 2; ++k) {
        // x * id rounded before 8.5 is added, as rounded_product() keeps it: the multiply is
        // a builtin GCC does not fuse (__builtin_assoc_barrier on a vector is lowered a lane at
        // a time).
        const f32x16 t = as<f32x16>(_mm512_maskz_mul_ps(0xffff, as<__m512>(k ? a1 : a0),
                                                        _mm512_set1_ps(id[b]))) +
                         8.5f;
        f32x16 clamped = t < 0.0f ? f32x16{} : t;
        clamped = clamped > 15.0f ? splat<f32x16>(15.0f) : clamped;
        c[k] = __builtin_convertvector(clamped, i32x16);
      }
      store(ob + 2, __builtin_convertvector(c[0] | (c[1] << 4), u8x16));
    } else {
      for (int k = 0; k < 2; ++k) {
        const f32x16 v = (k ? a1 : a0) * id[b];
        // roundf: v - trunc(v) is exact.
        const i32x16 t = __builtin_convertvector(v, i32x16);
        const f32x16 frac = abs(v - __builtin_convertvector(t, f32x16));
        const i32x16 away = v < 0.0f ? splat<i32x16>(-1) : splat<i32x16>(1);
        store(ob + 2 + 16 * k,
              __builtin_convertvector(t + (frac >= 0.5f ? away : i32x16{}), i8x16));
      }
    }
  }
  return true;
}

template <bool Q4, bool Stream>
KV_INLINE void decode_blocks16(const uint8_t* in, int64_t nb, float* out) {
  constexpr size_t step = Q4 ? 18 : 34;
  alignas(64) uint32_t bits[W] = {};
  for (int64_t b = 0; b < nb; ++b) bits[b] = load_u16(in + b * step);
  alignas(64) float d[W];
  store(d, f16_to_f32(load<u32x16>(bits)));
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = in + b * step + 2;
    float* y = out + b * QK;
    // (Bytes widened by vpmovzxbd / vpmovsxbd: GCC 12 lowers __builtin_convertvector from 8 to
    // 32 bits one byte at a time.)
    if constexpr (Q4) {
      const i32x16 q = as<i32x16>(_mm512_maskz_cvtepu8_epi32(0xffff, load<__m128i>(blk)));
      put<Stream>(y, __builtin_convertvector((q & 15) - 8, f32x16) * d[b]);
      put<Stream>(y + 16, __builtin_convertvector((q >> 4) - 8, f32x16) * d[b]);
    } else {
      for (int k = 0; k < 2; ++k) {
        const __m512i q = _mm512_maskz_cvtepi8_epi32(0xffff, load<__m128i>(blk + 16 * k));
        put<Stream>(y + 16 * k, __builtin_convertvector(as<i32x16>(q), f32x16) * d[b]);
      }
    }
  }
}

// ---- uniform groups of 32, 16 groups per batch ----

constexpr int64_t kGroup = 32;

// Levels of a group: above the zero (asymmetric) or on each side of 0 (symmetric).
template <int bits, bool Symmetric>
constexpr int kLevels = Symmetric ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;

// One batch's grids, lane l for group l: group_params' S and Z (bits and values) and the
// extremes the codes pin.
struct Grids {
  f32x16 scale, zero, lo, hi;
  u16x16 scale_bits, zero_bits;
};

// Lanes where the top level L * S + Z with S = `candidate` (f16 bits) falls short of `top`.
template <int L>
KV_INLINE __mmask16 falls_short(const u16x16& candidate, const f32x16& zero, const f32x16& top) {
  return less(float(L) * widen(candidate) + zero, top);
}

// group_params for 16 groups with extremes mn, mx; false if one cannot be stored (range).
template <int L, bool Symmetric>
KV_INLINE bool make_grids(const f32x16& mn, const f32x16& mx, Grids& g) {
  f32x16 top, zero;
  bool bad = false;
  if constexpr (Symmetric) {
    const f32x16 neg = -mn;
    top = neg < mx ? mx : neg;  // std::max(-mn, mx)
    zero = f32x16{};
    g.zero_bits = u16x16{};
    g.lo = -top;
    g.hi = top;
  } else {
    g.zero_bits = round_to_f16(mn);
    bad = any_of((g.zero_bits & 0x7c00) == 0x7c00);
    zero = widen(g.zero_bits);
    top = mx;
    g.lo = mn;
    g.hi = mx;
  }
  // The smallest f16 S with L * S + Z >= top: non-negative f16 bits order like their values,
  // and L * S is exact, so whether a candidate falls short is monotone in its bits (and is the
  // scalar code's test). A scale is needed when the top level must rise above Z (max > min and
  // Z < max), or, for symmetric groups, when max|x| > 0.
  const __mmask16 needs_scale = Symmetric ? less(f32x16{}, top) : less(mn, mx) & less(zero, mx);
  // It is nearly always the f16 nearest (top - Z) / L or the one above: it is when the one below
  // that falls short and one of the two does not. (A candidate 0 - 1 is a NaN, which never falls
  // short, and so is 0x7c00 + 1; the guess is then not taken.)
  const u16x16 guess = round_to_f16((top - zero) * (1.0f / float(L)));
  const __mmask16 short_at_guess = falls_short<L>(guess, zero, top);
  const __mmask16 taken = falls_short<L>(guess - 1, zero, top) &
                          (~short_at_guess | ~falls_short<L>(guess + 1, zero, top)) & needs_scale;
  u16x16 scale_bits = select(short_at_guess, guess + 1, guess);
  if (taken != needs_scale) {
    // Otherwise it is one above the largest that falls short, which a bitwise search finds in
    // 15 steps (candidates from 0x7c00 up are Inf and NaN, whose levels never fall short).
    u16x16 short_of = {};
    for (unsigned bit = 1u << 14; bit; bit >>= 1) {
      const u16x16 candidate = short_of | uint16_t(bit);
      short_of = select(falls_short<L>(candidate, zero, top), candidate, short_of);
    }
    scale_bits = short_of + 1;
  }
  g.scale_bits = select(needs_scale, scale_bits, u16x16{});
  bad = bad || any_of(g.scale_bits == 0x7c00);
  g.scale = widen(g.scale_bits);
  g.zero = zero;
  return !bad;
}

// group_codes_by_thresholds' thresholds: T[j] is the smallest float at or above the exact
// Z + (j + 0.5) S, which is one fused multiply-add rounded up (an f16 S times j + 0.5 is exact
// in float, and sums of f16 values and such products are never float subnormals).
KV_INLINE f32x16 thresholds_at(const f32x16& half_steps, const f32x16& scale, const f32x16& zero) {
  return as<f32x16>(_mm512_fmadd_round_ps(as<__m512>(half_steps), as<__m512>(scale),
                                          as<__m512>(zero),
                                          _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
}
// Lane l for group l: T[j] holds threshold j of every group.
template <int L>
KV_INLINE void lane_thresholds(const Grids& g, f32x16 (&T)[L]) {
  for (int j = 0; j < L; ++j) T[j] = thresholds_at(splat<f32x16>(float(j) + 0.5f), g.scale, g.zero);
}
// One group's thresholds in the lanes of one vector, T[j] in lane j (lanes from L up unused).
KV_INLINE f32x16 group_thresholds(float scale, float zero) {
  const f32x16 half_steps = {0.5f, 1.5f, 2.5f,  3.5f,  4.5f,  5.5f,  6.5f,  7.5f,
                             8.5f, 9.5f, 10.5f, 11.5f, 12.5f, 13.5f, 14.5f, 15.5f};
  return thresholds_at(half_steps, splat<f32x16>(scale), splat<f32x16>(zero));
}

// The number of thresholds at or below a (thresholds ascend; L + 1 is a power of two), by a
// binary search: a probe T[c + step - 1] reached means T[c .. c + step - 1] all are.
// One group per vector: the probes come from its thresholds in lanes by a permutation.
template <int L>
KV_INLINE i32x16 levels_reached(const f32x16& a, const f32x16& T) {
  i32x16 c = {};
  for (int step = (L + 1) / 2; step >= 1; step /= 2) {
    const f32x16 probe =
        as<f32x16>(_mm512_maskz_permutexvar_ps(0xffff, as<__m512i>(c + (step - 1)), as<__m512>(T)));
    c = a >= probe ? c + step : c;
  }
  return c;
}
// One group per vector, few levels: the thresholds (broadcast from memory) counted.
template <int L>
KV_INLINE i32x16 levels_reached(const f32x16& a, const float (&T)[L]) {
  i32x16 c = {};
  for (int j = 0; j < L; ++j) c = a >= T[j] ? c + 1 : c;
  return c;
}
// One group per lane (T[j] holds each lane's threshold j): the thresholds still in question
// (R, halved every step) are chosen lane by lane with selects.
template <int L>
KV_INLINE i32x16 levels_reached(const f32x16& a, const f32x16 (&T)[L]) {
  f32x16 R[L];
  for (int j = 0; j < L; ++j) R[j] = T[j];
  i32x16 c = {};
  for (int size = L; size > 0; size /= 2) {
    const int half = size / 2;  // R[half] is the probe; R[0 .. half) or R(half .. size) remain
    const i32x16 reached = a >= R[half];
    c = reached ? c + (half + 1) : c;
    for (int k = 0; k < half; ++k) R[k] = reached ? R[half + 1 + k] : R[k];
  }
  return c;
}

// Many levels (4 bits), one group per lane: the count of thresholds at or below a from an
// arithmetic guess checked against one threshold. With t = (a - Z) / S, exactly T[j] <= a when
// t >= j + 0.5, so the count is u = floor(t + 0.5) limited to [0, L]. g = floor(t + 0.5 - 1/16),
// with t computed in float (a - Z, 1/S and the fused product each rounded once: within
// 2^-20 of t where t is below 16, and of the same sign and a little magnitude elsewhere), is u or
// u - 1; limited below by 0 it is the count or one less, and T[g], the fused multiply-add rounded
// up that gives the thresholds, tells which. (a never exceeds the top level, so t <= L and g
// needs no upper limit.) `inverse` is 1 / S; lanes with S = 0 give anything (they are pinned).
template <bool Symmetric>
KV_INLINE i32x16 levels_guessed(const f32x16& a, const Grids& g, const f32x16& inverse) {
  const __m512 d = as<__m512>(Symmetric ? a : a - g.zero);
  const __m512 t = _mm512_fmadd_ps(d, as<__m512>(inverse), _mm512_set1_ps(0.5f - 0x1p-4f));
  // (max_ps returns its second operand, 0, for NaN.)
  const __m512 floor_t = _mm512_maskz_roundscale_ps(
      0xffff, _mm512_maskz_max_ps(0xffff, t, _mm512_setzero_ps()), _MM_FROUND_TO_NEG_INF);
  const f32x16 threshold = thresholds_at(as<f32x16>(floor_t) + 0.5f, g.scale, g.zero);
  const i32x16 c = __builtin_convertvector(as<f32x16>(floor_t), i32x16);
  return a >= threshold ? c + 1 : c;
}

// The same for one group per vector (4 bits), its thresholds T[j] in lane j (T[15] is the
// exact threshold above the top level, which no value reaches): g is at most L, so T[g] is a
// permutation of T.
template <bool Symmetric>
KV_INLINE i32x16 levels_guessed(const f32x16& a, float zero, float inverse, const f32x16& T) {
  const __m512 d = as<__m512>(Symmetric ? a : a - zero);
  const __m512 t = _mm512_fmadd_ps(d, _mm512_set1_ps(inverse), _mm512_set1_ps(0.5f - 0x1p-4f));
  // (max_ps returns its second operand, 0, for NaN; truncation is the floor from 0 up, and the
  // permutation takes the index's low four bits.)
  const i32x16 c = as<i32x16>(
      _mm512_maskz_cvttps_epi32(0xffff, _mm512_maskz_max_ps(0xffff, t, _mm512_setzero_ps())));
  const f32x16 threshold =
      as<f32x16>(_mm512_maskz_permutexvar_ps(0xffff, as<__m512i>(c), as<__m512>(T)));
  return a >= threshold ? c + 1 : c;
}

// Codes of 16 values v reaching c levels (of |v|, symmetric). With `Pin`, the extremes are
// pinned and S = 0 gives the flat code; without, the group(s) must need neither (see
// pins_matter). Lo, Hi and Scale are vectors (one group per lane) or scalars (one group per
// vector).
template <int L, bool Symmetric, bool Pin, class Bound>
KV_INLINE u32x16 pinned_codes(const f32x16& v, i32x16 c, const Bound& lo, const Bound& hi,
                              const Bound& scale) {
  if constexpr (Pin) c = v == hi ? splat<i32x16>(L) : c;
  if constexpr (Symmetric) {
    if constexpr (Pin) c = v == lo ? splat<i32x16>(L) : c;
    c = v < 0.0f ? -c : c;
    if constexpr (Pin) c = scale == 0.0f ? i32x16{} : c;
    c += L + 1;
  } else {
    if constexpr (Pin) c = v == lo ? i32x16{} : c;
    if constexpr (Pin) c = scale == 0.0f ? i32x16{} : c;
  }
  return as<u32x16>(c);
}

// Whether pinned_codes needs its `Pin` work: for a flat group (S = 0), or where pinning can
// change a code. It cannot when the max (max|x|, symmetric) already reaches the top level,
// T[L - 1], and the min (asymmetric) no level, T[0]; that is the rule, as the smallest S puts
// the max within an f16 ulp of S of the top level. Lanes or scalars.
template <bool Symmetric, class Bound>
KV_INLINE auto pins_matter(const Bound& lo, const Bound& hi, const Bound& scale,
                           const Bound& first_threshold, const Bound& last_threshold) {
  // (No NaN here: the values are finite, and so are their thresholds.)
  if constexpr (Symmetric)
    return (hi < last_threshold) | (scale == 0.0f);
  else
    return (hi < last_threshold) | (lo >= first_threshold) | (scale == 0.0f);
}

// The sign of a zero minimum: the scalar loop keeps the first value equal to the minimum.
// at(l, i) is value i of group l.
template <class At>
KV_INLINE void settle_zero_minima(f32x16& mn, At at) {
  if (!hor(mn == 0.0f ? splat<u32x16>(1u) : u32x16{})) return;
  for (int l = 0; l < W; ++l)
    if (mn[l] == 0.0f)
      for (int64_t i = 0;; ++i)
        if (at(l, i) == 0.0f) {
          mn[l] = at(l, i);
          break;
        }
}

// The codes of 16 groups down adjacent columns, as quantize_columns16 lays them out: group l's
// codes are `bits` little-endian words, lane l of w[0 .. bits). Each word is built in a register
// (an array of words indexed by i / per_word would make GCC update it in memory).
template <int bits, bool Symmetric, bool Pin, class In, int L>
KV_INLINE void column_codes(const In* x, int64_t stride, const Grids& g, const f32x16 (&T)[L],
                            u32x16 (&w)[bits]) {
  constexpr int per_word = 32 / bits;
  const f32x16 inverse = 1.0f / g.scale;
  for (int k = 0; k < bits; ++k) {
    u32x16 word = {};
    for (int j = 0; j < per_word; ++j) {
      const f32x16 v = load_values(x + (k * per_word + j) * stride);
      const f32x16 a = Symmetric ? abs(v) : v;
      // (Few levels: a binary search over the thresholds is as quick as the guess.)
      i32x16 c;
      if constexpr (L > 3)
        c = levels_guessed<Symmetric>(a, g, inverse);
      else
        c = levels_reached<L>(a, T);
      word |= pinned_codes<L, Symmetric, Pin>(v, c, g.lo, g.hi, g.scale) << (bits * j);
    }
    w[k] = word;
  }
}

// Group l's `bits` code words (lane l of w[0 .. bits)) stored one group after the other, as
// quantize_columns16 lays them out: a transposition by permutations (word k of group l goes to
// 32-bit word l * bits + k).
template <int bits>
KV_INLINE void store_column_words(const u32x16 (&w)[bits], uint8_t* codes) {
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second =
      _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  // Words 0 and 1 interleaved: groups 0-7, then 8-15.
  const __m512i p0 = _mm512_permutex2var_epi32(as<__m512i>(w[0]), first, as<__m512i>(w[1]));
  const __m512i p1 = _mm512_permutex2var_epi32(as<__m512i>(w[0]), second, as<__m512i>(w[1]));
  if constexpr (bits == 2) {
    store(codes, p0);
    store(codes + 64, p1);
  } else {
    static_assert(bits == 4);
    const __m512i q0 = _mm512_permutex2var_epi32(as<__m512i>(w[2]), first, as<__m512i>(w[3]));
    const __m512i q1 = _mm512_permutex2var_epi32(as<__m512i>(w[2]), second, as<__m512i>(w[3]));
    // Pairs of words (64 bits) interleaved again: 4 groups a vector.
    const __m512i lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
    const __m512i hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
    store(codes, _mm512_permutex2var_epi64(p0, lo, q0));
    store(codes + 64, _mm512_permutex2var_epi64(p0, hi, q0));
    store(codes + 128, _mm512_permutex2var_epi64(p1, lo, q1));
    store(codes + 192, _mm512_permutex2var_epi64(p1, hi, q1));
  }
}

// 16 groups of 32 values down adjacent columns: group l's value i at x[i * stride + l].
template <int bits, bool Symmetric, class In>
KV_INLINE bool quantize_columns16(const In* x, int64_t stride, uint16_t* scales, uint16_t* zeros,
                                  uint8_t* codes) {
  constexpr int L = kLevels<bits, Symmetric>;
  f32x16 mn = load_values(x), mx = mn;
  u32x16 top = {};
  for (int64_t i = 0; i < kGroup; ++i) {
    const f32x16 v = load_values(x + i * stride);
    mn = min_of(mn, v);
    mx = max_of(mx, v);
    top = max_of(top, magnitude_bits(v));
  }
  if (hmax(top) >= 0x7f800000u) return false;
  settle_zero_minima(mn, [&](int l, int64_t i) { return value_at(x + i * stride + l); });
  Grids g;
  if (!make_grids<L, Symmetric>(mn, mx, g)) return false;
  store_f16_bits(scales, g.scale_bits, W);
  if (!Symmetric) store_f16_bits(zeros, g.zero_bits, W);
  f32x16 T[L];
  lane_thresholds(g, T);
  u32x16 w[bits];
  if (hor(as<u32x16>(pins_matter<Symmetric>(g.lo, g.hi, g.scale, T[0], T[L - 1]))))
    column_codes<bits, Symmetric, true>(x, stride, g, T, w);
  else
    column_codes<bits, Symmetric, false>(x, stride, g, T, w);
  store_column_words<bits>(w, codes);
  return true;
}

// The codes of 32 values (c0: values 0..15, c1: 16..31, each below 2^bits, bits 2 or 4)
// packed LSB-first into bits * 4 bytes: each 64-bit lane holds codes 2k and 2k + 1, which one
// shift and OR put side by side in its low byte; 2-bit pairs are then paired once more.
template <int bits>
KV_INLINE void pack_codes32(const u32x16& c0, const u32x16& c1, uint8_t* out) {
  const u64x8 p0 = as<u64x8>(c0), p1 = as<u64x8>(c1);
  const u8x8 b0 = __builtin_convertvector(p0 | (p0 >> (32 - bits)), u8x8);
  const u8x8 b1 = __builtin_convertvector(p1 | (p1 >> (32 - bits)), u8x8);
  if constexpr (bits == 4) {
    std::memcpy(out, &b0, 8);
    std::memcpy(out + 8, &b1, 8);
  } else {
    const u16x8 nibbles = as<u16x8>(
        __builtin_shufflevector(b0, b1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const u8x8 bytes = __builtin_convertvector(nibbles | (nibbles >> 4), u8x8);
    std::memcpy(out, &bytes, 8);
  }
}

// Up to 16 groups of 32 contiguous values, group g at x + g * stride.
template <int bits, bool Symmetric, class In>
KV_INLINE bool quantize_rows16(const In* x, int64_t n, int64_t stride, uint16_t* scales,
                               uint16_t* zeros, uint8_t* codes) {
  constexpr int L = kLevels<bits, Symmetric>;
  f32x16 lo[W], hi[W];
  u32x16 top = {};
  for (int l = 0; l < W; ++l) {
    if (l >= n) {
      lo[l] = hi[l] = splat<f32x16>(1.0f);  // a constant group: no zero minimum to settle
      continue;
    }
    const In* xg = x + l * stride;
    const f32x16 a0 = load_values(xg), a1 = load_values(xg + 16);
    lo[l] = min_of(a0, a1);
    hi[l] = max_of(a0, a1);
    top = max_of(top, max_of(magnitude_bits(a0), magnitude_bits(a1)));
  }
  if (hmax(top) >= 0x7f800000u) return false;
  f32x16 mn = reduce_each(lo, Min{});
  const f32x16 mx = reduce_each(hi, Max{});
  settle_zero_minima(mn, [&](int l, int64_t i) { return value_at(x + l * stride + i); });
  Grids g;
  if (!make_grids<L, Symmetric>(mn, mx, g)) return false;
  store_f16_bits(scales, g.scale_bits, n);
  if (!Symmetric) store_f16_bits(zeros, g.zero_bits, n);
  alignas(64) float lo_of[W], hi_of[W], scale_of[W], zero_of[W], inverse_of[W];
  store(inverse_of, 1.0f / g.scale);
  store(lo_of, g.lo);
  store(hi_of, g.hi);
  store(scale_of, g.scale);
  store(zero_of, g.zero);
  // Few levels: the thresholds computed in lanes for the batch, then counted from memory; more:
  // each group's thresholds in the lanes of one vector, for a binary search.
  constexpr bool few = L <= 3;
  alignas(64) float lane_T[few ? L : 1][W];
  if constexpr (few) {
    f32x16 T[L];
    lane_thresholds(g, T);
    for (int j = 0; j < L; ++j) store(lane_T[j], T[j]);
  }
  for (int64_t l = 0; l < n; ++l) {
    const In* xg = x + l * stride;
    float group_T[L];
    f32x16 T = {};
    if constexpr (few) {
      for (int j = 0; j < L; ++j) group_T[j] = lane_T[j][l];
    } else {
      T = group_thresholds(scale_of[l], zero_of[l]);
      group_T[0] = T[0];
      group_T[L - 1] = T[L - 1];
    }
    auto codes_of = [&](auto pin) {
      u32x16 c[2];
      for (int k = 0; k < 2; ++k) {
        const f32x16 v = load_values(xg + 16 * k);
        const f32x16 a = Symmetric ? abs(v) : v;
        i32x16 reached;
        if constexpr (few)
          reached = levels_reached<L>(a, group_T);
        else if constexpr (L == 15)
          reached = levels_guessed<Symmetric>(a, zero_of[l], inverse_of[l], T);
        else
          reached = levels_reached<L>(a, T);
        c[k] = pinned_codes<L, Symmetric, decltype(pin)::value>(v, reached, lo_of[l], hi_of[l],
                                                                scale_of[l]);
      }
      pack_codes32<bits>(c[0], c[1], codes + l * bits * 4);
    };
    if (pins_matter<Symmetric>(lo_of[l], hi_of[l], scale_of[l], group_T[0], group_T[L - 1]))
      codes_of(std::true_type{});
    else
      codes_of(std::false_type{});
  }
  return true;
}

// Decoded values of 16 codes: q * S + Z, or Z itself (its bits) where S = 0 (lanes `flat`;
// q * S is exact, so fused or not it is the scalar code's value); symmetric: (q - 2^(bits-1)) * S.
template <bool Symmetric, int bits>
KV_INLINE f32x16 dequantize16(const u32x16& q, const f32x16& scale, const f32x16& zero,
                              __mmask16 flat) {
  if constexpr (Symmetric) {
    return __builtin_convertvector(as<i32x16>(q) - (1 << (bits - 1)), f32x16) * scale;
  } else {
    const f32x16 qf = __builtin_convertvector(as<i32x16>(q), f32x16);
    return as<f32x16>(
        _mm512_mask3_fmadd_ps(as<__m512>(qf), as<__m512>(scale), as<__m512>(zero), ~flat));
  }
}

// quantize_columns16's code layout undone: lane l of w[k] is word k of group l.
template <int bits>
KV_INLINE void load_column_words(const uint8_t* codes, u32x16 (&w)[bits]) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  if constexpr (bits == 2) {
    const __m512i c0 = load<__m512i>(codes), c1 = load<__m512i>(codes + 64);
    w[0] = as<u32x16>(_mm512_permutex2var_epi32(c0, even, c1));
    w[1] = as<u32x16>(_mm512_permutex2var_epi32(c0, odd, c1));
  } else {
    static_assert(bits == 4);
    // Words 0-1 and 2-3 of groups 0-7 (p0, q0) and 8-15 (p1, q1), as 64-bit pairs.
    const __m512i even64 = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd64 = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i c0 = load<__m512i>(codes), c1 = load<__m512i>(codes + 64);
    const __m512i c2 = load<__m512i>(codes + 128), c3 = load<__m512i>(codes + 192);
    const __m512i p0 = _mm512_permutex2var_epi64(c0, even64, c1);
    const __m512i q0 = _mm512_permutex2var_epi64(c0, odd64, c1);
    const __m512i p1 = _mm512_permutex2var_epi64(c2, even64, c3);
    const __m512i q1 = _mm512_permutex2var_epi64(c2, odd64, c3);
    w[0] = as<u32x16>(_mm512_permutex2var_epi32(p0, even, p1));
    w[1] = as<u32x16>(_mm512_permutex2var_epi32(p0, odd, p1));
    w[2] = as<u32x16>(_mm512_permutex2var_epi32(q0, even, q1));
    w[3] = as<u32x16>(_mm512_permutex2var_epi32(q0, odd, q1));
  }
}

// Up to kColumnBatches batches of 16 groups down adjacent columns (group g's value i at
// out[i * stride + g]), written row by row: a batch at a time, the stores would go down 32 rows
// with a stride, which the hardware does not stream (kv-compress's keys decoded at a quarter of
// the speed of values).
template <int bits, bool Symmetric, bool Stream>
KV_INLINE void dequantize_columns16(const uint8_t* codes, const uint16_t* scales,
                                    const uint16_t* zeros, int64_t batches, int64_t stride,
                                    float* out) {
  f32x16 S[kColumnBatches], Z[kColumnBatches];
  __mmask16 flat[kColumnBatches];
  u32x16 w[kColumnBatches][bits];  // batch b: word k of group l in lane l of w[b][k]
  for (int64_t b = 0; b < batches; ++b) {
    S[b] = f16_to_f32(load_f16_bits(scales + b * W));
    Z[b] = Symmetric ? f32x16{} : f16_to_f32(load_f16_bits(zeros + b * W));
    flat[b] = _mm512_cmp_ps_mask(as<__m512>(S[b]), _mm512_setzero_ps(), _CMP_EQ_OQ);
    load_column_words<bits>(codes + b * W * bits * 4, w[b]);
  }
  constexpr int per_word = 32 / bits;
  for (int64_t i = 0; i < kGroup; ++i)
    for (int64_t b = 0; b < batches; ++b) {
      const u32x16 q = (w[b][i / per_word] >> (bits * (i % per_word))) & ((1u << bits) - 1);
      put<Stream>(out + i * stride + b * W, dequantize16<Symmetric, bits>(q, S[b], Z[b], flat[b]));
    }
}

template <int bits, bool Symmetric, bool Stream>
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
    // (Broadcasts, not splat: 0 + Z would turn a zero of -0 into +0.)
    const f32x16 scale = as<f32x16>(_mm512_set1_ps(S[l])), zero = as<f32x16>(_mm512_set1_ps(Z[l]));
    const __mmask16 flat = S[l] == 0.0f ? 0xffff : 0;
    for (int k = 0; k < 2; ++k) {
      u32x16 word;
      if constexpr (bits == 2)
        word = splat<u32x16>(w[k]);
      else
        word = lane_index() < 8u ? splat<u32x16>(w[2 * k]) : splat<u32x16>(w[2 * k + 1]);
      const u32x16 q = (word >> shift) & ((1u << bits) - 1);
      put<Stream>(out + l * stride + 16 * k, dequantize16<Symmetric, bits>(q, scale, zero, flat));
    }
  }
}

}  // namespace vec

// Calls the kernel template for the bit width (2 or 4) and symmetry.
#define KV_BY_WIDTH(kernel, bits, symmetric, args)                            \
  ((bits) == 2 ? ((symmetric) ? kernel<2, true> args : kernel<2, false> args) \
               : ((symmetric) ? kernel<4, true> args : kernel<4, false> args))

namespace avx512 {
// The encoders for float and for f16 input (plain functions, so that the target applies).
#define KV_ENCODERS(In)                                                                            \
  bool encode_q8_0(const In* x, int64_t nb, uint8_t* out) {                                        \
    return vec::encode_blocks16<false>(x, nb, out);                                                \
  }                                                                                                \
  bool encode_q4_0(const In* x, int64_t nb, uint8_t* out) {                                        \
    return vec::encode_blocks16<true>(x, nb, out);                                                 \
  }                                                                                                \
  bool quantize_rows(const In* x, int64_t n, int64_t stride, int bits, bool sym, uint16_t* s,      \
                     uint16_t* z, uint8_t* c) {                                                    \
    return KV_BY_WIDTH(vec::quantize_rows16, bits, sym, (x, n, stride, s, z, c));                  \
  }                                                                                                \
  bool quantize_columns(const In* x, int64_t stride, int bits, bool sym, uint16_t* s, uint16_t* z, \
                        uint8_t* c) {                                                              \
    return KV_BY_WIDTH(vec::quantize_columns16, bits, sym, (x, stride, s, z, c));                  \
  }
KV_ENCODERS(float)
KV_ENCODERS(uint16_t)
#undef KV_ENCODERS

// Whether a decoder's vector stores (16 floats at out + a multiple of `stride` + a multiple of
// 16) can stream: all 64-byte aligned.
bool streams(const float* out, int64_t stride) {
  return reinterpret_cast<uintptr_t>(out) % 64 == 0 && stride % 16 == 0;
}
// A decoder over all its blocks or groups, streaming where `out` allows (then fenced once, at
// the end), otherwise with plain stores: plain and streaming are its two forms, out its last
// argument.
template <auto plain, auto streaming, class... Args>
void streamed(int64_t stride, float* out, Args... args) {
  if (streams(out, stride)) {
    streaming(args..., out);
    _mm_sfence();
  } else {
    plain(args..., out);
  }
}

template <bool Q4, bool Stream>
void decode_blocks_in(const uint8_t* in, int64_t nb, float* out) {
  constexpr size_t step = Q4 ? 18 : 34;
  for (int64_t b = 0; b < nb; b += kBatch)
    vec::decode_blocks16<Q4, Stream>(in + size_t(b) * step, std::min(kBatch, nb - b), out + b * QK);
}
template <int bits, bool Symmetric, bool Stream>
void dequantize_rows_in(const uint8_t* c, const uint16_t* s, const uint16_t* z, int64_t groups,
                        int64_t stride, float* out) {
  for (int64_t g = 0; g < groups; g += kBatch)
    vec::dequantize_rows16<bits, Symmetric, Stream>(c + g * bits * 4, s + g, z ? z + g : nullptr,
                                                    std::min(kBatch, groups - g), stride,
                                                    out + g * stride);
}
template <int bits, bool Symmetric, bool Stream>
void dequantize_columns_in(const uint8_t* c, const uint16_t* s, const uint16_t* z, int64_t groups,
                           int64_t stride, float* out) {
  for (int64_t g = 0; g < groups; g += kColumnBatches * kBatch)
    vec::dequantize_columns16<bits, Symmetric, Stream>(
        c + g * bits * 4, s + g, z ? z + g : nullptr,
        std::min(kColumnBatches, (groups - g) / kBatch), stride, out + g);
}

void decode_q8_0(const uint8_t* in, int64_t nb, float* out) {
  streamed<decode_blocks_in<false, false>, decode_blocks_in<false, true>>(0, out, in, nb);
}
void decode_q4_0(const uint8_t* in, int64_t nb, float* out) {
  streamed<decode_blocks_in<true, false>, decode_blocks_in<true, true>>(0, out, in, nb);
}
template <int bits, bool Symmetric>
void dequantize_rows_at(const uint8_t* c, const uint16_t* s, const uint16_t* z, int64_t groups,
                        int64_t stride, float* out) {
  streamed<dequantize_rows_in<bits, Symmetric, false>, dequantize_rows_in<bits, Symmetric, true>>(
      stride, out, c, s, z, groups, stride);
}
template <int bits, bool Symmetric>
void dequantize_columns_at(const uint8_t* c, const uint16_t* s, const uint16_t* z, int64_t groups,
                           int64_t stride, float* out) {
  streamed<dequantize_columns_in<bits, Symmetric, false>,
           dequantize_columns_in<bits, Symmetric, true>>(stride, out, c, s, z, groups, stride);
}
void dequantize_rows(const uint8_t* c, const uint16_t* s, const uint16_t* z, int64_t n,
                     int64_t stride, int bits, bool sym, float* out) {
  KV_BY_WIDTH(dequantize_rows_at, bits, sym, (c, s, z, n, stride, out));
}
void dequantize_columns(const uint8_t* c, const uint16_t* s, const uint16_t* z, int64_t groups,
                        int64_t stride, int bits, bool sym, float* out) {
  KV_BY_WIDTH(dequantize_columns_at, bits, sym, (c, s, z, groups, stride, out));
}
template <class In>
constexpr EncodeKernels<In> encoders{encode_q8_0, encode_q4_0, quantize_rows, quantize_columns};
const Kernels kernels{encoders<float>, encoders<uint16_t>, decode_q8_0,
                      decode_q4_0,     dequantize_rows,    dequantize_columns};
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

// The block encoder's kernel over all batches; false if one met NaN/Inf.
template <class In>
bool encode_block_batches(const In* x, int64_t n, uint8_t* out, size_t block_bytes,
                          bool (*kernel)(const In*, int64_t, uint8_t*)) {
  const int64_t nb = n / QK;
  return all_batches((nb + kBatch - 1) / kBatch, n >= parallel_min, [&](int64_t i) {
    const int64_t b = i * kBatch;
    return kernel(x + b * QK, std::min(kBatch, nb - b), out + size_t(b) * block_bytes);
  });
}

void decode_block_batches(const uint8_t* in, int64_t n, float* out, size_t block_bytes,
                          void (*kernel)(const uint8_t*, int64_t, float*)) {
  // Chunks of 64 batches (128 KiB of output) per call.
  constexpr int64_t chunk = 64 * kBatch;
  const int64_t nb = n / QK;
  all_batches((nb + chunk - 1) / chunk, n >= parallel_min, [&](int64_t i) {
    const int64_t b = i * chunk;
    kernel(in + size_t(b) * block_bytes, std::min(chunk, nb - b), out + b * QK);
    return true;
  });
}

// Whether quantize_groups/dequantize_groups have a vector kernel for these groups.
bool vector_groups(const UniformParams& p) {
  return p.group == 32 && (p.bits == 2 || p.bits == 4);
}

// quantize_groups' vector part: the groups from the first up to the first batch a kernel left
// (NaN/Inf, or out of f16's range), or up to the last whole batch of columns; returns how many
// were coded. 0 without a kernel for these parameters.
template <class In>
int64_t quantize_vector_groups(const In* x, int64_t groups, int64_t group_stride,
                               int64_t value_stride, const UniformParams& p, uint16_t* scales,
                               uint16_t* zeros, uint8_t* codes) {
  const Kernels* k = vector_kernels();
  if (!k || !vector_groups(p)) return 0;
  const EncodeKernels<In>& kernel = k->encoders(x);
  const int64_t group_bytes = p.group * p.bits / 8;
  auto at = [&](int64_t g) {
    return std::tuple(scales + g, zeros ? zeros + g : nullptr, codes + g * group_bytes);
  };
  int64_t g = 0;
  if (value_stride == 1) {
    for (; g < groups; g += kBatch) {
      const auto [s, z, c] = at(g);
      if (!kernel.quantize_rows(x + g * group_stride, std::min(kBatch, groups - g), group_stride,
                                p.bits, p.symmetric, s, z, c))
        break;
    }
  } else if (group_stride == 1) {
    // A batch reads down the rows 16 columns at a time, an order the hardware prefetchers do not
    // follow from memory: every row's values are asked for up front.
    const int64_t row_bytes = groups * int64_t(sizeof(In));
    for (int64_t i = 0; i < p.group; ++i)
      for (int64_t byte = 0; byte < row_bytes; byte += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(x + i * value_stride) + byte);
    for (; g + kBatch <= groups; g += kBatch) {
      const auto [s, z, c] = at(g);
      if (!kernel.quantize_columns(x + g, value_stride, p.bits, p.symmetric, s, z, c)) break;
    }
  }
  return std::min(g, groups);
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
  if (const Kernels* k = vector_kernels()) {
    check_blocks("q8_0", n);
    if (!encode_block_batches(x, n, out, 34, k->from_f32.encode_q8_0))
      throw_nonfinite("q8_0", x, n);
    return;
  }
  encode_blocks("q8_0", x, n, out, 34, encode_q8_0_block);
}

void encode_q4_0(const float* x, int64_t n, uint8_t* out) {
  if (const Kernels* k = vector_kernels()) {
    check_blocks("q4_0", n);
    if (!encode_block_batches(x, n, out, 18, k->from_f32.encode_q4_0))
      throw_nonfinite("q4_0", x, n);
    return;
  }
  encode_blocks("q4_0", x, n, out, 18, encode_q4_0_block);
}

bool encode_q8_0_f16(const uint16_t* x, int64_t n, uint8_t* out) {
  check_blocks("q8_0", n);
  const Kernels* k = vector_kernels();
  return k && encode_block_batches(x, n, out, 34, k->from_f16.encode_q8_0);
}

bool encode_q4_0_f16(const uint16_t* x, int64_t n, uint8_t* out) {
  check_blocks("q4_0", n);
  const Kernels* k = vector_kernels();
  return k && encode_block_batches(x, n, out, 18, k->from_f16.encode_q4_0);
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
  check_groups_call("uniform quantization", groups, p, scales, zeros);
  const int64_t len = p.group;
  // Groups before g are done.
  const int64_t g =
      quantize_vector_groups(x, groups, group_stride, value_stride, p, scales, zeros, codes);
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

bool quantize_groups_f16(const uint16_t* x, int64_t groups, int64_t group_stride,
                         int64_t value_stride, const UniformParams& p, uint16_t* scales,
                         uint16_t* zeros, uint8_t* codes) {
  check_groups_call("uniform quantization", groups, p, scales, zeros);
  return quantize_vector_groups(x, groups, group_stride, value_stride, p, scales, zeros, codes) ==
         groups;
}

void dequantize_groups(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros,
                       int64_t groups, int64_t group_stride, int64_t value_stride,
                       const UniformParams& p, float* out) {
  check_groups_call("uniform dequantization", groups, p, scales, zeros);
  const int64_t len = p.group;
  int64_t g = 0;
  if (const Kernels* k = vector_kernels(); k && vector_groups(p)) {
    const uint16_t* z = zeros;
    if (value_stride == 1) {
      k->dequantize_rows(codes, scales, z, groups, group_stride, p.bits, p.symmetric, out);
      g = groups;
    } else if (group_stride == 1) {
      g = groups / kBatch * kBatch;
      k->dequantize_columns(codes, scales, z, g, value_stride, p.bits, p.symmetric, out);
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
