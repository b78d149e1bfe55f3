// Decode attention over a KIVI-2 cache computed on its 2-bit codes with AVX-512 VNNI integer dot
// products, so a step reads about 3 bits per value instead of 16 (formats/kvsnap.md 9.3).
//
// Keys are quantized per channel in groups of 32 rows: k[t][c] = S[c] code[t][c] + Z[c] within a
// group, so for each query q . k[t] = sum_c (q[c] S[c]) code[t][c] + sum_c q[c] Z[c]. Per group
// and query, a = q S is rounded to s8 against max |a| (one scale per group and query) and the
// second sum is a constant of the group (with 1.5 times the sum of a's rounding residuals: the
// part of their error that every row shares). A group's codes are, channel by channel, a 64-bit
// word of its 32 rows (row i in bits 2i, 2i+1). One vpermb moves into each int32 lane the 4 bytes
// of one row quartet of 4 channels, and one 64-bit shift and a mask keep, in every byte, the 2
// bits of the lane's row (the same row within its quartet for both lanes of a 64-bit word: the
// lanes hold the rows in the order score_row, undone once per 16 scores). One vpdpbusd then adds
// 4 channels of 16 rows to 16 scores: no horizontal sums.
//
// Values are quantized per row in blocks of 32 channels: v[t][c] = S[t] code[t][c] + Z[t], so
// sum_t p_t v[t][c] = sum_t (p_t S[t]) code[t][c] + sum_t p_t Z[t]. Per chunk of 64 rows, query
// and block, w = p S is rounded to u8 against max p * max S (as the q4_0 kernel does). For a row
// quartet and a pair of blocks, one vpermt2b puts byte i of block 2 pr + e of the 4 rows into
// int32 lane 2i + e; a shift and a mask pick channel 4i + s of every byte, and one vpdpbusd per s
// adds the 4 rows' weighted codes, the weights of both blocks broadcast as one 64-bit word. The
// codes count as centred, 2c - 3 (v = (S/2)(2c - 3) + Z + 1.5 S, weights p S / 2), so that the
// weights' rounding errors cancel on average: sum_t w_t (2 c_t - 3) = 2 acc - 3 sum_t w_t, in
// integers. The accumulators stay in that lane order (channel 32 (2 pr + e) + 4i + s), and so
// does the running output, until the end. The zero term is summed in float, per lane.
//
// Whole groups of 64 rows take this path; the last few quantized rows and the residual rows
// (dense f16) are done in f32 from their decoded values, in the same online softmax.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kvk/ops.h"
#include "simd512.h"

namespace kvk {

namespace {

constexpr int kGroupRows = 32;  // key rows per scale (KIVI's G)
constexpr int kBlock = 32;      // value channels per scale
static_assert(kChunk == 2 * kGroupRows, "a chunk is two key groups");

int code_at(const uint8_t* codes, int64_t i) {
  return (codes[i / 4] >> (2 * (i % 4))) & 3;
}

// Rows [row0, row0 + count) of the head decoded to f32, K and V: quantized rows as kv::encoding
// decodes them (y = f32(c S + Z), or (c - 2) S when symmetric), then the residual rows.
void decode_rows(const Kivi2Head& h, int d, int64_t row0, int64_t count, float* k, float* v) {
  const int nb = d / kBlock;
  const int64_t quantized = std::clamp<int64_t>(h.n_quant - row0, 0, count);
  if (const int64_t dense = count - quantized; dense > 0) {  // residual rows: one run each
    const size_t at = size_t(row0 + quantized - h.n_quant) * size_t(d);
    cpu_ops().to_f32(DType::f16, h.k_residual + at, k + quantized * d, size_t(dense * d));
    cpu_ops().to_f32(DType::f16, h.v_residual + at, v + quantized * d, size_t(dense * d));
  }
  for (int64_t r = 0; r < quantized; ++r) {
    const int64_t t = row0 + r;
    float* kr = k + r * d;
    float* vr = v + r * d;
    const int64_t j = t / kGroupRows, i = t % kGroupRows;
    const int64_t len = std::min<int64_t>(kGroupRows, h.n_quant - j * kGroupRows);
    for (int c = 0; c < d; ++c) {
      const int code = code_at(h.k_codes, j * kGroupRows * d + c * len + i);
      const float s = f16_to_f32(h.k_scales[j * d + c]);
      kr[c] = h.k_zeros ? float(code) * s + f16_to_f32(h.k_zeros[j * d + c]) : float(code - 2) * s;
    }
    for (int c = 0; c < d; ++c) {
      const int code = code_at(h.v_codes, t * d + c);
      const float s = f16_to_f32(h.v_scales[t * nb + c / kBlock]);
      vr[c] = h.v_zeros ? float(code) * s + f16_to_f32(h.v_zeros[t * nb + c / kBlock])
                        : float(code - 2) * s;
    }
  }
}

// Where channel c sits in a query's running output, the value accumulators' order: the pair of
// blocks, then s = c % 4, then lane 2i + e for i = (c % 32) / 4 and e the block within the pair.
int lane_of(int c) {
  const int blk = c / kBlock;
  return (blk / 2 * 4 + c % 4) * 16 + 2 * ((c % kBlock) / 4) + blk % 2;
}

// The row of a 16-row half group that int32 lane L = 2k + e of the score accumulators holds:
// the two rows of a 64-bit word share their place in a quartet (k % 4), so one 64-bit shift
// brings both codes down.
constexpr int score_row(int L) {
  return 4 * (2 * ((L / 2) / 4) + L % 2) + (L / 2) % 4;
}

template <int G>
struct State {
  float m[G], l[G];
  std::vector<float> out;  // per query: 64 lanes per pair of value blocks (lane_of), then 16
                           // zero-term lanes per block
  int stride;
};

// Rows [row0, row0 + count) (count <= kChunk) in f32 from their decoded values, into the state:
// the residual rows (128 of them by default, so worth vectors), and quantized rows past the last
// whole chunk.
template <int G>
__attribute__((target(KVK_CODES_TARGET))) void add_rows_f32(const Kivi2Head& h, int d, int64_t row0,
                                                            int64_t count, const float* q,
                                                            float scale, const float* bias,
                                                            State<G>& st) {
  alignas(64) float k[kChunk * 128], v[kChunk * 128];  // d <= 128
  decode_rows(h, d, row0, count, k, v);
  alignas(64) float s[G][kChunk];
  for (int g = 0; g < G; ++g)
    for (int64_t j = 0; j < count; ++j) {
      __m512 dot = _mm512_setzero_ps();
      for (int c = 0; c < d; c += 16)
        dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + c), _mm512_load_ps(k + j * d + c), dot);
      s[g][j] = _mm512_reduce_add_ps(dot) * scale + (bias ? bias[row0 + j] : 0.0f);
    }
  float unused[G];
  softmax_chunk<G>(s, count, st.m, st.l, st.out.data(), st.stride, unused);
  for (int g = 0; g < G; ++g) {
    float* o = st.out.data() + size_t(g) * size_t(st.stride);
    for (int c = 0; c < d; c += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < count; ++j)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(s[g][j]), _mm512_load_ps(v + j * d + c), acc);
      alignas(64) float sum[16];
      _mm512_store_ps(sum, acc);
      for (int e = 0; e < 16; ++e) o[lane_of(c + e)] += sum[e];
    }
  }
}

// The first of the two words of a pair's weights (wq) for row quartet q (rows 4q .. 4q + 3 of
// the chunk): block A's, then block B's.
constexpr int pair_word(int q) {
  return q / 8 * 16 + 4 * (q % 4) + 2 * (q % 8 / 4);
}

// Key group grp's constants for the G queries q: a = q S rounded to s8 against
// max |a| (a8, in pack_4x16's order), the dot products' scale sa and the group's constant qz.
// The rounding residuals r = a - step a8 shift each row's dot by sum_c r_c c; their part
// 1.5 sum_c r_c (codes average 1.5) goes back in with the constant sum_c q Z:
// qz = sum_c q (Z + 1.5 S) - 1.5 step sum_c a8.
template <int G>
__attribute__((target(KVK_CODES_TARGET), always_inline)) inline void prepare_group(
    const Kivi2Head& h, int d, int64_t grp, const float* q, float scale, int32_t (&a8)[G][32],
    float (&sa)[G], float (&qz)[G]) {
  const int vectors = d / 16;
  const uint16_t* ks = h.k_scales + grp * d;
  const uint16_t* kz = h.k_zeros ? h.k_zeros + grp * d : nullptr;
  __m512 sf[8], zf[8];
  for (int i = 0; i < vectors; ++i) {
    sf[i] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ks + 16 * i)));
    zf[i] =
        kz ? _mm512_fmadd_ps(
                 sf[i], _mm512_set1_ps(1.5f),
                 _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kz + 16 * i))))
           : _mm512_mul_ps(sf[i], _mm512_set1_ps(-0.5f));
  }
  for (int g = 0; g < G; ++g) {
    // a = q S once, kept in registers for the rounding.
    __m512 a[8], amax = _mm512_setzero_ps(), z = _mm512_setzero_ps();
    for (int i = 0; i < vectors; ++i) {
      const __m512 qv = _mm512_loadu_ps(q + g * d + 16 * i);
      a[i] = _mm512_mul_ps(qv, sf[i]);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(a[i]));
      z = _mm512_fmadd_ps(qv, zf[i], z);
    }
    const float mx = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(mx > 0 ? 127 / mx : 0);
    __m512i code_sum = _mm512_setzero_si512();  // sum_c a8_c, 4 bytes per lane
    for (int i = 0; i < vectors; i += 4) {
      __m512i code[4];
      for (int u = 0; u < 4; ++u)
        code[u] = i + u < vectors ? _mm512_cvtps_epi32(_mm512_mul_ps(a[i + u], inv))
                                  : _mm512_setzero_si512();
      const __m512i packed = pack_4x16<true>(code[0], code[1], code[2], code[3]);
      _mm512_store_si512(&a8[g][4 * i], packed);
      code_sum = _mm512_dpbusd_epi32(code_sum, _mm512_set1_epi8(1), packed);
    }
    sa[g] = mx / 127 * scale;
    qz[g] = _mm512_reduce_add_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(code_sum),
                                                 _mm512_set1_ps(-1.5f * (mx / 127)), z)) *
            scale;
  }
}

template <int G>
__attribute__((target(KVK_CODES_TARGET))) void attend_kivi2(const Kivi2Head& h, int d,
                                                            const float* q, float scale,
                                                            const float* bias, float* out) {
  const int nb = d / kBlock, octets = d / 8;
  State<G> st;
  const int pairs = (nb + 1) / 2;  // of value blocks (an odd last block pairs with nothing)
  st.stride = 64 * pairs + 16 * nb;
  st.out.assign(size_t(G) * size_t(st.stride), 0.0f);
  std::fill(st.m, st.m + G, -INFINITY);
  std::fill(st.l, st.l + G, 0.0f);

  // Score path constants. to_quartets[h4][th]: vpermb index giving lane L the bytes holding row
  // 16 th + score_row(L) of the octet's channels 4 h4 .. 4 h4 + 3.
  __m512i to_quartets[2][2];
  for (int h4 = 0; h4 < 2; ++h4)
    for (int th = 0; th < 2; ++th) {
      alignas(64) uint8_t idx[64];
      for (int L = 0; L < 16; ++L)
        for (int j = 0; j < 4; ++j)
          idx[4 * L + j] = uint8_t(8 * (4 * h4 + j) + (16 * th + score_row(L)) / 4);
      to_quartets[h4][th] = _mm512_load_si512(idx);
    }
  // 64-bit word k holds rows at place k % 4 of their quartets: their codes are bits 2 (k % 4).
  const __m512i row_shift = _mm512_setr_epi64(0, 2, 4, 6, 0, 2, 4, 6);
  const __m512i low_bits = _mm512_set1_epi8(3);
  alignas(64) int32_t unscramble_idx[16];
  for (int L = 0; L < 16; ++L) unscramble_idx[score_row(L)] = L;
  const __m512i unscramble = _mm512_load_si512(unscramble_idx);

  // Value path constants: to_pair[pr] gives lane 2i + e byte r = byte 8 (2 pr + e) + i of row r
  // of a 4-row window (d/4 bytes per row). Past an odd last block, it reads the next row or
  // zeros, weighted 0.
  __m512i to_pair[2];  // pairs <= 2
  for (int pr = 0; pr < pairs; ++pr) {
    alignas(64) uint8_t idx[64];
    for (int lane = 0; lane < 16; ++lane)
      for (int r = 0; r < 4; ++r)
        idx[4 * lane + r] = uint8_t(r * (d / 4) + 8 * (2 * pr + lane % 2) + lane / 2);
    to_pair[pr] = _mm512_load_si512(idx);
  }
  const int row_bytes = d / 4;  // of value codes
  const __m512i ones = _mm512_set1_epi8(1);
  // The two 64-byte halves of a 4-row window of value codes (d bytes).
  const __mmask64 lower = d >= 64 ? ~uint64_t(0) : ~uint64_t(0) >> (64 - d),
                  upper = d > 64 ? ~uint64_t(0) >> (128 - d) : 0;
  // 16 rows' nb value scales (or zeros) are 16 nb f16: two loads, then to_scales[blk] (vpermt2w)
  // picks the block's 16.
  const __mmask32 scales_lo = nb >= 2 ? ~uint32_t(0) : ~uint32_t(0) >> 16,
                  scales_hi = nb > 2 ? ~uint32_t(0) >> (64 - 16 * nb) : 0;
  __m512i to_scales[4];
  for (int blk = 0; blk < nb; ++blk) {
    alignas(64) uint16_t idx[32] = {};
    for (int t = 0; t < 16; ++t) idx[t] = uint16_t(t * nb + blk);
    to_scales[blk] = _mm512_load_si512(idx);
  }

  // Per key group (two buffers: this group's and the next's) and query: q S as s8 in
  // pack_4x16's order, the dot products' scale and the group's constant.
  alignas(64) int32_t a8[2][G][32];
  float sa[2][G], qz[2][G];
  alignas(64) float s[G][kChunk];
  // Per query and pair of blocks, p S as u8 in pack_4x16's order of the vectors (block A rows
  // 0-15, block B rows 0-15, A rows 16-31, B rows 16-31), then the same for rows 32-63: the
  // weights of row quartet Q of both blocks are one 64-bit word (pair_word).
  alignas(64) uint8_t wq[G][2][2 * kChunk];
  alignas(64) float sv[4][kChunk], zv[4][kChunk];

  const int64_t whole = h.n_quant / kChunk * kChunk;
  if (whole > 0) prepare_group<G>(h, d, 0, q, scale, a8[0], sa[0], qz[0]);
  for (int64_t c0 = 0; c0 < whole; c0 += kChunk) {
    // ---- scores, one key group of 32 rows at a time
    const int64_t next = c0 + kChunk;
    const uint16_t* runs[4] = {h.k_scales + next / kGroupRows * d,
                               h.k_zeros ? h.k_zeros + next / kGroupRows * d : nullptr,
                               h.v_scales + next * nb, h.v_zeros ? h.v_zeros + next * nb : nullptr};
    int run = 0, run_line = 0;  // the next scale line to prefetch: runs[run] + 32 run_line
    for (int half = 0; half < 2; ++half) {
      const int64_t grp = c0 / kGroupRows + half;
      const uint8_t* codes = h.k_codes + grp * kGroupRows * d / 4;
      // The next group's, before this group's dot products are issued, to overlap them: the
      // scores of a group wait for these (a chain of reductions and a division).
      if (grp + 1 < whole / kGroupRows)
        prepare_group<G>(h, d, grp + 1, q, scale, a8[(grp + 1) % 2], sa[(grp + 1) % 2],
                         qz[(grp + 1) % 2]);
      const int buf = int(grp % 2);
      __m512i acc[2][G];
      for (int th = 0; th < 2; ++th)
        for (int g = 0; g < G; ++g) acc[th][g] = _mm512_setzero_si512();
      for (int o = 0; o < octets; ++o) {
        // The next chunk, from memory meanwhile, into L2 as the q4_0 kernel does: its key and
        // value codes (16 d bytes each) and its four runs of scales and zeros (4 d bytes
        // each) are d/4 lines each, one of each per octet step of the two groups.
        if (c0 + kChunk < whole) {
          const int line = half * octets + o;
          __builtin_prefetch(h.k_codes + (c0 + kChunk) * d / 4 + 64 * line, 0, 2);
          __builtin_prefetch(h.v_codes + (c0 + kChunk) * row_bytes + 64 * line, 0, 2);
          if (runs[run]) __builtin_prefetch(runs[run] + 32 * run_line, 0, 2);
          if (++run_line == d / 16) run_line = 0, ++run;
        }
        const __m512i src = _mm512_loadu_si512(codes + 64 * o);
        for (int h4 = 0; h4 < 2; ++h4) {
          const int word = packed_word(2 * o + h4);
          for (int th = 0; th < 2; ++th) {
            const __m512i x = _mm512_and_si512(
                _mm512_srlv_epi64(_mm512_permutexvar_epi8(to_quartets[h4][th], src), row_shift),
                low_bits);
            for (int g = 0; g < G; ++g)
              acc[th][g] = _mm512_dpbusd_epi32(acc[th][g], x, _mm512_set1_epi32(a8[buf][g][word]));
          }
        }
      }
      for (int th = 0; th < 2; ++th) {
        const int64_t at = half * kGroupRows + th * 16;
        for (int g = 0; g < G; ++g) {
          __m512 x =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_permutexvar_epi32(unscramble, acc[th][g])),
                              _mm512_set1_ps(sa[buf][g]), _mm512_set1_ps(qz[buf][g]));
          if (bias) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + c0 + at));
          _mm512_store_ps(&s[g][at], x);
        }
      }
    }
    float pmax[G];
    softmax_chunk<G>(s, kChunk, st.m, st.l, st.out.data(), st.stride, pmax);

    // ---- the chunk's value scales, block by block, and the weights p S as u8
    const uint16_t* vs = h.v_scales + c0 * nb;
    const uint16_t* vz = h.v_zeros ? h.v_zeros + c0 * nb : nullptr;
    __m512 smax[4];
    for (int blk = 0; blk < nb; ++blk) smax[blk] = _mm512_setzero_ps();
    for (int r = 0; r < kChunk; r += 16) {
      const __m512i s_lo = _mm512_maskz_loadu_epi16(scales_lo, vs + r * nb),
                    s_hi = _mm512_maskz_loadu_epi16(scales_hi, vs + r * nb + 32);
      __m512i z_lo = _mm512_setzero_si512(), z_hi = z_lo;
      if (vz) {
        z_lo = _mm512_maskz_loadu_epi16(scales_lo, vz + r * nb);
        z_hi = _mm512_maskz_loadu_epi16(scales_hi, vz + r * nb + 32);
      }
      for (int blk = 0; blk < nb; ++blk) {
        const __m512 sc = _mm512_cvtph_ps(
            _mm512_castsi512_si256(_mm512_permutex2var_epi16(s_lo, to_scales[blk], s_hi)));
        // The codes enter as 2c - 3: v = S c + Z = (S / 2)(2c - 3) + (Z + 1.5 S), with
        // Z = -2S for symmetric codes.
        const __m512 zero =
            vz ? _mm512_fmadd_ps(sc, _mm512_set1_ps(1.5f),
                                 _mm512_cvtph_ps(_mm512_castsi512_si256(
                                     _mm512_permutex2var_epi16(z_lo, to_scales[blk], z_hi))))
               : _mm512_mul_ps(sc, _mm512_set1_ps(-0.5f));
        _mm512_store_ps(sv[blk] + r, sc);
        _mm512_store_ps(zv[blk] + r, zero);
        smax[blk] = _mm512_max_ps(smax[blk], _mm512_abs_ps(sc));
      }
    }
    alignas(8) float ws[G][4] = {};  // the u8 weights' scales (0 past an odd last block)
    for (int blk = 0; blk < nb; ++blk) {
      const float top = _mm512_reduce_max_ps(smax[blk]);
      const __m512 unit = _mm512_set1_ps(top > 0 ? 255 / top : 0);
      for (int r = 0; r < kChunk; r += 16)
        _mm512_store_ps(sv[blk] + r, _mm512_mul_ps(_mm512_load_ps(sv[blk] + r), unit));
      for (int g = 0; g < G; ++g) ws[g][blk] = pmax[g] * top / 510;
    }
    for (int g = 0; g < G; ++g) {
      __m512 p[4], pn[4];
      const __m512 inv = _mm512_set1_ps(pmax[g] > 0 ? 1 / pmax[g] : 0);
      for (int u = 0; u < 4; ++u) {
        p[u] = _mm512_load_ps(&s[g][16 * u]);
        pn[u] = _mm512_mul_ps(p[u], inv);
      }
      for (int pr = 0; pr < pairs; ++pr) {
        __m512i code[2][4];  // blocks 2 pr and 2 pr + 1 (0 past an odd last block), rows 16 u ..
        for (int e = 0; e < 2; ++e) {
          const int blk = 2 * pr + e;
          if (blk == nb) {
            for (int u = 0; u < 4; ++u) code[e][u] = _mm512_setzero_si512();
            continue;
          }
          float* zacc = st.out.data() + size_t(g) * size_t(st.stride) + 64 * pairs + 16 * blk;
          __m512 z = _mm512_loadu_ps(zacc);
          for (int u = 0; u < 4; ++u) {
            z = _mm512_fmadd_ps(p[u], _mm512_load_ps(zv[blk] + 16 * u), z);
            code[e][u] = _mm512_cvtps_epi32(_mm512_mul_ps(pn[u], _mm512_load_ps(sv[blk] + 16 * u)));
          }
          _mm512_storeu_ps(zacc, z);
        }
        for (int half = 0; half < 2; ++half)
          _mm512_store_si512(&wq[g][pr][64 * half],
                             pack_4x16<false>(code[0][2 * half], code[1][2 * half],
                                              code[0][2 * half + 1], code[1][2 * half + 1]));
      }
    }

    // ---- values, a pair of blocks at a time, one row quartet per step
    const uint8_t* vc = h.v_codes + c0 * row_bytes;
    for (int pr = 0; pr < pairs; ++pr) {
      __m512i acc[4][G];
      for (int sh = 0; sh < 4; ++sh)
        for (int g = 0; g < G; ++g) acc[sh][g] = _mm512_setzero_si512();
      for (int quartet = 0; quartet < kChunk / 4; ++quartet) {
        const uint8_t* rows = vc + 4 * quartet * row_bytes;
        const __m512i x =
            _mm512_permutex2var_epi8(_mm512_maskz_loadu_epi8(lower, rows), to_pair[pr],
                                     _mm512_maskz_loadu_epi8(upper, rows + 64));
        __m512i w[G];
        for (int g = 0; g < G; ++g) {
          int64_t word;
          std::memcpy(&word, &wq[g][pr][4 * pair_word(quartet)], 8);
          w[g] = _mm512_set1_epi64(word);
        }
        for (int sh = 0; sh < 4; ++sh) {  // (shifts and masks: off the dot products' pipes)
          const __m512i c = _mm512_and_si512(_mm512_srli_epi16(x, 2 * sh), low_bits);
          for (int g = 0; g < G; ++g) acc[sh][g] = _mm512_dpbusd_epi32(acc[sh][g], w[g], c);
        }
      }
      for (int g = 0; g < G; ++g) {
        float* o = st.out.data() + size_t(g) * size_t(st.stride) + pr * 64;
        double both;  // the two blocks' scales, alternating in the lanes as the blocks do
        std::memcpy(&both, &ws[g][2 * pr], sizeof both);
        const __m512 a = _mm512_castpd_ps(_mm512_set1_pd(both));
        // The centred sum sum_t w_t (2 c_t - 3) = 2 acc - 3 sum_t w_t, the weights' sum of each
        // block in the lanes of its parity (as pack_4x16 left them).
        __m512i sum_w = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_load_si512(&wq[g][pr][0]), ones),
            _mm512_load_si512(&wq[g][pr][64]), ones);
        sum_w = _mm512_add_epi32(sum_w, _mm512_shuffle_epi32(sum_w, _MM_PERM_BADC));
        sum_w = _mm512_add_epi32(sum_w, _mm512_shuffle_i64x2(sum_w, sum_w, _MM_PERM_CDAB));
        sum_w = _mm512_add_epi32(sum_w, _mm512_shuffle_i64x2(sum_w, sum_w, _MM_PERM_BADC));
        const __m512i three_sum_w = _mm512_add_epi32(sum_w, _mm512_slli_epi32(sum_w, 1));
        for (int sh = 0; sh < 4; ++sh) {
          const __m512i centred = _mm512_sub_epi32(_mm512_slli_epi32(acc[sh][g], 1), three_sum_w);
          _mm512_storeu_ps(o + 16 * sh, _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), a,
                                                        _mm512_loadu_ps(o + 16 * sh)));
        }
      }
    }
  }
  // The rest: the last quantized rows and the residual rows, in f32.
  const int64_t n = h.n_quant + h.n_residual;
  for (int64_t r0 = whole; r0 < n; r0 += kChunk)
    add_rows_f32<G>(h, d, r0, std::min(kChunk, n - r0), q, scale, bias, st);

  for (int g = 0; g < G; ++g) {
    const float* o = st.out.data() + size_t(g) * size_t(st.stride);
    const float inv = st.l[g] > 0 ? 1.0f / st.l[g] : 0.0f;
    for (int c = 0; c < d; ++c) {
      const float* z = o + 64 * pairs + 16 * (c / kBlock);
      float zsum = 0;
      for (int e = 0; e < 16; ++e) zsum += z[e];
      out[g * d + c] = (o[lane_of(c)] + zsum) * inv;
    }
  }
}

}  // namespace

void attend_head_kivi2_reference(const Kivi2Head& head, int d, const float* q, int G, float scale,
                                 const float* bias, float* out) {
  const int64_t n = head.n_quant + head.n_residual;
  std::vector<float> k(size_t(n) * size_t(d)), v(k.size());
  decode_rows(head, d, 0, n, k.data(), v.data());
  attend_head_reference(DType::f32, k.data(), v.data(), n, d, q, G, scale, bias, out);
}

bool kivi2_codes_supported(int d) {
  return have_avx512_vnni_vbmi() && d >= 32 && d <= 128 && d % 32 == 0;
}

void attend_head_kivi2(const Kivi2Head& head, int d, const float* q, int G, float scale,
                       const float* bias, float* out) {
  if (!kivi2_codes_supported(d))
    return attend_head_kivi2_reference(head, d, q, G, scale, bias, out);
  for (int i = 0; i < G * d; ++i)
    if (!std::isfinite(q[i])) {  // as the reference: no finite output (and no int8 of a NaN)
      std::fill(out, out + G * d, NAN);
      return;
    }
  // Passes of 4, 2 or 1 query heads: the value path holds 4 accumulators per query.
  for (int g0 = 0; g0 < G;) {
    const int left = G - g0, g = left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const float* qg = q + int64_t(g0) * d;
    float* og = out + int64_t(g0) * d;
    if (g == 4) attend_kivi2<4>(head, d, qg, scale, bias, og);
    if (g == 2) attend_kivi2<2>(head, d, qg, scale, bias, og);
    if (g == 1) attend_kivi2<1>(head, d, qg, scale, bias, og);
    g0 += g;
  }
}

}  // namespace kvk
