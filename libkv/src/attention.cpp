#include "kv/attention.h"

#include <algorithm>
#include <cmath>

#include "kv/error.h"
#include "kv/str.h"

namespace kv {

HeadView head_view(const Layer& layer, int h, const std::vector<float>& k32,
                   const std::vector<float>& v32, int dim) {
  const int64_t begin = layer.head_offsets[size_t(h)];
  HeadView view;
  view.k = k32.data() + begin * dim;
  view.v = v32.data() + begin * dim;
  view.positions = layer.positions.data() + begin;
  view.mass = layer.mass.empty() ? nullptr : layer.mass.data() + begin;
  view.n = layer.head_entries(h);
  view.dim = dim;
  return view;
}

const float* mass_bias(const float* mass, int64_t n, std::vector<float>& bias) {
  if (!mass) return nullptr;
  bias.resize(size_t(n));
  for (int64_t j = 0; j < n; ++j) bias[size_t(j)] = std::log(mass[j]);
  return bias.data();
}

void attention_weights(const HeadView& head, const float* q, const int32_t* q_positions,
                       int64_t n_q, float* weights) {
  const int64_t n = head.n;
  if (n == 0 || n_q == 0) return;
  kvk::gemm_nt(q, n_q, head.dim, head.k, n, weights, n);
  thread_local std::vector<float> log_mass;
  const float* bias = mass_bias(head.mass, n, log_mass);
  const float scale = 1.0f / std::sqrt(float(head.dim));
  for (int64_t i = 0; i < n_q; ++i) {
    float* row = weights + i * n;
    // Positions increase along the entries, so the causal mask is a prefix.
    const int64_t visible =
        q_positions
            ? std::upper_bound(head.positions, head.positions + n, q_positions[i]) - head.positions
            : n;
    kvk::softmax_row(row, visible, scale, bias);
    std::fill(row + visible, row + n, 0.0f);
  }
}

void attention_apply(const HeadView& head, const float* weights, int64_t n_q, float* out) {
  const int dim = head.dim;
  for (int64_t i = 0; i < n_q; ++i) {
    float* o = out + i * dim;
    std::fill(o, o + dim, 0.0f);
    const float* w = weights + i * head.n;
    for (int64_t j = 0; j < head.n; ++j) {
      if (w[j] == 0.0f) continue;
      const float* vr = head.v + j * dim;
      for (int d = 0; d < dim; ++d) o[d] += w[j] * vr[d];
    }
  }
}

std::vector<float> layer_attention(const ModelInfo& model, const Layer& layer,
                                   const Tensor& queries, const std::vector<int32_t>& q_positions) {
  const int D = model.head_dim, Hq = model.n_q_heads, G = model.group_size();
  if (queries.cols() != D || queries.rows() % Hq)
    throw Error(Exit::data, str("queries are [", queries.rows(), ", ", queries.cols(), "], not [",
                                Hq, " x n, ", D, "]"));
  const int64_t n_q = queries.rows() / Hq;
  if (!q_positions.empty() && int64_t(q_positions.size()) != n_q)
    throw Error(Exit::data, str(q_positions.size(), " query positions for ", n_q, " queries"));
  const std::vector<float> q = queries.to_f32(), k = layer.k.to_f32(), v = layer.v.to_f32();
  std::vector<float> out(size_t(queries.rows()) * size_t(D));
#pragma omp parallel for schedule(dynamic)
  for (int j = 0; j < Hq; ++j) {
    const HeadView head = head_view(layer, j / G, k, v, D);
    std::vector<float> weights(size_t(n_q) * size_t(head.n));
    const float* qj = q.data() + int64_t(j) * n_q * D;
    attention_weights(head, qj, q_positions.empty() ? nullptr : q_positions.data(), n_q,
                      weights.data());
    attention_apply(head, weights.data(), n_q, out.data() + int64_t(j) * n_q * D);
  }
  return out;
}

double mean_relative_error(const float* cand, const float* ref, int64_t rows, int dim) {
  double sum = 0;
  int64_t counted = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double diff = 0, norm = 0;
    for (int d = 0; d < dim; ++d) {
      const double a = cand[r * dim + d], b = ref[r * dim + d];
      diff += (a - b) * (a - b);
      norm += b * b;
    }
    if (norm == 0) continue;
    sum += std::sqrt(diff / norm);
    ++counted;
  }
  return counted ? sum / double(counted) : 0.0;
}

}  // namespace kv
