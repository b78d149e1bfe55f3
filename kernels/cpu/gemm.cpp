// The CPU GEMM micro-kernel: 2 activation rows x 4 weight rows per step, vectorized along K
// with 8-wide GCC vector types (one AVX2 register; AVX-512 and baseline clones are generated).
// 8 accumulators + 6 operands fit the 16 vector registers of AVX2 without spilling.
#include <cstring>

#include "kvk/ops.h"

namespace kvk {

namespace {

typedef float v8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline float hsum(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

}  // namespace

__attribute__((target_clones("avx512f", "avx2", "default"))) void gemm_nt(
    const float* X, int64_t B, int64_t K, const float* W, int64_t N, float* Y, int64_t ldy) {
  const int64_t K8 = K - K % 8;
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) {
    const float* w0 = W + n * K;
    const float *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) {
      const float *x0 = X + b * K, *x1 = x0 + K;
      v8 a00 = {}, a01 = {}, a02 = {}, a03 = {}, a10 = {}, a11 = {}, a12 = {}, a13 = {};
      for (int64_t k = 0; k < K8; k += 8) {
        const v8 p = load8(x0 + k), q = load8(x1 + k);
        const v8 r0 = load8(w0 + k), r1 = load8(w1 + k), r2 = load8(w2 + k), r3 = load8(w3 + k);
        a00 += p * r0, a01 += p * r1, a02 += p * r2, a03 += p * r3;
        a10 += q * r0, a11 += q * r1, a12 += q * r2, a13 += q * r3;
      }
      float s[8] = {hsum(a00), hsum(a01), hsum(a02), hsum(a03),
                    hsum(a10), hsum(a11), hsum(a12), hsum(a13)};
      for (int64_t k = K8; k < K; ++k) {
        s[0] += x0[k] * w0[k], s[1] += x0[k] * w1[k], s[2] += x0[k] * w2[k], s[3] += x0[k] * w3[k];
        s[4] += x1[k] * w0[k], s[5] += x1[k] * w1[k], s[6] += x1[k] * w2[k], s[7] += x1[k] * w3[k];
      }
      std::memcpy(Y + b * ldy + n, s, 4 * sizeof(float));
      std::memcpy(Y + (b + 1) * ldy + n, s + 4, 4 * sizeof(float));
    }
    for (; b < B; ++b) {  // odd activation row
      const float* x0 = X + b * K;
      v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t k = 0; k < K8; k += 8) {
        const v8 p = load8(x0 + k);
        a0 += p * load8(w0 + k), a1 += p * load8(w1 + k), a2 += p * load8(w2 + k),
            a3 += p * load8(w3 + k);
      }
      float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (int64_t k = K8; k < K; ++k)
        s[0] += x0[k] * w0[k], s[1] += x0[k] * w1[k], s[2] += x0[k] * w2[k], s[3] += x0[k] * w3[k];
      std::memcpy(Y + b * ldy + n, s, 4 * sizeof(float));
    }
  }
  for (; n < N; ++n) {  // leftover weight rows
    const float* w = W + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* x = X + b * K;
      v8 a = {};
      for (int64_t k = 0; k < K8; k += 8) a += load8(x + k) * load8(w + k);
      float s = hsum(a);
      for (int64_t k = K8; k < K; ++k) s += x[k] * w[k];
      Y[b * ldy + n] = s;
    }
  }
}

}  // namespace kvk
