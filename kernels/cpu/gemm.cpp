// The CPU GEMM: Y = X W^T for a block of weight rows. W is packed into panels of 16 rows laid
// out k-major ([k][16]), then an outer-product micro-kernel keeps a 6 x 16 tile of Y in twelve
// 8-wide accumulators: per k it loads two W vectors and broadcasts six X values (the BLIS
// layout for AVX2's 16 vector registers). Multiversioned for AVX-512 / AVX2 / baseline.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kvk/ops.h"

namespace kvk {

namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int kNR = 16;  // weight rows per panel
constexpr int kMR = 6;   // activation rows per micro-tile

__attribute__((always_inline)) inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

// Y[MR rows][16 cols] of one panel; `cols` (<= 16) are stored.
template <int MR>
__attribute__((always_inline)) inline void micro(const float* X, int64_t K, const float* panel,
                                                 float* Y, int64_t ldy, int cols) {
  v8 acc[MR][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    const v8 w0 = load8(panel + k * kNR), w1 = load8(panel + k * kNR + 8);
    for (int i = 0; i < MR; ++i) {
      const float x = X[i * K + k];
      acc[i][0] += x * w0;
      acc[i][1] += x * w1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    if (cols == kNR) {
      store8(Y + i * ldy, acc[i][0]);
      store8(Y + i * ldy + 8, acc[i][1]);
    } else {
      float tmp[kNR];
      store8(tmp, acc[i][0]);
      store8(tmp + 8, acc[i][1]);
      std::memcpy(Y + i * ldy, tmp, size_t(cols) * sizeof(float));
    }
  }
}

}  // namespace

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void gemm_nt(
    const float* X, int64_t B, int64_t K, const float* W, int64_t N, float* Y, int64_t ldy) {
  if (K == 0) {  // empty dot products
    for (int64_t b = 0; b < B; ++b) std::fill(Y + b * ldy, Y + b * ldy + N, 0.0f);
    return;
  }
  thread_local std::vector<float> packed;
  const int64_t panels = (N + kNR - 1) / kNR;
  packed.resize(size_t(panels * kNR * K));
  for (int64_t p = 0; p < panels; ++p) {  // pack: panel p holds rows 16p.. as [k][16]
    float* dst = &packed[size_t(p * kNR * K)];
    const int rows = int(std::min<int64_t>(kNR, N - p * kNR));
    for (int r = 0; r < kNR; ++r) {
      const float* src = W + (p * kNR + r) * K;
      for (int64_t k = 0; k < K; ++k) dst[k * kNR + r] = r < rows ? src[k] : 0.0f;
    }
  }
  // Blocks of panels (up to 128 KiB of packed W, L2-resident) outside the rows, so a 6-row block
  // of X stays in L1 across the panels and each row of Y is written in contiguous runs of up to
  // 1 KiB: with panels outermost, every tile store hit a different page of a large Y.
  const int64_t block = std::max<int64_t>(1, (128 << 10) / (kNR * K * int64_t(sizeof(float))));
  for (int64_t p0 = 0; p0 < panels; p0 += block) {
    const int64_t p1 = std::min(panels, p0 + block);
    int64_t b = 0;
    for (; b + kMR <= B; b += kMR)
      for (int64_t p = p0; p < p1; ++p)
        micro<kMR>(X + b * K, K, &packed[size_t(p * kNR * K)], Y + b * ldy + p * kNR, ldy,
                   int(std::min<int64_t>(kNR, N - p * kNR)));
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = &packed[size_t(p * kNR * K)];
      const int cols = int(std::min<int64_t>(kNR, N - p * kNR));
      float* y = Y + b * ldy + p * kNR;
      const float* x = X + b * K;
      switch (B - b) {
        case 5: micro<5>(x, K, panel, y, ldy, cols); break;
        case 4: micro<4>(x, K, panel, y, ldy, cols); break;
        case 3: micro<3>(x, K, panel, y, ldy, cols); break;
        case 2: micro<2>(x, K, panel, y, ldy, cols); break;
        case 1: micro<1>(x, K, panel, y, ldy, cols); break;
        default: break;
      }
    }
  }
}

}  // namespace kvk
