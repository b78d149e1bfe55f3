#include "kv/fp8.h"

#include <array>
#include <bit>
#include <cmath>
#include <limits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "kv/error.h"
#include "kv/quant.h"
#include "kv/str.h"

// encode() works on the float's bits rather than searching the 256 codes, so that it costs a
// dozen integer operations and no data-dependent branch (the selects below compile to cmov or
// blends, and the array loop can be vectorized). Two paths are computed and one is kept:
//  - normal results: |x| is clamped to max_finite's bits (saturation, infinities included), then
//    the 23-bit float mantissa is rounded to the format's 3 or 2 bits with the integer form of
//    round-to-nearest-even, add (half - 1) plus the kept lowest bit, then shift. A carry out of the
//    mantissa increments the exponent field, which is the correctly rounded result (the clamp
//    means it never passes max_finite). Rebiasing the exponent is one subtraction.
//  - subnormal results (|x| below the smallest normal): adding a constant whose float ulp is the
//    format's subnormal step (2^-9 or 2^-16) makes the FPU round |x| to a multiple of that step,
//    ties to even, and the low bits of the sum are then the code. A sum that rounds up to the
//    smallest normal gives code 0x08 / 0x04, which is that normal's code. This is the trick of
//    F. Giesen's float_to_half_fast3. It needs the default rounding mode; flush-to-zero does not
//    matter, as float subnormals are far below half the fp8 subnormal step and round to 0 anyway.
// tests/unit/test_fp8.cpp compares encode() with a search for the nearest code.

namespace kv::fp8 {
namespace {

struct Params {
  uint32_t shift;       // float mantissa bits dropped: 23 - mantissa bits
  uint32_t rebias;      // (127 - bias) << mantissa bits, subtracted from the shifted float bits
  uint32_t min_normal;  // bits of the smallest normal value
  uint32_t max_bits;    // bits of max_finite
  float magic;          // 2^(23 + log2(subnormal step)): its ulp is the subnormal step
};

// e4m3: bias 7, 3 mantissa bits, smallest normal 2^-6, max 1.75 * 2^8, subnormal step 2^-9.
constexpr Params e4m3{20, 120u << 3, 121u << 23, 0x43E00000u, 0x1p14f};
// e5m2: bias 15, 2 mantissa bits, smallest normal 2^-14, max 1.75 * 2^15, subnormal step 2^-16.
constexpr Params e5m2{21, 112u << 2, 113u << 23, 0x47600000u, 0x1p7f};

static_assert(std::bit_cast<float>(e4m3.min_normal) == 0x1p-6f);
static_assert(std::bit_cast<float>(e4m3.max_bits) == 448.0f);
static_assert(std::bit_cast<float>(e5m2.min_normal) == 0x1p-14f);
static_assert(std::bit_cast<float>(e5m2.max_bits) == 57344.0f);

constexpr uint32_t float_inf_bits = 0x7F800000u;
constexpr uint8_t nan_code = 0x7F;  // S.1111.111 in e4m3, S.11111.11 in e5m2

template <const Params& P>
inline uint8_t encode_one(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t a = bits & 0x7FFFFFFFu;

  const uint32_t c = a < P.max_bits ? a : P.max_bits;
  const uint32_t rounded = c + ((1u << (P.shift - 1)) - 1) + ((c >> P.shift) & 1u);
  const uint32_t normal = (rounded >> P.shift) - P.rebias;  // wraps for |x| < min normal: unused

  const uint32_t sub =
      std::bit_cast<uint32_t>(std::bit_cast<float>(a) + P.magic) - std::bit_cast<uint32_t>(P.magic);

  uint32_t code = a < P.min_normal ? sub : normal;
  code = a > float_inf_bits ? nan_code : code;
  return uint8_t(code | sign);
}

// decode tables: exactly the values the bit fields define (all are floats, exactly).
constexpr std::array<float, 256> make_table(Format f) {
  const bool e4 = f == Format::e4m3;
  const uint32_t mbits = e4 ? 3 : 2;
  const uint32_t ebits = e4 ? 4 : 5;
  const uint32_t bias = e4 ? 7 : 15;
  const float sub_step = e4 ? 0x1p-9f : 0x1p-16f;
  std::array<float, 256> t{};
  for (uint32_t code = 0; code < 256; ++code) {
    const uint32_t s = code >> 7;
    const uint32_t e = (code >> mbits) & ((1u << ebits) - 1);
    const uint32_t m = code & ((1u << mbits) - 1);
    float v;
    if (e4 && e == 15 && m == 7) {
      v = std::numeric_limits<float>::quiet_NaN();
    } else if (!e4 && e == 31) {
      v = m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    } else if (e == 0) {
      v = float(m) * sub_step;
    } else {
      v = std::bit_cast<float>(((e + 127 - bias) << 23) | (m << (23 - mbits)));
    }
    t[code] = s ? -v : v;
  }
  return t;
}

constexpr std::array<float, 256> e4m3_table = make_table(Format::e4m3);
constexpr std::array<float, 256> e5m2_table = make_table(Format::e5m2);

const std::array<float, 256>& table(Format f) {
  return f == Format::e4m3 ? e4m3_table : e5m2_table;
}

void check_array(const char* what, int64_t n, float scale) {
  if (n < 0) throw Error(Exit::usage, str(what, ": negative value count ", n));
  if (!(scale > 0) || !std::isfinite(scale))
    throw Error(Exit::usage, str(what, ": scale must be positive and finite, got ", scale));
}

// The array loops, compiled for AVX-512 and AVX2 as well: encode_one is branch-free integer
// work and one float add, which GCC vectorizes as it is (the same operations, so the same
// codes).
template <const Params& P>
inline void encode_run(const float* x, int64_t n, float inv_scale, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = encode_one<P>(x[i] * inv_scale);
}
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void encode_e4m3(
    const float* x, int64_t n, float inv_scale, uint8_t* out) {
  encode_run<e4m3>(x, n, inv_scale, out);
}
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void encode_e5m2(
    const float* x, int64_t n, float inv_scale, uint8_t* out) {
  encode_run<e5m2>(x, n, inv_scale, out);
}
void decode_run(const uint8_t* codes, int64_t n, const float* table, float scale, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = table[codes[i]] * scale;
}

#if defined(__x86_64__) || defined(__i386__)
// decode_run with AVX-512 (GCC does not vectorize the table lookup, or only into gathers), 16
// codes a step: a code's magnitude is entry code & 0x7F of the table, whose first 128 entries
// sit in 8 registers (a two-register permutation picks one of 32 by the low 5 bits, and three
// blends on bits 5 and 6 pick among the four), and its sign is bit 7, as entry code | 0x80 is
// the negation of entry code (the same bits but the sign, NaN included). Then the same
// multiplication as decode_run.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) void decode_run_avx512(
    const uint8_t* codes, int64_t n, const float* table, float scale, float* out) {
  __m512 entries[8];
  for (int k = 0; k < 8; ++k) entries[k] = _mm512_loadu_ps(table + 16 * k);
  const __m512 s = _mm512_set1_ps(scale);
  const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
  const __m512i bit7 = _mm512_set1_epi32(0x80), float_sign = _mm512_set1_epi32(INT32_MIN);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    // (The zero-masked forms of the intrinsics: GCC 12 takes the plain ones' "undefined" start
    // for uninitialized.)
    const __m512i c = _mm512_maskz_cvtepu8_epi32(
        0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    const __mmask16 above32 = _mm512_test_epi32_mask(c, bit5);
    const __m512 low =
        _mm512_mask_blend_ps(above32, _mm512_permutex2var_ps(entries[0], c, entries[1]),
                             _mm512_permutex2var_ps(entries[2], c, entries[3]));
    const __m512 high =
        _mm512_mask_blend_ps(above32, _mm512_permutex2var_ps(entries[4], c, entries[5]),
                             _mm512_permutex2var_ps(entries[6], c, entries[7]));
    const __m512 magnitude = _mm512_mask_blend_ps(_mm512_test_epi32_mask(c, bit6), low, high);
    const __m512i bits = _mm512_castps_si512(magnitude);
    const __m512 value = _mm512_castsi512_ps(
        _mm512_mask_or_epi32(bits, _mm512_test_epi32_mask(c, bit7), bits, float_sign));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(value, s));
  }
  decode_run(codes + i, n - i, table, scale, out + i);
}
#endif

}  // namespace

Format parse_format(const std::string& name) {
  if (name == "e4m3") return Format::e4m3;
  if (name == "e5m2") return Format::e5m2;
  throw Error(Exit::usage, "unknown fp8 format '" + name + "' (e4m3 or e5m2)");
}

const char* format_name(Format f) {
  return f == Format::e4m3 ? "e4m3" : "e5m2";
}

float max_finite(Format f) {
  return f == Format::e4m3 ? 448.0f : 57344.0f;
}

uint8_t encode(float x, Format f) {
  return f == Format::e4m3 ? encode_one<e4m3>(x) : encode_one<e5m2>(x);
}

float decode(uint8_t code, Format f) {
  return table(f)[code];
}

void encode_array(const float* x, int64_t n, float scale, Format f, uint8_t* out) {
  check_array("fp8 encode", n, scale);
  // One reciprocal, then a multiplication per value: faster than a division per value, at the
  // price of a second rounding (documented in fp8.h).
  const float inv_scale = 1.0f / scale;
  if (!std::isfinite(inv_scale))
    throw Error(Exit::usage,
                str("fp8 encode: scale ", scale, " is too small (1/scale overflows float)"));
  if (f == Format::e4m3)
    encode_e4m3(x, n, inv_scale, out);
  else
    encode_e5m2(x, n, inv_scale, out);
}

void decode_array(const uint8_t* codes, int64_t n, float scale, Format f, float* out) {
  check_array("fp8 decode", n, scale);
#if defined(__x86_64__) || defined(__i386__)
  // The AVX-512 level of kv::quant's kernels (tests switch it to compare the two paths).
  if (quant::simd_level() == quant::Simd::avx512)
    return decode_run_avx512(codes, n, table(f).data(), scale, out);
#endif
  decode_run(codes, n, table(f).data(), scale, out);
}

}  // namespace kv::fp8
