// Softmax of one row of attention logits, the inner loop of every attention score (SnapKV votes,
// evaluation outputs). exp is a Cephes-style polynomial in 8-wide vectors (relative error about
// 2e-7), since the libm call per element was most of SnapKV's time on 32k-token caches.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kvk/ops.h"

namespace kvk {

namespace {

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

}  // namespace

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void softmax_row(
    float* x, int64_t n, float scale, const float* bias) {
  if (n <= 0) return;
  const int64_t body = n & ~int64_t(7);
  // Pass 1: logits and their maximum.
  v8 vmax = v8{} - INFINITY, v;
  for (int64_t j = 0; j < body; j += 8) {
    load8(v, x + j);
    v *= scale;
    if (bias) {
      v8 b;
      load8(b, bias + j);
      v += b;
    }
    store8(x + j, v);
    vmax = v > vmax ? v : vmax;
  }
  float mx = -INFINITY;
  for (int i = 0; i < 8; ++i) mx = std::max(mx, vmax[i]);
  for (int64_t j = body; j < n; ++j) {
    x[j] = x[j] * scale + (bias ? bias[j] : 0.0f);
    mx = std::max(mx, x[j]);
  }
  // Pass 2: exponentials and their sum; the tail goes through a padded vector.
  v8 vsum = {};
  for (int64_t j = 0; j < body; j += 8) {
    load8(v, x + j);
    v -= mx;
    exp8(v);
    store8(x + j, v);
    vsum += v;
  }
  if (body < n) {
    float tail[8];
    std::fill(tail, tail + 8, -INFINITY);  // exp gives 0 for the padding
    std::copy(x + body, x + n, tail);
    load8(v, tail);
    v -= mx;
    exp8(v);
    store8(tail, v);
    std::copy(tail, tail + (n - body), x + body);
    vsum += v;
  }
  double sum = 0;
  for (int i = 0; i < 8; ++i) sum += vsum[i];
  // Pass 3: normalize.
  const float inv = float(1.0 / sum);
  for (int64_t j = 0; j < body; j += 8) {
    load8(v, x + j);
    v *= inv;
    store8(x + j, v);
  }
  for (int64_t j = body; j < n; ++j) x[j] *= inv;
}

}  // namespace kvk
