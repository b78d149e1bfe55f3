// Decode attention over K and V stored as llama.cpp's q4_0 blocks, computed on the 4-bit codes
// with AVX-512 VNNI integer dot products (vpdpbusd: 4 u8 x s8 products summed into an int32
// lane), the way a runtime serving a quantized cache would, so the cache is read at 4.5 bits per
// value instead of 16 and the arithmetic runs at integer rate.
//
// A block holds 32 values: an f16 scale d and 16 bytes of codes c, value = d (c - 8), element
// t < 16 in the low nibble of byte t and element 16 + t in its high nibble. Rows of d values are
// d/32 whole blocks.
//
// Scores (q . k). Each query is quantized to 8 bits per block of 32 (llama.cpp's q8_0: scale
// s = max|q| / 127), so q . k = sum over blocks of d s (sum_t c_t q8_t - 8 sum_t q8_t). Sixteen
// keys are done at once with one key per int32 lane: the 4-byte words of their code blocks are
// transposed (lane L holds key pi(L) = L/4 + 4 (L%4)), each word then splits into the 4 low and
// the 4 high nibbles, and one vpdpbusd per half dots them with the matching 4 query bytes of
// every lane. The result comes out as a vector of 16 scores, with no horizontal sums.
//
// Values (sum_j p_j v_j). For each block, the weight of key j is w_j = p_j d_j; per chunk of
// keys, query and block it is rounded to s8 against a bound on |w|: scale a = max_j p_j *
// max_j |d_j| / 127, the two maxima over the chunk's keys.
// Four keys' codes are transposed so that lane t holds channel t of the four keys (vpermb),
// and one vpdpbusd per half block adds 4 keys' sum_j c_jt wq_j to channel t: out_t += a (that
// sum - 8 sum_j wq_j).
//
// Both roundings make the result differ slightly from attention over the decoded values
// (attend_head_q4_0_reference); tests/unit/test_gemm.cpp bounds the difference and
// bench-decode-attention reports it. Keys and values past the last whole group of 16 (or 4) in
// a chunk are done in f32 from their decoded values.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kvk/ops.h"
#include "simd512.h"

namespace kvk {

namespace {

constexpr int kBlockValues = 32, kBlockBytes = 18;

// One row's d values decoded to f32.
void decode_row(const uint8_t* row, int d, float* out) {
  for (int b = 0; b < d / kBlockValues; ++b) {
    const uint8_t* blk = row + b * kBlockBytes;
    uint16_t h;
    std::memcpy(&h, blk, 2);
    const float scale = f16_to_f32(h);
    for (int t = 0; t < 16; ++t) {
      out[b * 32 + t] = float((blk[2 + t] & 15) - 8) * scale;
      out[b * 32 + 16 + t] = float((blk[2 + t] >> 4) - 8) * scale;
    }
  }
}

// The queries as q8_0, arranged for the score loop: for query g and block b, the 4-byte words
// word[g][b][w] (w < 4: elements 4w..4w+3, the low nibbles' partners; w >= 4: elements
// 16+4(w-4).., the high nibbles'), the scale and 8 * the sum of the codes.
struct QuantizedQueries {
  std::vector<int32_t> word;  // [G][nb][8]
  std::vector<float> scale;   // [G][nb]
  std::vector<float> offset;  // [G][nb]: 8 * sum of the block's 32 codes
};

QuantizedQueries quantize_queries(const float* q, int G, int d) {
  const int nb = d / kBlockValues;
  QuantizedQueries out;
  out.word.resize(size_t(G) * size_t(nb) * 8);
  out.scale.resize(size_t(G) * size_t(nb));
  out.offset.resize(out.scale.size());
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < nb; ++b) {
      const float* x = q + g * d + b * kBlockValues;
      float amax = 0;
      for (int t = 0; t < kBlockValues; ++t) amax = std::max(amax, std::fabs(x[t]));
      const float s = amax / 127, inv = s > 0 ? 1 / s : 0;
      int8_t codes[kBlockValues];
      int sum = 0;
      for (int t = 0; t < kBlockValues; ++t) sum += codes[t] = int8_t(std::nearbyint(x[t] * inv));
      std::memcpy(&out.word[(size_t(g) * nb + b) * 8], codes, kBlockValues);
      out.scale[size_t(g) * nb + b] = s;
      out.offset[size_t(g) * nb + b] = 8.0f * float(sum);
    }
  return out;
}

// 16 rows' block scales (f16 d at base + offsets[L]) as f32.
__attribute__((target(KVK_CODES_TARGET), always_inline)) inline __m512 block_scales(
    const uint8_t* base, __m512i offsets) {
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(offsets, base, 1)));
}

// The block scales of 16 rows of nb <= 4 blocks each (rows rb bytes apart) without gathers (a
// 16-lane gather cost about 19 cycles here, 1.3 ns a key for the scores alone): a row's scales
// are its 16-bit words 0, 9, 18 and 27, so one load per row, a word permute per pair of rows
// into 128 bits, and two permutes of the eight pairs give, for each block, its 16 rows' scales in
// the lane order the index vectors were made for.
struct RowScales {
  __m512i pair;       // rows 2k, 2k + 1 -> words 2b + e (block b of row 2k + e)
  __m512i blocks[2];  // the pairs' words -> blocks 0 and 1, then 2 and 3, 16 rows each
  __mmask64 bytes;    // of a row, up to its last scale

  // lane_row[L]: the row of the 16 whose scale lane L gets.
  __attribute__((target(KVK_CODES_TARGET))) RowScales(int nb, const int (&lane_row)[16]) {
    alignas(64) uint16_t idx[3][32] = {};
    for (int b = 0; b < 4; ++b)
      for (int e = 0; e < 2; ++e) idx[0][2 * b + e] = uint16_t(32 * e + 9 * b);
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 32; ++i) {
        const int b = 2 * h + i / 16, r = lane_row[i % 16], k = r / 2;
        idx[1 + h][i] = uint16_t((k < 4 ? 8 * k : 32 + 8 * (k - 4)) + 2 * b + r % 2);
      }
    pair = _mm512_load_si512(idx[0]);
    blocks[0] = _mm512_load_si512(idx[1]);
    blocks[1] = _mm512_load_si512(idx[2]);
    bytes = ~uint64_t(0) >> (64 - (kBlockBytes * (nb - 1) + 2));
  }
};

__attribute__((target(KVK_CODES_TARGET), always_inline)) inline void row_scales(const RowScales& rs,
                                                                                const uint8_t* rows,
                                                                                size_t rb,
                                                                                __m512 (&out)[4]) {
  __m512i half[2];
  for (int h = 0; h < 2; ++h) {
    __m128i pairs[4];
    for (int k = 0; k < 4; ++k) {
      const uint8_t* r = rows + size_t(2 * (4 * h + k)) * rb;
      pairs[k] = _mm512_castsi512_si128(
          _mm512_permutex2var_epi16(_mm512_maskz_loadu_epi8(rs.bytes, r), rs.pair,
                                    _mm512_maskz_loadu_epi8(rs.bytes, r + rb)));
    }
    half[h] = _mm512_inserti32x4(
        _mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(pairs[0]), pairs[1], 1),
                           pairs[2], 2),
        pairs[3], 3);
  }
  for (int h = 0; h < 2; ++h) {
    const __m512i words = _mm512_permutex2var_epi16(half[0], rs.blocks[h], half[1]);
    out[2 * h] = _mm512_cvtph_ps(_mm512_castsi512_si256(words));
    out[2 * h + 1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(words, 1));
  }
}

// Rows [0, C4) of a chunk's value scales of blocks [b0, b1) into dst[b - b0]: by permutes where
// rs is given (b1 <= 4), else by a gather per 16 rows (b1 = b0 + 1); the rows past the last
// whole 16 one by one.
__attribute__((target(KVK_CODES_TARGET), always_inline)) inline void value_scales(
    const uint8_t* vc, size_t rb, int64_t C4, int b0, int b1, const RowScales* rs,
    __m512i row_offsets, float (*dst)[kChunk]) {
  for (int64_t r = 0; r < C4; r += 16) {
    if (C4 - r >= 16 && rs) {
      __m512 ds[4];
      row_scales(*rs, vc + size_t(r) * rb, rb, ds);
      for (int b = b0; b < b1; ++b) _mm512_store_ps(dst[b - b0] + r, ds[b]);
    } else if (C4 - r >= 16) {
      _mm512_store_ps(dst[0] + r,
                      block_scales(vc + size_t(r) * rb + b0 * kBlockBytes, row_offsets));
    } else {
      for (int b = b0; b < b1; ++b)
        for (int64_t e = r; e < C4; ++e) {
          uint16_t h;
          std::memcpy(&h, vc + size_t(e) * rb + b * kBlockBytes, 2);
          dst[b - b0][e] = f16_to_f32(h);
        }
    }
  }
}

// 16 bytes at p, p + stride, p + 2 stride and p + 3 stride, in the four 128-bit lanes.
__attribute__((target(KVK_CODES_TARGET), always_inline)) inline __m512i load_4x16(const uint8_t* p,
                                                                                  size_t stride) {
  auto at = [&](size_t r) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + r * stride));
  };
  __m512i z = _mm512_castsi128_si512(at(0));
  z = _mm512_inserti32x4(z, at(1), 1);
  z = _mm512_inserti32x4(z, at(2), 2);
  return _mm512_inserti32x4(z, at(3), 3);
}

template <int G>
__attribute__((target(KVK_CODES_TARGET))) void attend_q4_0(const uint8_t* k, const uint8_t* v,
                                                           int64_t n, int d, const float* q,
                                                           float scale, const float* bias,
                                                           float* out) {
  const int nb = d / kBlockValues;
  const size_t rb = size_t(nb) * kBlockBytes;
  const QuantizedQueries qq = quantize_queries(q, G, d);
  alignas(64) float s[G][kChunk];
  alignas(64) int8_t wq[G][kChunk];  // in pack_4x16's order in a whole chunk
  alignas(64) float dv[4][kChunk];   // the chunk's value scales, block by block
  std::vector<float> row(static_cast<size_t>(d));
  float m[G], l[G];
  std::fill(m, m + G, -INFINITY);
  std::fill(l, l + G, 0.0f);
  std::fill(out, out + G * d, 0.0f);
  // pi(L) = L/4 + 4 (L%4): the key in lane L after the word transpose (its own inverse).
  const __m512i pi = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i pi_offsets = _mm512_mullo_epi32(pi, _mm512_set1_epi32(int(rb)));
  const __m512i row_offsets =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(int(rb)));
  // Byte 4t + r of the result is byte 16r + t of the input: channel t of 4 keys in one lane.
  alignas(64) uint8_t to_lanes[64];
  for (int t = 0; t < 16; ++t)
    for (int r = 0; r < 4; ++r) to_lanes[4 * t + r] = uint8_t(16 * r + t);
  const __m512i lanes_index = _mm512_load_si512(to_lanes);
  const __m512i nibble = _mm512_set1_epi8(15), ones = _mm512_set1_epi8(1);
  // Up to 4 blocks a row (d <= 128) the scales come by permutes (RowScales), beyond by gathers.
  const bool permuted_scales = nb <= 4;
  const int natural[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int pi_rows[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const RowScales by_row(std::min(nb, 4), natural), by_pi(std::min(nb, 4), pi_rows);

  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t C = std::min(kChunk, n - c0);
    const uint8_t* kc = k + size_t(c0) * rb;
    const uint8_t* vc = v + size_t(c0) * rb;
    // Scores, 16 keys at a time.
    int64_t j = 0;
    for (; j + 16 <= C; j += 16) {
      const uint8_t* base = kc + size_t(j) * rb;
      // No software prefetch: with the block scales read row by row (row_scales), the hardware
      // prefetchers follow K and V; prefetching the next chunk's 16 keys into L2 ran 6-7% slower
      // from memory (bench/README.md).
      __m512 dks[4];  // the 16 keys' block scales, lanes in the order pi
      if (permuted_scales) row_scales(by_pi, base, rb, dks);
      __m512 score[G];
      for (int g = 0; g < G; ++g) score[g] = _mm512_setzero_ps();
      for (int b = 0; b < nb; ++b) {
        const uint8_t* codes = base + b * kBlockBytes + 2;
        __m512i z[4];  // z[i]: keys 4i..4i+3, one per 128-bit lane
        for (int i = 0; i < 4; ++i) {
          z[i] = load_4x16(codes + size_t(4 * i) * rb, rb);
        }
        // The 4x4 transpose of words inside each lane: word w of 16 keys, key pi(L) in lane L.
        const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]),
                      t1 = _mm512_unpackhi_epi32(z[0], z[1]);
        const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]),
                      t3 = _mm512_unpackhi_epi32(z[2], z[3]);
        const __m512i word[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                                 _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
        __m512i acc[G];
        for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_si512();
        for (int w = 0; w < 4; ++w) {
          const __m512i lo = _mm512_and_si512(word[w], nibble);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(word[w], 4), nibble);
          for (int g = 0; g < G; ++g) {
            const int32_t* qw = &qq.word[(size_t(g) * nb + b) * 8];
            acc[g] = _mm512_dpbusd_epi32(acc[g], lo, _mm512_set1_epi32(qw[w]));
            acc[g] = _mm512_dpbusd_epi32(acc[g], hi, _mm512_set1_epi32(qw[4 + w]));
          }
        }
        const __m512 dk =
            permuted_scales ? dks[b] : block_scales(base + b * kBlockBytes, pi_offsets);
        for (int g = 0; g < G; ++g) {
          const size_t gb = size_t(g) * nb + b;
          const __m512 dots =
              _mm512_sub_ps(_mm512_cvtepi32_ps(acc[g]), _mm512_set1_ps(qq.offset[gb]));
          score[g] =
              _mm512_fmadd_ps(dots, _mm512_mul_ps(dk, _mm512_set1_ps(qq.scale[gb])), score[g]);
        }
      }
      for (int g = 0; g < G; ++g) {
        __m512 x = _mm512_mul_ps(_mm512_permutexvar_ps(pi, score[g]), _mm512_set1_ps(scale));
        if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + c0 + j));
        _mm512_store_ps(&s[g][j], x);
      }
    }
    for (; j < C; ++j) {  // the last few keys, in f32
      decode_row(kc + size_t(j) * rb, d, row.data());
      for (int g = 0; g < G; ++g) {
        float dot = 0;
        for (int i = 0; i < d; ++i) dot += q[g * d + i] * row[size_t(i)];
        s[g][j] = dot * scale + (bias ? bias[c0 + j] : 0.0f);
      }
    }
    float pmax[G];  // each query's largest weight in the chunk
    softmax_chunk<G>(s, C, m, l, out, d, pmax);
    // Values, block by block: 4 keys per step, the group's accumulators in registers.
    const int64_t C4 = C & ~int64_t(3);
    __mmask16 live[kChunk / 16];  // the keys of each vector of 16 that the value path takes
    for (int64_t jj = 0; jj < C4; jj += 16)
      live[jj / 16] = jj + 16 <= C4 ? __mmask16(0xffff) : __mmask16((1u << (C4 - jj)) - 1);
    float pinv[G];
    for (int g = 0; g < G; ++g) pinv[g] = pmax[g] > 0 ? 1 / pmax[g] : 0;
    // The chunk's value scales: every block's at once by permutes, or one block's at a time
    // (in the block loop) by gathers.
    if (permuted_scales) value_scales(vc, rb, C4, 0, nb, &by_row, row_offsets, dv);
    for (int b = 0; b < nb; ++b) {
      if (!permuted_scales) value_scales(vc, rb, C4, b, b + 1, nullptr, row_offsets, dv);
      const float* dvb = dv[permuted_scales ? b : 0];
      // w = p d rounded to s8 against a bound on |w|, pmax_g max_j |d_j| (a search for the
      // largest |w| itself, a reduction and a division per query, sat on the critical path).
      __m512 dabs = _mm512_setzero_ps();
      for (int64_t jj = 0; jj < C4; jj += 16)
        dabs = _mm512_max_ps(dabs, _mm512_abs_ps(_mm512_maskz_load_ps(live[jj / 16], dvb + jj)));
      const float dmax = _mm512_reduce_max_ps(dabs), dinv = dmax > 0 ? 127 / dmax : 0;
      float weight_scale[G], weight_offset[G];
      for (int g = 0; g < G; ++g) {
        weight_scale[g] = pmax[g] * dmax / 127;
        const __m512 inv = _mm512_set1_ps(dinv * pinv[g]);
        if (C4 == kChunk) {  // a whole chunk: four vectors packed at once (pack_4x16's order)
          __m512i code[4];
          for (int u = 0; u < 4; ++u)
            code[u] = _mm512_cvtps_epi32(_mm512_mul_ps(
                _mm512_mul_ps(_mm512_load_ps(&s[g][16 * u]), _mm512_load_ps(dvb + 16 * u)), inv));
          const __m512i packed = pack_4x16<true>(code[0], code[1], code[2], code[3]);
          _mm512_store_si512(wq[g], packed);
          weight_offset[g] = 8.0f * float(_mm512_reduce_add_epi32(
                                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, packed)));
          continue;
        }
        __m512i sum = _mm512_setzero_si512();
        for (int64_t jj = 0; jj < C4; jj += 16) {
          const __m512 w = _mm512_mul_ps(_mm512_maskz_load_ps(live[jj / 16], &s[g][jj]),
                                         _mm512_maskz_load_ps(live[jj / 16], dvb + jj));
          // Rounded to nearest even (the default MXCSR mode), as std::nearbyint.
          const __m512i code = _mm512_cvtps_epi32(_mm512_mul_ps(w, inv));
          sum = _mm512_add_epi32(sum, code);
          _mm_mask_storeu_epi8(&wq[g][jj], live[jj / 16], _mm512_cvtsepi32_epi8(code));
        }
        weight_offset[g] = 8.0f * float(_mm512_reduce_add_epi32(sum));
      }
      __m512i acc_lo[G], acc_hi[G];
      for (int g = 0; g < G; ++g) acc_lo[g] = acc_hi[g] = _mm512_setzero_si512();
      for (int64_t jj = 0; jj < C4; jj += 4) {
        const uint8_t* codes = vc + size_t(jj) * rb + b * kBlockBytes + 2;
        const __m512i z = load_4x16(codes, rb);
        const __m512i t = _mm512_permutexvar_epi8(lanes_index, z);  // one permute for both halves
        const __m512i lo = _mm512_and_si512(t, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(t, 4), nibble);
        // The weights of keys jj .. jj + 3: in pack_4x16's order in a whole chunk.
        const int64_t word = C4 == kChunk ? packed_word(int(jj / 4)) : jj / 4;
        for (int g = 0; g < G; ++g) {
          // (A broadcast from memory: one load, no trip through a general register.)
          const __m512i w = _mm512_broadcastd_epi32(_mm_loadu_si32(&wq[g][4 * word]));
          acc_lo[g] = _mm512_dpbusd_epi32(acc_lo[g], lo, w);
          acc_hi[g] = _mm512_dpbusd_epi32(acc_hi[g], hi, w);
        }
      }
      for (int g = 0; g < G; ++g) {
        float* o = out + g * d + b * kBlockValues;
        const __m512 a = _mm512_set1_ps(weight_scale[g]), off = _mm512_set1_ps(weight_offset[g]);
        _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(acc_lo[g]), off), a,
                                            _mm512_loadu_ps(o)));
        _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(acc_hi[g]), off),
                                                 a, _mm512_loadu_ps(o + 16)));
      }
    }
    for (int64_t jj = C4; jj < C; ++jj) {  // the last few values, in f32
      decode_row(vc + size_t(jj) * rb, d, row.data());
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < d; ++i) out[g * d + i] += s[g][jj] * row[size_t(i)];
    }
  }
  normalize_outputs(out, l, G, d);
}

}  // namespace

size_t q4_0_row_bytes(int d) {
  return size_t(d / kBlockValues) * kBlockBytes;
}

void attend_head_q4_0_reference(const uint8_t* k, const uint8_t* v, int64_t n, int d,
                                const float* q, int G, float scale, const float* bias, float* out) {
  // The n*d values as one run of blocks (libkv's layout for any d; for d % 32 == 0 each row is
  // d/32 whole blocks, as the kernel reads them).
  const int64_t values = n * d, blocks = (values + kBlockValues - 1) / kBlockValues;
  std::vector<float> k32(size_t(blocks) * kBlockValues), v32(k32.size());
  for (int64_t b = 0; b < blocks; ++b) {
    decode_row(k + size_t(b) * kBlockBytes, kBlockValues, k32.data() + b * kBlockValues);
    decode_row(v + size_t(b) * kBlockBytes, kBlockValues, v32.data() + b * kBlockValues);
  }
  attend_head_reference(DType::f32, k32.data(), v32.data(), n, d, q, G, scale, bias, out);
}

bool q4_0_codes_supported(int d) {
  return have_avx512_vnni_vbmi() && d > 0 && d % kBlockValues == 0;
}

void attend_head_q4_0(const uint8_t* k, const uint8_t* v, int64_t n, int d, const float* q, int G,
                      float scale, const float* bias, float* out) {
  if (!q4_0_codes_supported(d))
    return attend_head_q4_0_reference(k, v, n, d, q, G, scale, bias, out);
  for (int i = 0; i < G * d; ++i)
    if (!std::isfinite(q[i])) {  // as the reference: no finite output (and no int8 of a NaN)
      std::fill(out, out + G * d, NAN);
      return;
    }
  // Passes of 8, 4, 2 or 1 query heads, as attend_head.
  for (int g0 = 0; g0 < G;) {
    const int left = G - g0, g = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const float* qg = q + int64_t(g0) * d;
    float* og = out + int64_t(g0) * d;
    if (g == 8) attend_q4_0<8>(k, v, n, d, qg, scale, bias, og);
    if (g == 4) attend_q4_0<4>(k, v, n, d, qg, scale, bias, og);
    if (g == 2) attend_q4_0<2>(k, v, n, d, qg, scale, bias, og);
    if (g == 1) attend_q4_0<1>(k, v, n, d, qg, scale, bias, og);
    g0 += g;
  }
}

}  // namespace kvk
