// Internal to kernels/cpu: 8-wide float vectors in GCC's vector extension (compiled for each
// target clone of the function using them), the vectorized exp shared by the softmax and the
// attention kernels, and run-time CPU feature checks.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvk {

// True when the CPU has AVX2, FMA and F16C (checked once).
bool have_avx2_f16c();
// True when it also has AVX-512 F/DQ/VL/BW: the kernels of simd512.h (checked once).
bool have_avx512();
// True when it also has AVX-512 VNNI and VBMI: the kernels on quantized codes (KVK_CODES_TARGET).
bool have_avx512_vnni_vbmi();

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
// Lanes of any width: V a float vector, VI the int32 vector of as many lanes.
template <typename V, typename VI>
__attribute__((always_inline)) inline void exp_lanes(V& x) {
  const VI under = x < -87.0f;
  x = x < -87.0f ? V{} - 87.0f : x;
  // x = n ln2 + r, |r| <= ln2 / 2, with ln2 split in two for an exact n ln2.
  const V t = x * 1.44269504088896341f + 0.5f;
  // floor(t) from the truncation toward zero (t is negative), stepped in float: a NaN or
  // out-of-range argument truncates to INT_MIN, and n - 1 there would overflow.
  V fn = __builtin_convertvector(__builtin_convertvector(t, VI), V);
  fn = fn > t ? fn - 1.0f : fn;
  const VI n = __builtin_convertvector(fn, VI);
  V r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // Scale by 2^n through the exponent bits.
  VI bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += n << 23;
  bits = under ? 0 : bits;
  std::memcpy(&x, &bits, sizeof x);
}

__attribute__((always_inline)) inline void exp8(v8& x) {
  exp_lanes<v8, vi8>(x);
}

// Keys per online-softmax step of the decode attention kernels: a chunk's K and V stay in L1/L2.
constexpr int64_t kChunk = 64;

// One step of the online softmax (the flash-decoding recurrence) for one query: s[0..C) are this
// chunk's logits; m and l the running maximum and sum of exponentials, out[0..d) the running
// (unnormalized) output. Rescales what came before to the new maximum and turns s into the
// chunk's weights exp(s - m), which the caller then applies to the chunk's values. V is the float
// vector the caller's target has (8 lanes for AVX2, 16 for AVX-512), VI its int32 twin.
template <typename V, typename VI>
__attribute__((always_inline)) inline void online_softmax_lanes(float* s, int64_t C, float& m,
                                                                float& l, float* out, int d) {
  constexpr int W = sizeof(V) / sizeof(float);
  // Vector max and sum: a scalar loop's dependency chain (a compare or an add per key, each
  // waiting for the last) cost about as much as a q4_0 chunk's integer dot products.
  V mv = V{} + m, x;
  int64_t j = 0;
  for (; j + W <= C; j += W) {
    std::memcpy(&x, s + j, sizeof x);
    mv = x > mv ? x : mv;
  }
  float mx = m;
  for (int e = 0; e < W; ++e) mx = mv[e] > mx ? mv[e] : mx;
  for (; j < C; ++j) mx = s[j] > mx ? s[j] : mx;
  if (mx == -INFINITY) {  // every key masked so far: this chunk adds nothing (not NaN)
    for (j = 0; j < C; ++j) s[j] = 0;
    return;
  }
  if (mx != m) {  // once the maximum settles, most chunks skip the rescale
    const float alpha = m == -INFINITY ? 0.0f : std::exp(m - mx);
    m = mx;
    l *= alpha;
    for (int i = 0; i < d; ++i) out[i] *= alpha;
  }
  V sum{};
  for (j = 0; j < C; j += W) {
    if (j + W <= C) {
      std::memcpy(&x, s + j, sizeof x);
    } else {
      float tail[W];
      for (int e = 0; e < W; ++e) tail[e] = j + e < C ? s[j + e] : -INFINITY;
      std::memcpy(&x, tail, sizeof x);
    }
    x -= mx;
    exp_lanes<V, VI>(x);
    sum += x;
    if (j + W <= C)
      std::memcpy(s + j, &x, sizeof x);
    else
      for (int e = 0; j + e < C; ++e) s[j + e] = x[e];
  }
  for (int e = 0; e < W; ++e) l += sum[e];
}

// The end of the online softmax: out[g] /= l[g] for the G queries (0 where a query saw nothing).
__attribute__((always_inline)) inline void normalize_outputs(float* out, const float* l, int G,
                                                             int d) {
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0 ? 1.0f / l[g] : 0.0f;
    for (int i = 0; i < d; ++i) out[g * d + i] *= inv;
  }
}

__attribute__((always_inline)) inline void online_softmax_step(float* s, int64_t C, float& m,
                                                               float& l, float* out, int d) {
  online_softmax_lanes<v8, vi8>(s, C, m, l, out, d);
}

}  // namespace kvk
