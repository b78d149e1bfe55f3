// CPU reference for dtype conversion and finiteness checks. F16C/AVX2 paths are chosen at run
// time so one binary runs on any x86-64; the scalar code is the reference the tests compare with.
#include <cpuid.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kvk/ops.h"
#include "simd.h"

namespace kvk {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "f32";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
  }
  return "?";
}

static uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0x1f) return float_of(sign | 0x7f800000 | (mant << 13));  // Inf / NaN
  if (exp == 0) {                                                      // zero / subnormal
    float m = std::ldexp(float(mant), -24);
    return sign ? -m : m;
  }
  return float_of(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t f32_to_f16(float f) {
  uint32_t u = bits_of(f), sign = (u >> 16) & 0x8000;
  uint32_t absu = u & 0x7fffffff;
  if (absu > 0x7f800000) return uint16_t(sign | 0x7e00 | ((absu >> 13) & 0x3ff));  // NaN
  if (absu >= 0x477ff000) return uint16_t(sign | 0x7c00);  // rounds to >= 65520: Inf
  if (absu < 0x38800000) {               // result is subnormal or zero: scale so the ulp is 2^-24
    float a = float_of(absu) * 0x1p24f;  // exact; nearbyint rounds half to even
    return uint16_t(sign | uint32_t(std::nearbyint(a)));
  }
  uint32_t rounded = absu + 0xfff + ((absu >> 13) & 1);  // round to nearest even at bit 13
  return uint16_t(sign | ((rounded - 0x38000000) >> 13));
}

float bf16_to_f32(uint16_t h) {
  return float_of(uint32_t(h) << 16);
}

uint16_t f32_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 0x40);  // keep NaN a NaN
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

namespace {

__attribute__((target("avx2,f16c"))) void f16_to_f32_avx2(const uint16_t* s, float* d, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
  for (; i < n; ++i) d[i] = f16_to_f32(s[i]);
}

__attribute__((target("avx2,f16c"))) void f32_to_f16_avx2(const float* s, uint16_t* d, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = f32_to_f16(s[i]);
}

__attribute__((target("avx2"))) void bf16_to_f32_avx2(const uint16_t* s, float* d, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(s + i)));
    _mm256_storeu_si256((__m256i*)(d + i), _mm256_slli_epi32(w, 16));
  }
  for (; i < n; ++i) d[i] = bf16_to_f32(s[i]);
}

// Counts elements whose exponent bits are all ones (Inf or NaN) in 16-bit floats; `exp_mask`
// selects the exponent field of f16 (0x7c00) or bf16 (0x7f80).
__attribute__((target("avx2"))) size_t nonfinite16_avx2(const uint16_t* s, size_t n,
                                                        uint16_t exp_mask) {
  const __m256i mask = _mm256_set1_epi16(short(exp_mask));
  __m256i acc = _mm256_setzero_si256();
  size_t i = 0, count = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i x = _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(s + i)), mask);
    acc = _mm256_or_si256(acc, _mm256_cmpeq_epi16(x, mask));
  }
  if (!_mm256_testz_si256(acc, acc)) {  // rare: recount exactly
    count = 0;
    for (size_t j = 0; j < i; ++j) count += (s[j] & exp_mask) == exp_mask;
  }
  for (; i < n; ++i) count += (s[i] & exp_mask) == exp_mask;
  return count;
}

// Large arrays are split across OpenMP threads; a block is big enough to amortize the fork.
constexpr size_t kBlock = size_t(1) << 16;

template <class Fn>
void parallel_blocks(size_t n, Fn&& fn) {
  const long blocks = long((n + kBlock - 1) / kBlock);
  if (blocks <= 4) {  // no OpenMP region at all: even a serialized one costs, and small
    for (long b = 0; b < blocks; ++b)  // conversions run inside kernels' own parallel loops
      fn(size_t(b) * kBlock, std::min(n, size_t(b + 1) * kBlock));
    return;
  }
#pragma omp parallel for schedule(static)
  for (long b = 0; b < blocks; ++b) {
    size_t lo = size_t(b) * kBlock, hi = std::min(n, lo + kBlock);
    fn(lo, hi);
  }
}

void cpu_to_f32(DType from, const void* src, float* dst, size_t n) {
  if (from == DType::f32) {
    if (n) std::memcpy(dst, src, n * 4);  // (empty arrays may have null pointers)
    return;
  }
  const auto* s = static_cast<const uint16_t*>(src);
  const bool vec = have_avx2_f16c();
  parallel_blocks(n, [&](size_t lo, size_t hi) {
    if (from == DType::f16) {
      if (vec) return f16_to_f32_avx2(s + lo, dst + lo, hi - lo);
      for (size_t i = lo; i < hi; ++i) dst[i] = f16_to_f32(s[i]);
    } else {
      if (vec) return bf16_to_f32_avx2(s + lo, dst + lo, hi - lo);
      for (size_t i = lo; i < hi; ++i) dst[i] = bf16_to_f32(s[i]);
    }
  });
}

void cpu_from_f32(DType to, const float* src, void* dst, size_t n) {
  if (to == DType::f32) {
    if (n) std::memcpy(dst, src, n * 4);  // (empty arrays may have null pointers)
    return;
  }
  auto* d = static_cast<uint16_t*>(dst);
  const bool vec = have_avx2_f16c();
  parallel_blocks(n, [&](size_t lo, size_t hi) {
    if (to == DType::f16) {
      if (vec) return f32_to_f16_avx2(src + lo, d + lo, hi - lo);
      for (size_t i = lo; i < hi; ++i) d[i] = f32_to_f16(src[i]);
    } else {
      for (size_t i = lo; i < hi; ++i) d[i] = f32_to_bf16(src[i]);
    }
  });
}

}  // namespace

bool have_avx2_f16c() {
  static const bool ok = [] {
    unsigned a, b, c, d;  // F16C is CPUID.1:ECX bit 29 (clang's builtin does not name it)
    return __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
  }();
  return ok;
}

bool have_avx512() {
  static const bool ok = have_avx2_f16c() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw");
  return ok;
}

bool have_avx512_vnni_vbmi() {
  static const bool ok =
      have_avx512() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
  return ok;
}

size_t count_nonfinite(DType t, const void* data, size_t n) {
  if (t == DType::f32) {
    const auto* u = static_cast<const uint32_t*>(data);
    size_t count = 0;
    for (size_t i = 0; i < n; ++i) count += (u[i] & 0x7f800000u) == 0x7f800000u;
    return count;
  }
  const uint16_t mask = t == DType::f16 ? 0x7c00 : 0x7f80;
  const auto* s = static_cast<const uint16_t*>(data);
  if (have_avx2_f16c()) return nonfinite16_avx2(s, n, mask);
  size_t count = 0;
  for (size_t i = 0; i < n; ++i) count += (s[i] & mask) == mask;
  return count;
}

const Ops& cpu_ops() {
  static const Ops ops{"cpu", cpu_to_f32, cpu_from_f32, attend_head};
  return ops;
}

}  // namespace kvk
