#include "kv/merge.h"

#include <algorithm>
#include <cmath>

#include "kv/error.h"
#include "kv/str.h"
#include "kvk/ops.h"

namespace kv {

namespace {

// Unit-length copies of rows (a zero row stays zero: it matches nothing).
std::vector<float> normalized(const float* rows, int64_t n, int d) {
  std::vector<float> out(rows, rows + n * d);
  for (int64_t i = 0; i < n; ++i) {
    double sq = 0;
    for (int c = 0; c < d; ++c) sq += double(out[size_t(i * d + c)]) * out[size_t(i * d + c)];
    const float inv = sq > 0 ? float(1.0 / std::sqrt(sq)) : 0.0f;
    for (int c = 0; c < d; ++c) out[size_t(i * d + c)] *= inv;
  }
  return out;
}

}  // namespace

void merge_nearest(const Header& header, int l, Layer& in, const MergeOptions& options,
                   Layer& out) {
  if (!(options.tau >= -1 && options.tau <= 1))
    throw Error(Exit::usage, str("--tau ", options.tau, " must be a cosine in [-1, 1]"));
  const Selection kept = select_layer(header, l, in, options.select);
  const int D = header.model.head_dim;
  const std::vector<float> k = in.k.to_f32(), v = in.v.to_f32();
  std::vector<float> mass(static_cast<size_t>(in.entries()), 1.0f);
  if (!in.mass.empty()) mass = in.mass;

  // Sums of mass-weighted keys and values, and total masses, per kept row (in kept order).
  int64_t total = 0;
  for (const auto& rows : kept) total += int64_t(rows.size());
  std::vector<float> k_sum(static_cast<size_t>(total) * D), v_sum(k_sum.size()),
      m_sum(static_cast<size_t>(total));
  std::vector<int64_t> first(kept.size() + 1, 0);
  for (size_t h = 0; h < kept.size(); ++h) first[h + 1] = first[h] + int64_t(kept[h].size());

#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < int(kept.size()); ++h) {
    const auto& rows = kept[size_t(h)];
    const int64_t nk = int64_t(rows.size()), base = first[size_t(h)];
    for (int64_t i = 0; i < nk; ++i) {
      const int64_t r = rows[size_t(i)];
      const float m = mass[size_t(r)];
      m_sum[size_t(base + i)] = m;
      for (int c = 0; c < D; ++c) {
        k_sum[size_t((base + i) * D + c)] = m * k[size_t(r * D + c)];
        v_sum[size_t((base + i) * D + c)] = m * v[size_t(r * D + c)];
      }
    }
    if (nk == 0) continue;
    // The dropped rows of this head, matched in blocks against all kept keys by one GEMM.
    std::vector<int64_t> dropped;
    std::vector<char> is_kept(static_cast<size_t>(in.head_entries(h)), 0);
    const int64_t begin = in.head_offsets[size_t(h)];
    for (int64_t r : rows) is_kept[size_t(r - begin)] = 1;
    for (int64_t r = begin; r < in.head_offsets[size_t(h) + 1]; ++r)
      if (!is_kept[size_t(r - begin)]) dropped.push_back(r);
    std::vector<float> kept_keys(size_t(nk) * D);
    for (int64_t i = 0; i < nk; ++i)
      std::copy_n(&k[size_t(rows[size_t(i)] * D)], D, &kept_keys[size_t(i * D)]);
    const std::vector<float> kn = normalized(kept_keys.data(), nk, D);
    constexpr int64_t kBlock = 256;
    std::vector<float> block(size_t(kBlock) * D), sim(size_t(kBlock) * size_t(nk));
    for (int64_t b0 = 0; b0 < int64_t(dropped.size()); b0 += kBlock) {
      const int64_t nb = std::min<int64_t>(kBlock, int64_t(dropped.size()) - b0);
      for (int64_t i = 0; i < nb; ++i)
        std::copy_n(&k[size_t(dropped[size_t(b0 + i)] * D)], D, &block[size_t(i * D)]);
      const std::vector<float> bn = normalized(block.data(), nb, D);
      kvk::gemm_nt(bn.data(), nb, D, kn.data(), nk, sim.data(), nk);
      for (int64_t i = 0; i < nb; ++i) {
        const float* row = &sim[size_t(i * nk)];
        const int64_t best = std::max_element(row, row + nk) - row;  // first of equals
        if (row[best] < float(options.tau)) continue;
        const int64_t r = dropped[size_t(b0 + i)], into = base + best;
        const float m = mass[size_t(r)];
        m_sum[size_t(into)] += m;
        for (int c = 0; c < D; ++c) {
          k_sum[size_t(into * D + c)] += m * k[size_t(r * D + c)];
          v_sum[size_t(into * D + c)] += m * v[size_t(r * D + c)];
        }
      }
    }
  }

  // The kept rows in their places, then overwritten with the means in the stored type.
  apply_selection(in, kept, out);
  for (int64_t i = 0; i < total; ++i)
    for (int c = 0; c < D; ++c) {
      k_sum[size_t(i * D + c)] /= m_sum[size_t(i)];
      v_sum[size_t(i * D + c)] /= m_sum[size_t(i)];
    }
  out.k = Tensor::from_f32(out.k.dtype(), total, D, k_sum.data());
  out.v = Tensor::from_f32(out.v.dtype(), total, D, v_sum.data());
  out.mass = m_sum;
}

Snapshot merge_snapshot(const Snapshot& snap, const MergeOptions& options) {
  check_evict_options(snap.header, options.select);
  Snapshot out;
  out.header = snap.header;
  out.layers.resize(snap.layers.size());
  for (int l = 0; l < int(snap.layers.size()); ++l) {
    Layer in = snap.layers[size_t(l)];
    merge_nearest(snap.header, l, in, options, out.layers[size_t(l)]);
  }
  return out;
}

}  // namespace kv
