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
#include "simd512.h"

namespace kvk {

namespace {

// K rows prefetched ahead of the one being read. Prefetches go to L2 (locality 2, prefetcht1):
// into L1 they held the core's few L1 miss buffers and capped a thread at about 11 GB/s from
// memory; into L2, 32 rows ahead, the 2-thread step went from 16-18 to 21-23 GB/s
// (bench/README.md).
constexpr int64_t kAhead = 32;
constexpr int kIntoL2 = 2;  // __builtin_prefetch locality

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

// 8 values of a row at element `at`, as floats.
template <DType type>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void load_row8(const void* p,
                                                                              int64_t at, v8& out) {
  if constexpr (type == DType::f32) {
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

__attribute__((target("avx2,fma,f16c"), always_inline)) inline float hsum8(const v8& x) {
  __m256 v;
  std::memcpy(&v, &x, sizeof v);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// Values: out[g] += sum_jj s[g][jj] v_(c0 + jj) over the chunk's C rows, 16 channels at a
// time, the group's accumulators in registers across the chunk, each broadcast weight serving
// two vectors.
template <DType type, int G>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void add_values(
    const void* v, int64_t c0, int64_t C, int d, const float (&s)[G][kChunk], float* out) {
  int i = 0;
  for (; i + 16 <= d; i += 16) {
    v8 a0[G], a1[G];
    for (int g = 0; g < G; ++g) load8(a0[g], out + g * d + i), load8(a1[g], out + g * d + i + 8);
    for (int64_t jj = 0; jj < C; ++jj) {
      v8 v0, v1;
      load_row8<type>(v, (c0 + jj) * d + i, v0);
      load_row8<type>(v, (c0 + jj) * d + i + 8, v1);
      for (int g = 0; g < G; ++g) {
        const float p = s[g][jj];
        a0[g] += p * v0;
        a1[g] += p * v1;
      }
    }
    for (int g = 0; g < G; ++g) store8(out + g * d + i, a0[g]), store8(out + g * d + i + 8, a1[g]);
  }
  for (; i < d; i += 8) {
    v8 acc[G];
    for (int g = 0; g < G; ++g) load8(acc[g], out + g * d + i);
    for (int64_t jj = 0; jj < C; ++jj) {
      v8 vv;
      load_row8<type>(v, (c0 + jj) * d + i, vv);
      for (int g = 0; g < G; ++g) acc[g] += s[g][jj] * vv;
    }
    for (int g = 0; g < G; ++g) store8(out + g * d + i, acc[g]);
  }
}

// G queries, d a multiple of 8. Type and group size are template parameters, so the group's
// accumulators stay in registers and the row loads carry no type test.
template <DType type, int G>
__attribute__((target("avx2,fma,f16c"))) void attend_avx2(const void* k, const void* v, int64_t n,
                                                          int d, const float* q, float scale,
                                                          const float* bias, float* out) {
  alignas(32) float s[G][kChunk];
  float m[G], l[G];
  std::fill(m, m + G, -INFINITY);
  std::fill(l, l + G, 0.0f);
  std::fill(out, out + G * d, 0.0f);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t C = std::min(kChunk, n - c0);
    // Scores: each K row converted once, dotted with every query of the group. The V rows of
    // the chunk are prefetched meanwhile: the value pass below walks them 8 channels at a time
    // across rows, a pattern the hardware prefetcher does not follow from memory.
    const size_t row_bytes = size_t(d) * dtype_size(type);
    int64_t j = 0;
    for (; j + 2 <= C; j += 2) {  // two rows at a time: each query load serves both
      for (int r = 0; r < 2; ++r) {
        const char* vrow = static_cast<const char*>(v) + size_t(c0 + j + r) * row_bytes;
        const char* kahead = static_cast<const char*>(k) + size_t(c0 + j + r + kAhead) * row_bytes;
        for (size_t b = 0; b < row_bytes; b += 64) {
          __builtin_prefetch(vrow + b, 0, kIntoL2);
          if (c0 + j + r + kAhead < n) __builtin_prefetch(kahead + b, 0, kIntoL2);
        }
      }
      v8 a0[G] = {}, a1[G] = {};
      for (int i = 0; i < d; i += 8) {
        v8 k0, k1, qv;
        load_row8<type>(k, (c0 + j) * d + i, k0);
        load_row8<type>(k, (c0 + j + 1) * d + i, k1);
        for (int g = 0; g < G; ++g) {
          load8(qv, q + g * d + i);
          a0[g] += qv * k0;
          a1[g] += qv * k1;
        }
      }
      for (int g = 0; g < G; ++g) {
        s[g][j] = hsum8(a0[g]) * scale + (bias ? bias[c0 + j] : 0.0f);
        s[g][j + 1] = hsum8(a1[g]) * scale + (bias ? bias[c0 + j + 1] : 0.0f);
      }
    }
    for (; j < C; ++j) {
      const char* vrow = static_cast<const char*>(v) + size_t(c0 + j) * row_bytes;
      for (size_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(vrow + b, 0, kIntoL2);
      v8 acc[G] = {};
      for (int i = 0; i < d; i += 8) {
        v8 kv, qv;
        load_row8<type>(k, (c0 + j) * d + i, kv);
        for (int g = 0; g < G; ++g) {
          load8(qv, q + g * d + i);
          acc[g] += qv * kv;
        }
      }
      for (int g = 0; g < G; ++g) s[g][j] = hsum8(acc[g]) * scale + (bias ? bias[c0 + j] : 0.0f);
    }
    for (int g = 0; g < G; ++g) online_softmax_step(s[g], C, m[g], l[g], out + g * d, d);
    add_values<type, G>(v, c0, C, d, s, out);
  }
  normalize_outputs(out, l, G, d);
}

// 16 values of a row at element `at`, as floats.
template <DType type>
__attribute__((target(KVK_AVX512), always_inline)) inline v16 load_row16(const void* p,
                                                                         int64_t at) {
  if constexpr (type == DType::f32) {
    return load16(static_cast<const float*>(p) + at);
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + at));
    if constexpr (type == DType::f16) return v16(_mm512_cvtph_ps(h));
    return v16(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
}

// Values as add_values, 16 channels a pass on AVX-512 (the weights broadcast from memory), while
// the next chunk's V rows (`ahead`, `ahead_bytes`) are prefetched into L2: the pass covers
// dtype_size * 16 bytes of them a row step, a prefetch for each new line. Spread over the value
// pass, these requests no longer pile up with the K rows' in the score pass, where a core ran
// out of room for outstanding misses: from memory, 2 threads, 22.4-23.4 -> 25.9-27.5 GB/s, the
// same speed in L2 (bench/README.md).
template <DType type, int G>
__attribute__((target(KVK_AVX512), always_inline)) inline void add_values_avx512(
    const void* v, int64_t c0, int64_t C, int d, const float (&s)[G][kChunk], float* out,
    const char* ahead, size_t ahead_bytes) {
  constexpr size_t kStepBytes = dtype_size(type) * kLanes;  // of `ahead`, per row step
  const size_t last_line = ahead_bytes > 0 ? (ahead_bytes - 1) / 64 * 64 : 0;
  size_t at = 0;
  for (int i = 0; i < d; i += kLanes) {
    v16 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = load16(out + g * d + i);
    for (int64_t jj = 0; jj < C; ++jj) {
      if (ahead_bytes > 0 && at % 64 == 0)
        __builtin_prefetch(ahead + std::min(at, last_line), 0, kIntoL2);
      at += kStepBytes;
      const v16 x = load_row16<type>(v, (c0 + jj) * d + i);
      for (int g = 0; g < G; ++g) acc[g] += v16(_mm512_set1_ps(s[g][jj])) * x;
    }
    for (int g = 0; g < G; ++g) store16(out + g * d + i, acc[g]);
  }
}

// As attend_avx2, with the scores on AVX-512 (d a multiple of 16): R = 16 / G keys at a time,
// 16 accumulators (one per key and query) of 16 channels, so every converted K vector serves
// all G queries and no accumulator waits on another; sum_lanes_16 then yields the block's 16
// scores at once where attend_avx2 reduces each one alone. The next chunk's K rows are
// prefetched over the channel steps (and the first chunk's V rows; later chunks' V rows in the
// value pass before them). About 20% faster than attend_avx2 on one core with K and V in L2
// (bench/README.md).
template <DType type, int G>
__attribute__((target(KVK_AVX512))) void attend_avx512(const void* k, const void* v, int64_t n,
                                                       int d, const float* q, float scale,
                                                       const float* bias, float* out) {
  constexpr int R = kLanes / G;  // keys per block
  static_assert(R * G == kLanes && kChunk % R == 0);
  alignas(64) float s[G][kChunk];
  float m[G], l[G];
  std::fill(m, m + G, -INFINITY);
  std::fill(l, l + G, 0.0f);
  std::fill(out, out + G * d, 0.0f);
  const size_t row_bytes = size_t(d) * dtype_size(type);
  const size_t steps = size_t(d / kLanes);
  const size_t lines_per_step = ((R * row_bytes + 63) / 64 + steps - 1) / steps;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t C = std::min(kChunk, n - c0);
    for (int64_t j = 0; j < C; j += R) {
      const int rows = int(std::min<int64_t>(R, C - j));
      const char* vblock = static_cast<const char*>(v) + size_t(c0 + j) * row_bytes;
      const int64_t ahead = c0 + j + kChunk;
      const char* kblock =
          ahead < n ? static_cast<const char*>(k) + size_t(ahead) * row_bytes : nullptr;
      const size_t vbytes = c0 == 0 ? size_t(rows) * row_bytes : 0;
      const size_t kbytes = ahead < n ? size_t(std::min<int64_t>(R, n - ahead)) * row_bytes : 0;
      size_t line = 0;
      v16 acc[kLanes];  // acc[g * R + r]: query g against key j + r
      for (v16& a : acc) a = v16{};
      for (int i = 0; i < d; i += kLanes) {
        for (const size_t end = line + lines_per_step * 64; line < end; line += 64) {
          if (line < vbytes) __builtin_prefetch(vblock + line, 0, kIntoL2);
          if (line < kbytes) __builtin_prefetch(kblock + line, 0, kIntoL2);
        }
        v16 kr[R];
        for (int r = 0; r < R; ++r)
          kr[r] = r < rows ? load_row16<type>(k, (c0 + j + r) * d + i) : v16{};
        for (int g = 0; g < G; ++g) {
          const v16 qv = load16(q + g * d + i);
          for (int r = 0; r < R; ++r) acc[g * R + r] += qv * kr[r];
        }
      }
      // Lanes g * R .. g * R + R - 1 are query g's scores of keys j .. j + R - 1 (those past C
      // land in s beyond the chunk's C entries, which nothing reads).
      alignas(64) float t[kLanes];
      store16(t, sum_lanes_16(acc) * scale);
      for (int g = 0; g < G; ++g) std::memcpy(&s[g][j], t + g * R, sizeof(float) * R);
      if (bias)
        for (int g = 0; g < G; ++g)
          for (int r = 0; r < rows; ++r) s[g][j + r] += bias[c0 + j + r];
    }
    float unused[G];
    softmax_chunk<G>(s, C, m, l, out, d, unused);
    const int64_t next = c0 + kChunk;
    add_values_avx512<type, G>(v, c0, C, d, s, out,
                               static_cast<const char*>(v) + size_t(next) * row_bytes,
                               next < n ? size_t(std::min(kChunk, n - next)) * row_bytes : 0);
  }
  normalize_outputs(out, l, G, d);
}

// One pass of G query heads: the AVX-512 scores where `wide`, else the AVX2 kernel.
template <DType type, int G>
void attend_pass(bool wide, const void* k, const void* v, int64_t n, int d, const float* q,
                 float scale, const float* bias, float* out) {
  if (wide) return attend_avx512<type, G>(k, v, n, d, q, scale, bias, out);
  attend_avx2<type, G>(k, v, n, d, q, scale, bias, out);
}

template <DType type>
void attend_group(const void* k, const void* v, int64_t n, int d, const float* q, int G,
                  float scale, const float* bias, float* out) {
  // Passes of 8, 4, 2 or 1 query heads: the common GQA groups run in one pass over K and V.
  const bool wide = have_avx512() && d > 0 && d % kLanes == 0;
  for (int g0 = 0; g0 < G;) {
    const int left = G - g0, g = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const float* qg = q + int64_t(g0) * d;
    float* og = out + int64_t(g0) * d;
    switch (g) {
      case 8:
        attend_pass<type, 8>(wide, k, v, n, d, qg, scale, bias, og);
        break;
      case 4:
        attend_pass<type, 4>(wide, k, v, n, d, qg, scale, bias, og);
        break;
      case 2:
        attend_pass<type, 2>(wide, k, v, n, d, qg, scale, bias, og);
        break;
      default:
        attend_pass<type, 1>(wide, k, v, n, d, qg, scale, bias, og);
        break;
    }
    g0 += g;
  }
}

}  // namespace

void attend_head(DType type, const void* k, const void* v, int64_t n, int d, const float* q, int G,
                 float scale, const float* bias, float* out) {
  if (!have_avx2_f16c() || d % 8 != 0)
    return attend_scalar(type, k, v, n, d, q, G, scale, bias, out);
  switch (type) {
    case DType::f32:
      return attend_group<DType::f32>(k, v, n, d, q, G, scale, bias, out);
    case DType::f16:
      return attend_group<DType::f16>(k, v, n, d, q, G, scale, bias, out);
    case DType::bf16:
      return attend_group<DType::bf16>(k, v, n, d, q, G, scale, bias, out);
  }
}

void attend_head_reference(DType type, const void* k, const void* v, int64_t n, int d,
                           const float* q, int G, float scale, const float* bias, float* out) {
  attend_scalar(type, k, v, n, d, q, G, scale, bias, out);
}

}  // namespace kvk
