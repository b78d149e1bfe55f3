// Decode attention of one KV head for the query heads that share it (GQA): the cost a cache
// pays at every generated token. One pass over K and V in chunks with an online softmax (the
// flash-decoding recurrence), so the data is read once and the physical limit is
// bytes(K + V) / memory bandwidth. K rows are converted once and dotted with every query of the
// group; V is walked 8 channels at a time so the group's accumulators stay in registers.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kvk/ops.h"
#include "simd.h"

namespace kvk {

namespace {

constexpr int64_t kChunk = 64;  // keys per online-softmax step: K and V chunks stay in L1/L2
constexpr int kMaxGroup = 8;    // query heads handled together (larger groups loop)

float load_scalar(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::f32:
      return static_cast<const float*>(p)[i];
    case DType::f16:
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  return 0;
}

// The reference: plain loops in double, for any type and shape.
void attend_scalar(DType type, const void* k, const void* v, int64_t n, int d, const float* q,
                   int G, float scale, const float* bias, float* out) {
  std::vector<double> s(static_cast<size_t>(n));
  for (int g = 0; g < G; ++g) {
    double mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      double dot = 0;
      for (int i = 0; i < d; ++i) dot += double(q[g * d + i]) * load_scalar(type, k, j * d + i);
      s[size_t(j)] = dot * scale + (bias ? bias[j] : 0.0);
      mx = std::max(mx, s[size_t(j)]);
    }
    double z = 0;
    for (int64_t j = 0; j < n; ++j) z += (s[size_t(j)] = std::exp(s[size_t(j)] - mx));
    for (int i = 0; i < d; ++i) {
      double o = 0;
      for (int64_t j = 0; j < n; ++j) o += s[size_t(j)] * load_scalar(type, v, j * d + i);
      out[g * d + i] = n ? float(o / z) : 0.0f;
    }
  }
}

// 8 values of row `p` at channel i, as floats.
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void load_row8(DType type,
                                                                              const void* p,
                                                                              int64_t at, v8& out) {
  if (type == DType::f32) {
    load8(out, static_cast<const float*>(p) + at);
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + at));
    const __m256 f = type == DType::f16
                         ? _mm256_cvtph_ps(h)
                         : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    std::memcpy(&out, &f, sizeof out);
  }
}

// G <= kMaxGroup queries, d a multiple of 8.
__attribute__((target("avx2,fma,f16c"))) void attend_avx2(DType type, const void* k, const void* v,
                                                          int64_t n, int d, const float* q, int G,
                                                          float scale, const float* bias,
                                                          float* out) {
  alignas(32) float s[kMaxGroup][kChunk];
  float m[kMaxGroup], l[kMaxGroup];
  std::fill(m, m + G, -INFINITY);
  std::fill(l, l + G, 0.0f);
  std::fill(out, out + G * d, 0.0f);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t C = std::min(kChunk, n - c0);
    // Scores: each K row converted once, dotted with every query of the group.
    for (int64_t j = 0; j < C; ++j) {
      v8 acc[kMaxGroup] = {};
      for (int i = 0; i < d; i += 8) {
        v8 kv, qv;
        load_row8(type, k, (c0 + j) * d + i, kv);
        for (int g = 0; g < G; ++g) {
          load8(qv, q + g * d + i);
          acc[g] += qv * kv;
        }
      }
      for (int g = 0; g < G; ++g) {
        float t = 0;
        for (int e = 0; e < 8; ++e) t += acc[g][e];
        s[g][j] = t * scale + (bias ? bias[c0 + j] : 0.0f);
      }
    }
    // Online softmax: rescale what came before to the new maximum, exponentiate this chunk.
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
      for (int64_t j = 0; j < C; ++j) mx = std::max(mx, s[g][j]);
      const float alpha = m[g] == -INFINITY ? 0.0f : std::exp(m[g] - mx);
      m[g] = mx;
      l[g] *= alpha;
      for (int i = 0; i < d; ++i) out[g * d + i] *= alpha;
      float sum = 0;
      for (int64_t j = 0; j < C; j += 8) {
        v8 x;
        if (j + 8 <= C) {
          load8(x, &s[g][j]);
        } else {
          float tail[8];
          for (int e = 0; e < 8; ++e) tail[e] = j + e < C ? s[g][j + e] : -INFINITY;
          load8(x, tail);
        }
        x -= mx;
        exp8(x);
        for (int e = 0; e < 8 && j + e < C; ++e) s[g][j + e] = x[e], sum += x[e];
      }
      l[g] += sum;
    }
    // Values: 8 channels at a time, the group's accumulators in registers across the chunk.
    for (int i = 0; i < d; i += 8) {
      v8 acc[kMaxGroup];
      for (int g = 0; g < G; ++g) load8(acc[g], out + g * d + i);
      for (int64_t j = 0; j < C; ++j) {
        v8 vv;
        load_row8(type, v, (c0 + j) * d + i, vv);
        for (int g = 0; g < G; ++g) acc[g] += s[g][j] * vv;
      }
      for (int g = 0; g < G; ++g) store8(out + g * d + i, acc[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0 ? 1.0f / l[g] : 0.0f;
    for (int i = 0; i < d; ++i) out[g * d + i] *= inv;
  }
}

}  // namespace

void attend_head(DType type, const void* k, const void* v, int64_t n, int d, const float* q, int G,
                 float scale, const float* bias, float* out) {
  if (!have_avx2_f16c() || d % 8 != 0)
    return attend_scalar(type, k, v, n, d, q, G, scale, bias, out);
  for (int g0 = 0; g0 < G; g0 += kMaxGroup) {
    const int g = std::min(kMaxGroup, G - g0);
    attend_avx2(type, k, v, n, d, q + int64_t(g0) * d, g, scale, bias, out + int64_t(g0) * d);
  }
}

void attend_head_reference(DType type, const void* k, const void* v, int64_t n, int d,
                           const float* q, int G, float scale, const float* bias, float* out) {
  attend_scalar(type, k, v, n, d, q, G, scale, bias, out);
}

}  // namespace kvk
