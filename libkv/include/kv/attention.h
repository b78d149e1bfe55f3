// Attention of queries over the entries a (possibly evicted or merged) cache holds, computed the
// way a model reads it: logit_j = q . k_j / sqrt(d) + log(mass_j), softmax over the entries whose
// position is not after the query's (causal), output o = sum_j a_j v_j. Scoring (SnapKV) and
// evaluation (attention-output error) share this one piece.
#pragma once
#include <cstdint>
#include <vector>

#include "kv/snapshot.h"

namespace kv {

// One KV head's entries, decoded to f32: k and v are [n, dim] row-major.
struct HeadView {
  const float* k = nullptr;
  const float* v = nullptr;
  const int32_t* positions = nullptr;  // [n]
  const float* mass = nullptr;         // [n] or null (every entry stands for one token)
  int64_t n = 0;
  int dim = 0;
};

// The head `h` of a layer whose k and v were decoded to `k32`, `v32` ([N, dim] for the layer).
HeadView head_view(const Layer& layer, int h, const std::vector<float>& k32,
                   const std::vector<float>& v32, int dim);

// The softmax bias of a head's entries: log(mass_j) for the n masses (merged entries weigh in
// with the tokens they stand for), or nothing (returns null) when the head has no masses.
const float* mass_bias(const float* mass, int64_t n, std::vector<float>& bias);

// weights[i, j] (row-major [n_q, head.n]): attention of query row i (q is [n_q, dim]) over the
// entries; entries after q_positions[i] get 0. q_positions may be null (no mask). A query that
// sees no entry gets an all-zero row.
void attention_weights(const HeadView& head, const float* q, const int32_t* q_positions,
                       int64_t n_q, float* weights);

// out[i] = sum_j weights[i, j] v_j, out is [n_q, dim].
void attention_apply(const HeadView& head, const float* weights, int64_t n_q, float* out);

// Attention outputs of every query head of a layer: `queries` is [H_q * n_q, D] (query head j's
// rows j*n_q .. j*n_q + n_q - 1, as window_q and probe_q are stored), q_positions [n_q] or empty
// (no mask). Returns [H_q * n_q, D] f32. Query heads of a group read their KV head (GQA).
std::vector<float> layer_attention(const ModelInfo& model, const Layer& layer,
                                   const Tensor& queries, const std::vector<int32_t>& q_positions);

// Mean over rows of ||cand_r - ref_r||_2 / ||ref_r||_2 (rows whose reference is zero are skipped).
double mean_relative_error(const float* cand, const float* ref, int64_t rows, int dim);

}  // namespace kv
