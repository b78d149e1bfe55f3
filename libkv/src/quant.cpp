#include "kv/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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
