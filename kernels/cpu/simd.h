// Internal to kernels/cpu: 8-wide float vectors in GCC's vector extension (compiled for each
// target clone of the function using them), the vectorized exp shared by the softmax and the
// attention kernels, and run-time CPU feature checks.
#pragma once
#include <cstdint>
#include <cstring>

namespace kvk {

// True when the CPU has AVX2, FMA and F16C (checked once).
bool have_avx2_f16c();

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

// Vectors go by reference: clang rejects passing 32-byte vectors by value in the baseline
// (non-AVX) clone, even to always_inline helpers.
__attribute__((always_inline)) inline void load8(v8& v, const float* p) {
  std::memcpy(&v, p, sizeof v);
}
__attribute__((always_inline)) inline void store8(float* p, const v8& v) {
  std::memcpy(p, &v, sizeof v);
}

// x <- exp(x) for x <= 0 (softmax arguments after the max is subtracted); below -87 it is 0.
__attribute__((always_inline)) inline void exp8(v8& x) {
  const vi8 under = x < -87.0f;
  x = x < -87.0f ? v8{} - 87.0f : x;
  // x = n ln2 + r, |r| <= ln2 / 2, with ln2 split in two for an exact n ln2.
  const v8 t = x * 1.44269504088896341f + 0.5f;
  vi8 n = __builtin_convertvector(t, vi8);             // truncates toward zero
  n = __builtin_convertvector(n, v8) > t ? n - 1 : n;  // floor, since t is negative
  const v8 fn = __builtin_convertvector(n, v8);
  v8 r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  v8 p = v8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // Scale by 2^n through the exponent bits.
  vi8 bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += n << 23;
  bits = under ? 0 : bits;
  std::memcpy(&x, &bits, sizeof x);
}

}  // namespace kvk
