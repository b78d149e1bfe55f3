// Internal to kernels/cpu: 16-wide float vectors for AVX-512 kernels (functions compiled with
// target(KVK_AVX512) and chosen at run time by have_avx512()), and the 16-vector transpose-add
// that turns sixteen dot-product accumulators into one vector of sixteen sums.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace kvk {

#define KVK_AVX512 "avx512f,avx512dq,avx512vl,avx512bw,fma,f16c"
// The kernels on quantized codes (q4_0, KIVI-2): integer dot products and byte permutes too.
#define KVK_CODES_TARGET KVK_AVX512 ",avx512vnni,avx512vbmi"

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

// exp_lanes for the AVX-512 kernels, with AVX-512's floor (vrndscaleps) and 2^n scaling
// (vscalefps): the same range reduction and polynomial, so the same results bit for bit
// (tests/unit/test_attention_kivi2.cpp checks it), in 16 instructions instead of 21. (exp_lanes
// itself stays generic: it is inlined into code built for any target.)
__attribute__((target(KVK_AVX512), always_inline)) inline void exp16(v16& x) {
  const __mmask16 under = _mm512_cmp_ps_mask(__m512(x), _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-87.0f), __m512(x));  // a NaN stays
  const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  const __m512 fn = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  x = v16(_mm512_maskz_scalef_ps(~under, p, fn));
}

// Four vectors of 16 int32 as 64 bytes with saturation (two packs: within each 128-bit lane L,
// vector j's lanes 4L .. 4L + 3 land on bytes 16 L + 4 j .. 16 L + 4 j + 3), so 4 consecutive
// lanes of vector j are the int32 word 4 L + j of the result.
template <bool is_signed>
__attribute__((target(KVK_AVX512), always_inline)) inline __m512i pack_4x16(__m512i v0, __m512i v1,
                                                                            __m512i v2,
                                                                            __m512i v3) {
  if constexpr (is_signed)
    return _mm512_packs_epi16(_mm512_packs_epi32(v0, v1), _mm512_packs_epi32(v2, v3));
  else
    return _mm512_packus_epi16(_mm512_packus_epi32(v0, v1), _mm512_packus_epi32(v2, v3));
}

// The word of pack_4x16's output that holds lanes 4 L .. 4 L + 3 of vector j, for the quartet
// q = 4 j + L of 16 lanes, over any number of such 64-byte outputs.
constexpr int packed_word(int q) {
  return q / 16 * 16 + 4 * (q % 4) + q % 16 / 4;
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

// One step of the online softmax (online_softmax_lanes) for the G queries of a KV head at once,
// over a chunk of C <= kChunk logits each, s[g][0..C): the G queries' exponentials are
// independent, so they run side by side rather than one query's dependency chain after
// another's. out + g * stride holds query g's running output (stride floats, all rescaled).
// Also gives each query's largest weight in the chunk, pmax[g] (0 when it saw only -inf), which
// the quantized kernels scale their 8-bit weights by.
template <int G>
__attribute__((target(KVK_AVX512), always_inline)) inline void softmax_chunk(
    float (&s)[G][kChunk], int64_t C, float (&m)[G], float (&l)[G], float* out, int stride,
    float (&pmax)[G]) {
  auto mask_at = [&](int64_t j) {
    return j + 16 <= C ? __mmask16(0xffff) : __mmask16((1u << (C - j)) - 1);
  };
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  __m512 mx[G];
  for (int g = 0; g < G; ++g) mx[g] = minus_inf;
  for (int64_t j = 0; j < C; j += 16)
    for (int g = 0; g < G; ++g)
      mx[g] = _mm512_max_ps(mx[g], _mm512_mask_loadu_ps(minus_inf, mask_at(j), &s[g][j]));
  alignas(64) float old_m[16] = {}, new_m[16] = {}, shift[16] = {};
  for (int g = 0; g < G; ++g) {
    old_m[g] = m[g];
    m[g] = new_m[g] = std::max(m[g], _mm512_reduce_max_ps(mx[g]));
    // A query that has seen only -inf so far subtracts 0, so that its weights are exp(-inf) = 0.
    shift[g] = new_m[g] == -INFINITY ? 0.0f : new_m[g];
  }
  // Every query's rescale factor at once: 1 when its maximum stayed, 0 when it had seen nothing.
  v16 alpha = load16(old_m) - load16(new_m);
  exp16(alpha);
  for (int g = 0; g < G; ++g) {
    if (old_m[g] == new_m[g]) continue;
    l[g] *= alpha[g];
    float* o = out + g * stride;
    for (int i = 0; i < stride; ++i) o[i] *= alpha[g];
  }
  __m512 sum[G], top[G];
  for (int g = 0; g < G; ++g) sum[g] = top[g] = _mm512_setzero_ps();
  for (int64_t j = 0; j < C; j += 16) {
    const __mmask16 live = mask_at(j);
    for (int g = 0; g < G; ++g) {
      v16 x = v16(_mm512_maskz_loadu_ps(live, &s[g][j])) - shift[g];
      exp16(x);
      const __m512 e = _mm512_maskz_mov_ps(live, __m512(x));
      sum[g] = _mm512_add_ps(sum[g], e);
      top[g] = _mm512_max_ps(top[g], e);
      _mm512_mask_storeu_ps(&s[g][j], live, e);
    }
  }
  for (int g = 0; g < G; ++g) {
    l[g] += _mm512_reduce_add_ps(sum[g]);
    pmax[g] = _mm512_reduce_max_ps(top[g]);
  }
}

}  // namespace kvk
