// Softmax of one row of attention logits, the inner loop of every attention score (SnapKV votes,
// evaluation outputs). exp is a Cephes-style polynomial in 8-wide vectors (relative error about
// 2e-7), since the libm call per element was most of SnapKV's time on 32k-token caches.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kvk/ops.h"
#include "simd.h"

namespace kvk {

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
  if (mx == -INFINITY) {  // every logit -inf (entries of zero mass): no weight anywhere, not NaN
    std::fill(x, x + n, 0.0f);
    return;
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
