// Attention votes: for groups of queries, the sum of their softmax weights on each key. SnapKV
// scores a KV head this way (the observation window's queries of each query head are one
// group), over every key of a long cache, so this is a GEMM of 128 queries against 32k keys
// whose result is only needed summed over each group.
//
// The reference multiplies, normalizes each query's row and sums (gemm_nt, softmax_row): four
// passes over a [queries x keys] f32 matrix (16 MiB per head at 32k), and a packed f32 copy of
// the keys. The AVX-512 path keeps the queries packed in L1 and walks the keys in chunks that stay
// in L2: a chunk's keys are widened to f32, multiplied with the queries in lanes (12 keys x 32
// queries per register tile, so no key is ever repacked), and its logits turned into
// exponentials against the running maximum of each query while they are still in cache, with the
// maximum each chunk used kept aside. A last pass rescales every chunk to the final maximum and
// sum of its query and adds up each group: the big matrix is written once and read once.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kvk/ops.h"
#include "simd512.h"

namespace kvk {

void attention_votes_reference(const float* q, int64_t n_q, const int64_t* visible, int64_t group,
                               DType type, const void* k, int64_t n, int d, float scale,
                               const float* bias, float* votes) {
  const int64_t groups = n_q / group;
  std::fill(votes, votes + groups * n, 0.0f);
  if (n == 0 || n_q == 0) return;
  const int64_t rows = groups * group;
  std::vector<float> k32(size_t(n) * size_t(d)), weights(size_t(rows) * size_t(n));
  cpu_ops().to_f32(type, k, k32.data(), k32.size());
  gemm_nt(q, rows, d, k32.data(), n, weights.data(), n);
  for (int64_t i = 0; i < rows; ++i) {
    float* row = weights.data() + i * n;
    const int64_t seen = std::clamp<int64_t>(visible[i], 0, n);
    softmax_row(row, seen, scale, bias);
    float* v = votes + (i / group) * n;
    for (int64_t j = 0; j < seen; ++j) v[j] += row[j];
  }
}

namespace {

// A register tile is 12 keys x 32 queries: 24 accumulators of the 32 registers, one broadcast
// key value feeding two FMAs. It runs at the FMA peak measured on Zen 4 (about 116 of 117
// GFLOP/s on one core); 24 keys x 16 queries and 6 x 64 were slower.
constexpr int kVecs = 2;
constexpr int kQueries = kVecs * kLanes;    // queries per register tile
constexpr int kKeys = 12;                   // keys per register tile
constexpr int64_t kChunkKeys = 20 * kKeys;  // 240 keys: their f32 values and logits stay in L2

// x <- exp(x - m) lane by lane, x <= m.
__attribute__((target(KVK_AVX512), always_inline)) inline v16 exp_below(v16 x, v16 m) {
  x -= m;
  exp16(x);
  return x;
}

// logits[r][0..32) = q-block . key r for kKeys keys: the queries of the block packed [d][32].
__attribute__((target(KVK_AVX512), always_inline)) inline void tile(const float* packed_q,
                                                                    const float* keys, int d,
                                                                    v16 acc[kKeys][kVecs]) {
  for (int r = 0; r < kKeys; ++r)
    for (int h = 0; h < kVecs; ++h) acc[r][h] = v16{};
  for (int c = 0; c < d; ++c) {
    v16 qv[kVecs];
    for (int h = 0; h < kVecs; ++h) qv[h] = load16(packed_q + c * kQueries + h * kLanes);
    for (int r = 0; r < kKeys; ++r) {
      const float x = keys[r * d + c];
      for (int h = 0; h < kVecs; ++h) acc[r][h] += x * qv[h];
    }
  }
}

__attribute__((target(KVK_AVX512))) void votes_avx512(const float* q, int64_t n_q,
                                                      const int64_t* visible, int64_t group,
                                                      DType type, const void* k, int64_t n, int d,
                                                      float scale, const float* bias,
                                                      float* votes) {
  const int64_t groups = n_q / group, rows = groups * group;
  const int64_t blocks = (rows + kQueries - 1) / kQueries, width = blocks * kQueries;
  const int64_t chunks = (n + kChunkKeys - 1) / kChunkKeys;
  thread_local std::vector<float> packed, keys, logits, e_storage, chunk_max;
  thread_local std::vector<int32_t> seen;
  // Queries packed block by block as [d][32]; padding queries are zero and see nothing.
  packed.assign(size_t(width) * size_t(d), 0.0f);
  seen.assign(size_t(width), 0);
  for (int64_t i = 0; i < rows; ++i) {
    float* dst = &packed[size_t((i / kQueries) * d * kQueries + i % kQueries)];
    for (int c = 0; c < d; ++c) dst[c * kQueries] = q[i * d + c];
    seen[size_t(i)] = int32_t(std::clamp<int64_t>(visible[i], 0, n));
  }
  keys.assign(size_t(kChunkKeys) * size_t(d), 0.0f);  // a partial last chunk computes on zeros
  logits.resize(size_t(kChunkKeys) * size_t(width));  // a chunk's, [key][query]: L2-resident
  // The exponentials of all keys, [key][query], 64-byte aligned for streaming stores: written
  // once without reading the lines first, read once by the last pass.
  e_storage.resize(size_t(n) * size_t(width) + kLanes);
  float* const e =
      e_storage.data() + (-reinterpret_cast<uintptr_t>(e_storage.data()) / sizeof(float)) % kLanes;
  chunk_max.resize(size_t(chunks) * size_t(width));  // the maximum each chunk's were taken at
  std::vector<float> run_max(size_t(width), -INFINITY), sum(size_t(width), 0.0f);
  const size_t type_bytes = dtype_size(type);

  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t j0 = ch * kChunkKeys, count = std::min(kChunkKeys, n - j0);
    cpu_ops().to_f32(type, static_cast<const char*>(k) + size_t(j0) * size_t(d) * type_bytes,
                     keys.data(), size_t(count) * size_t(d));
    float* const ec = e + j0 * width;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* pq = &packed[size_t(b * d * kQueries)];
      vi16 seen_v[kVecs];
      std::memcpy(seen_v, &seen[size_t(b * kQueries)], sizeof seen_v);
      v16 mx[kVecs];
      for (int h = 0; h < kVecs; ++h) mx[h] = v16{} - INFINITY;
      for (int64_t t = 0; t < count; t += kKeys) {
        v16 acc[kKeys][kVecs];
        tile(pq, &keys[size_t(t) * size_t(d)], d, acc);
        for (int r = 0; r < kKeys && t + r < count; ++r) {
          const int64_t j = j0 + t + r;
          const float bj = bias ? bias[j] : 0.0f;
          for (int h = 0; h < kVecs; ++h) {
            v16 l = acc[r][h] * scale + bj;
            l = int32_t(j) < seen_v[h] ? l : v16{} - INFINITY;  // the causal mask
            mx[h] = l > mx[h] ? l : mx[h];
            store16(&logits[size_t((t + r) * width + b * kQueries + h * kLanes)], l);
          }
        }
      }
      // This chunk's exponentials against the running maximum, while its logits are in L2.
      for (int h = 0; h < kVecs; ++h) {
        const int64_t o = b * kQueries + h * kLanes;
        const v16 old_max = load16(&run_max[size_t(o)]);
        const v16 new_max = mx[h] > old_max ? mx[h] : old_max;
        // A query that has seen nothing yet keeps maximum -inf and sum 0: exponentials of
        // -inf against 0 are 0, never NaN.
        const v16 base = new_max == -INFINITY ? v16{} : new_max;
        v16 s = load16(&sum[size_t(o)]) * exp_below(old_max, base);
        for (int64_t r = 0; r < count; ++r) {
          const v16 x = exp_below(load16(&logits[size_t(r * width + o)]), base);
          _mm512_stream_ps(ec + r * width + o, __m512(x));
          s += x;
        }
        store16(&sum[size_t(o)], s);
        store16(&run_max[size_t(o)], new_max);
        store16(&chunk_max[size_t(ch * width + o)], new_max);
      }
    }
  }

  _mm_sfence();  // the streamed exponentials are read back below
  // Rescale each chunk to its query's final maximum and sum, then sum the groups.
  std::vector<float> factor(static_cast<size_t>(width));
  const bool vector_groups = group % kLanes == 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t j0 = ch * kChunkKeys, count = std::min(kChunkKeys, n - j0);
    for (int64_t o = 0; o < width; o += kLanes) {
      // A chunk in which the query had seen nothing yet kept max -inf: its factor is exp(-inf) =
      // 0 (or NaN where the query never sees anything, and then its sum is 0).
      const v16 s = load16(&sum[size_t(o)]), m = load16(&chunk_max[size_t(ch * width + o)]);
      const v16 M = load16(&run_max[size_t(o)]);
      const v16 f = exp_below(m, M == -INFINITY ? v16{} : M) / s;  // no NaN into the exp
      store16(&factor[size_t(o)], s > 0.0f ? f : v16{});
    }
    const float* ec = e + j0 * width;
    int64_t r = 0;
    if (vector_groups) {
      for (; r + kLanes <= count; r += kLanes)
        for (int64_t g = 0; g < groups; ++g) {
          v16 x[kLanes];
          for (int i = 0; i < kLanes; ++i) {
            const float* row = ec + (r + i) * width + g * group;
            v16 acc{};
            for (int64_t o = 0; o < group; o += kLanes)
              acc += load16(row + o) * load16(&factor[size_t(g * group + o)]);
            x[i] = acc;
          }
          store16(votes + g * n + j0 + r, sum_lanes_16(x));
        }
    }
    for (; r < count; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        float acc = 0;
        for (int64_t i = g * group; i < (g + 1) * group; ++i)
          acc += ec[r * width + i] * factor[size_t(i)];
        votes[g * n + j0 + r] = acc;
      }
  }
}

}  // namespace

void attention_votes(const float* q, int64_t n_q, const int64_t* visible, int64_t group, DType type,
                     const void* k, int64_t n, int d, float scale, const float* bias,
                     float* votes) {
  if (!have_avx512() || n == 0 || d <= 0 || n_q < group)
    return attention_votes_reference(q, n_q, visible, group, type, k, n, d, scale, bias, votes);
  votes_avx512(q, n_q, visible, group, type, k, n, d, scale, bias, votes);
}

}  // namespace kvk
