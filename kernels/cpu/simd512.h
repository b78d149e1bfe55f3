// Internal to kernels/cpu: 16-wide float vectors for AVX-512 kernels (functions compiled with
// target(KVK_AVX512) and chosen at run time by have_avx512()), and the 16-vector transpose-add
// that turns sixteen dot-product accumulators into one vector of sixteen sums.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace kvk {

#define KVK_AVX512 "avx512f,avx512dq,avx512vl,avx512bw,fma,f16c"

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;

__attribute__((target(KVK_AVX512), always_inline)) inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((target(KVK_AVX512), always_inline)) inline void store16(float* p, v16 v) {
  std::memcpy(p, &v, sizeof v);
}

// One round of the 16-vector transpose-and-add: pairs a (lanes whose block of `b` is even) with
// c (odd blocks), adding the two halves of each 2b-lane block.
template <int b>
__attribute__((target(KVK_AVX512), always_inline)) inline v16 fold(v16 a, v16 c) {
  const vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vi16 even = (lane / b) % 2 == 0;  // constants after folding
  const vi16 lo = even ? lane : lane + (kLanes - b), hi = even ? lane + b : lane + kLanes;
  return v16(_mm512_permutex2var_ps(__m512(a), __m512i(lo), __m512(c))) +
         v16(_mm512_permutex2var_ps(__m512(a), __m512i(hi), __m512(c)));
}

// Lane l of the result is the sum of the lanes of x[l] (sixteen horizontal sums at once:
// 15 folds instead of 16 reductions of 4 steps each). x is overwritten.
__attribute__((target(KVK_AVX512), always_inline)) inline v16 sum_lanes_16(v16 x[kLanes]) {
  for (int i = 0; i < 8; ++i) x[i] = fold<8>(x[i], x[i + 8]);
  for (int i = 0; i < 4; ++i) x[i] = fold<4>(x[i], x[i + 4]);
  for (int i = 0; i < 2; ++i) x[i] = fold<2>(x[i], x[i + 2]);
  return fold<1>(x[0], x[1]);
}

}  // namespace kvk
