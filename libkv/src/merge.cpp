#include "kv/merge.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

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

// Each entry's mass (1 when the layer has none).
std::vector<float> entry_masses(const Layer& in) {
  return in.mass.empty() ? std::vector<float>(static_cast<size_t>(in.entries()), 1.0f) : in.mass;
}

// Kept rows' sums, started with each kept row's own mass-weighted key and value.
struct MergeSums {
  std::vector<float> k, v, m;
  std::vector<int64_t> first;  // [heads + 1]: where each head's kept rows start
  MergeSums(const Selection& kept, const std::vector<float>& k32, const std::vector<float>& v32,
            const std::vector<float>& mass, int D) {
    first.assign(kept.size() + 1, 0);
    for (size_t h = 0; h < kept.size(); ++h) first[h + 1] = first[h] + int64_t(kept[h].size());
    const int64_t total = first.back();
    k.resize(size_t(total) * D);
    v.resize(k.size());
    m.resize(size_t(total));
    for (size_t h = 0; h < kept.size(); ++h)
      for (size_t i = 0; i < kept[h].size(); ++i) {
        const int64_t r = kept[h][i], o = first[h] + int64_t(i);
        m[size_t(o)] = mass[size_t(r)];
        for (int c = 0; c < D; ++c) {
          k[size_t(o * D + c)] = mass[size_t(r)] * k32[size_t(r * D + c)];
          v[size_t(o * D + c)] = mass[size_t(r)] * v32[size_t(r * D + c)];
        }
      }
  }
  // Adds weight w of row r: its value, and as key `key_row`'s key (r itself, or the kept row
  // for merges that keep keys).
  void add(int64_t into, int64_t r, int64_t key_row, float w, const std::vector<float>& k32,
           const std::vector<float>& v32, int D) {
    m[size_t(into)] += w;
    for (int c = 0; c < D; ++c) {
      k[size_t(into * D + c)] += w * k32[size_t(key_row * D + c)];
      v[size_t(into * D + c)] += w * v32[size_t(r * D + c)];
    }
  }
};

// The kept rows in their places (apply_selection), then overwritten with the merged means in
// the stored type; the mass is the merged total.
void finish_merge(Layer& in, const Selection& kept, int D, std::vector<float>& k_sum,
                  std::vector<float>& v_sum, std::vector<float>& m_sum, Layer& out) {
  const int64_t total = int64_t(m_sum.size());
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

// The dropped rows of each head, in position order.
std::vector<std::vector<int64_t>> dropped_rows(const Layer& in, const Selection& kept) {
  std::vector<std::vector<int64_t>> out(kept.size());
  for (size_t h = 0; h < kept.size(); ++h) {
    size_t next = 0;
    for (int64_t r = in.head_offsets[h]; r < in.head_offsets[h + 1]; ++r) {
      if (next < kept[h].size() && kept[h][next] == r)
        ++next;
      else
        out[h].push_back(r);
    }
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
  const std::vector<float> mass = entry_masses(in);

  // Sums of mass-weighted keys and values, and total masses, per kept row (in kept order).
  MergeSums sums(kept, k, v, mass, D);
  const auto dropped_by_head = dropped_rows(in, kept);

#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < int(kept.size()); ++h) {
    const auto& rows = kept[size_t(h)];
    const int64_t nk = int64_t(rows.size()), base = sums.first[size_t(h)];
    if (nk == 0) continue;
    // The dropped rows of this head, matched in blocks against all kept keys by one GEMM.
    const std::vector<int64_t>& dropped = dropped_by_head[size_t(h)];
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
        const int64_t r = dropped[size_t(b0 + i)];
        sums.add(base + best, r, r, mass[size_t(r)], k, v, D);
      }
    }
  }

  finish_merge(in, kept, D, sums.k, sums.v, sums.m, out);
}

void merge_cam(const Header& header, int l, Layer& in, const MergeOptions& options, Layer& out) {
  const EvictScore score = options.select.score;
  if (score != EvictScore::h2o && score != EvictScore::tova && score != EvictScore::snapkv)
    throw Error(Exit::usage, "cam weighs merges by attention: use --score h2o, tova or snapkv");
  const std::vector<float> scores = score_layer(header, l, in, options.select);
  const Selection kept = select_layer(header, l, in, options.select);
  const int D = header.model.head_dim;
  const std::vector<float> k = in.k.to_f32(), v = in.v.to_f32();
  const std::vector<float> mass = entry_masses(in);
  MergeSums sums(kept, k, v, mass, D);
  const auto dropped = dropped_rows(in, kept);
  for (size_t h = 0; h < kept.size(); ++h) {
    const auto& rows = kept[h];
    if (rows.empty()) continue;
    // The selection threshold: the smallest finite score kept (always-kept rows score +inf).
    float threshold = std::numeric_limits<float>::infinity();
    for (int64_t r : rows)
      if (std::isfinite(scores[size_t(r)])) threshold = std::min(threshold, scores[size_t(r)]);
    for (int64_t r : dropped[h]) {
      // The nearest kept row after it (its position neighbour), else the last kept row.
      const auto after = std::upper_bound(rows.begin(), rows.end(), r);
      const size_t j = after == rows.end() ? rows.size() - 1 : size_t(after - rows.begin());
      const int64_t target = rows[j];
      const float s_target =
          std::isfinite(scores[size_t(target)]) ? scores[size_t(target)] : threshold;
      // In proportion to its attention relative to the neighbour's, at most all of it.
      const float w = s_target > 0 && std::isfinite(s_target)
                          ? std::clamp(scores[size_t(r)] / s_target, 0.0f, 1.0f)
                          : 0.0f;
      if (w > 0) sums.add(sums.first[h] + int64_t(j), r, target, w * mass[size_t(r)], k, v, D);
    }
  }
  finish_merge(in, kept, D, sums.k, sums.v, sums.m, out);
}

void merge_cluster(const Header& header, int l, Layer& in, const MergeOptions& options,
                   Layer& out) {
  if (!(options.tau >= -1 && options.tau <= 1))
    throw Error(Exit::usage, str("--tau ", options.tau, " must be a cosine in [-1, 1]"));
  const std::vector<float> scores = score_layer(header, l, in, options.select);
  const Selection kept = select_layer(header, l, in, options.select);
  const int D = header.model.head_dim;
  const std::vector<float> k = in.k.to_f32(), v = in.v.to_f32();
  const std::vector<float> mass = entry_masses(in);
  const std::vector<float> kn = normalized(k.data(), in.entries(), D);
  MergeSums sums(kept, k, v, mass, D);
  for (size_t h = 0; h < kept.size(); ++h) {
    const auto& rows = kept[h];
    std::vector<int64_t> slot(size_t(in.head_entries(int(h))), -1);  // kept index of each row
    for (size_t i = 0; i < rows.size(); ++i)
      slot[size_t(rows[i] - in.head_offsets[h])] = int64_t(i);
    // Sets: maximal runs of consecutive rows whose neighbouring keys have cosine >= tau.
    for (int64_t a = in.head_offsets[h]; a < in.head_offsets[h + 1];) {
      int64_t b = a + 1;
      while (b < in.head_offsets[h + 1]) {
        double cos = 0;
        for (int c = 0; c < D; ++c)
          cos += double(kn[size_t((b - 1) * D + c)]) * kn[size_t(b * D + c)];
        if (cos < options.tau) break;
        ++b;
      }
      // The set's pivot: its kept row with the highest score (none kept: the set is dropped).
      int64_t pivot = -1;
      for (int64_t r = a; r < b; ++r)
        if (slot[size_t(r - in.head_offsets[h])] >= 0 &&
            (pivot < 0 || scores[size_t(r)] > scores[size_t(pivot)]))
          pivot = r;
      if (pivot >= 0 && b - a > 1) {
        // Gaussian weights of each dropped member around the pivot's key, the width the set's
        // mean squared distance to it.
        double spread = 0;
        for (int64_t r = a; r < b; ++r)
          for (int c = 0; c < D; ++c) {
            const double d = double(k[size_t(r * D + c)]) - k[size_t(pivot * D + c)];
            spread += d * d;
          }
        spread /= double(b - a - 1);
        for (int64_t r = a; r < b; ++r) {
          if (slot[size_t(r - in.head_offsets[h])] >= 0) continue;
          double d2 = 0;
          for (int c = 0; c < D; ++c) {
            const double d = double(k[size_t(r * D + c)]) - k[size_t(pivot * D + c)];
            d2 += d * d;
          }
          const float w = spread > 0 ? float(std::exp(-d2 / (2 * spread))) : 1.0f;
          sums.add(sums.first[h] + slot[size_t(pivot - in.head_offsets[h])], r, r,
                   w * mass[size_t(r)], k, v, D);
        }
      }
      a = b;
    }
  }
  finish_merge(in, kept, D, sums.k, sums.v, sums.m, out);
}

void merge_heads(const Header& in_header, const Layer& in, int groups, Header& out_header,
                 Layer& out) {
  const ModelInfo& m = in_header.model;
  if (groups < 1 || m.n_kv_heads % groups)
    throw Error(Exit::usage,
                str("--groups ", groups, " must divide the ", m.n_kv_heads, " KV heads"));
  const int r = m.n_kv_heads / groups, D = m.head_dim;
  for (int h = 0; h < m.n_kv_heads; ++h) {
    const int first = h / r * r;
    if (in.head_entries(h) != in.head_entries(first) ||
        !std::equal(in.positions.begin() + in.head_offsets[h],
                    in.positions.begin() + in.head_offsets[h + 1],
                    in.positions.begin() + in.head_offsets[first]))
      throw Error(Exit::usage, str("heads ", first, " and ", h,
                                   " hold different positions; "
                                   "heads merges heads of the same entries (before eviction)"));
    // A pooled entry stands for what each of its heads' entries stood for: only one mass.
    if (!in.mass.empty() &&
        !std::equal(in.mass.begin() + in.head_offsets[h], in.mass.begin() + in.head_offsets[h + 1],
                    in.mass.begin() + in.head_offsets[first]))
      throw Error(Exit::usage,
                  str("heads ", first, " and ", h,
                      " carry different masses; "
                      "heads merges heads of the same entries (before token merging)"));
  }
  out_header = in_header;
  out_header.model.n_kv_heads = groups;
  const std::vector<float> k = in.k.to_f32(), v = in.v.to_f32();
  out.positions.clear();
  out.head_offsets.assign(1, 0);
  out.mass.clear();
  std::vector<float> k_out, v_out;
  for (int g = 0; g < groups; ++g) {
    const int64_t n = in.head_entries(g * r), base = in.head_offsets[g * r];
    out.positions.insert(out.positions.end(), in.positions.begin() + base,
                         in.positions.begin() + base + n);
    if (!in.mass.empty())
      out.mass.insert(out.mass.end(), in.mass.begin() + base, in.mass.begin() + base + n);
    out.head_offsets.push_back(out.head_offsets.back() + n);
    // The GQA paper's conversion: the group's heads mean-pooled, entry by entry.
    for (int64_t i = 0; i < n; ++i)
      for (int c = 0; c < D; ++c) {
        double ks = 0, vs = 0;
        for (int j = 0; j < r; ++j) {
          const int64_t row = in.head_offsets[g * r + j] + i;
          ks += k[size_t(row * D + c)];
          vs += v[size_t(row * D + c)];
        }
        k_out.push_back(float(ks / r));
        v_out.push_back(float(vs / r));
      }
  }
  const int64_t N = out.head_offsets.back();
  out.k = Tensor::from_f32(in.k.dtype(), N, D, k_out.data());
  out.v = Tensor::from_f32(in.v.dtype(), N, D, v_out.data());
  out.k_encoding = in.k_encoding;
  out.v_encoding = in.v_encoding;
  out.window_q = in.window_q;
  out.attn_acc = in.attn_acc;
  out.attn_last = in.attn_last;
  out.probe_q = in.probe_q;
}

namespace {

// One tensor of a layer pair: merged rows of `a` become |a| e, e the SLERP of the two unit
// vectors; `b` keeps only their norms (the encoding), retained rows as they are.
std::shared_ptr<Encoded> minicache_tensor(Tensor& a, const Tensor& b, int partner, double tau,
                                          double t, MinicacheStats& stats) {
  const int D = int(a.cols());
  const int64_t N = a.rows();
  std::vector<float> x = a.to_f32();
  const std::vector<float> y = b.to_f32();
  auto enc = std::make_shared<Encoded>();
  enc->encoding = default_encoding("minicache", 'k');
  enc->encoding.partner = partner;
  enc->encoding.dtype = kvk::dtype_name(b.dtype());
  CodeArray merged, norms, rows;
  merged.name = "merged";
  norms.name = "norms";
  norms.type = CodeArray::Type::f16;
  merged.bytes.assign(size_t((N + 7) / 8), 0);  // a bit per row, LSB-first
  rows.name = "rows";
  const size_t row_bytes = size_t(D) * kvk::dtype_size(b.dtype());
  const auto* b_raw = static_cast<const uint8_t*>(b.data());
  for (int64_t r = 0; r < N; ++r) {
    float* xa = x.data() + r * D;
    const float* yb = y.data() + r * D;
    double na = 0, nb = 0, dot = 0;
    for (int c = 0; c < D; ++c) {
      na += double(xa[c]) * xa[c];
      nb += double(yb[c]) * yb[c];
      dot += double(xa[c]) * yb[c];
    }
    na = std::sqrt(na);
    nb = std::sqrt(nb);
    const double cos = na > 0 && nb > 0 ? std::clamp(dot / (na * nb), -1.0, 1.0) : -2.0;
    const bool merge = cos >= tau && std::isfinite(float(nb)) && float(nb) <= 65504.0f;
    if (merge) merged.bytes[size_t(r / 8)] |= uint8_t(1u << (r % 8));
    if (!merge) {
      rows.bytes.insert(rows.bytes.end(), b_raw + r * row_bytes, b_raw + (r + 1) * row_bytes);
      continue;
    }
    ++stats.merged;
    // SLERP of the unit vectors at t (linear when they are parallel), then a's own norm.
    const double theta = std::acos(cos), s = std::sin(theta);
    const double wa = s > 1e-6 ? std::sin((1 - t) * theta) / s : 1 - t;
    const double wb = s > 1e-6 ? std::sin(t * theta) / s : t;
    std::vector<double> e(static_cast<size_t>(D));
    double ne = 0;
    for (int c = 0; c < D; ++c) {
      e[size_t(c)] = wa * xa[c] / na + wb * yb[c] / nb;
      ne += e[size_t(c)] * e[size_t(c)];
    }
    ne = std::sqrt(ne);
    for (int c = 0; c < D; ++c) xa[c] = float(e[size_t(c)] / ne * na);
    const uint16_t norm = kvk::f32_to_f16(float(nb));  // |b| to f16 precision (2^-11)
    norms.bytes.push_back(uint8_t(norm));
    norms.bytes.push_back(uint8_t(norm >> 8));
  }
  stats.rows += N;
  a = Tensor::from_f32(a.dtype(), N, D, x.data());
  for (CodeArray* a : {&merged, &norms, &rows})
    enc->arrays.push_back(std::move(*a));  // (not copied)
  return enc;
}

}  // namespace

MinicacheStats merge_minicache_pair(const Header& header, int la, Layer& a, Layer& b, double tau,
                                    double t) {
  if (!(tau >= -1 && tau <= 1))
    throw Error(Exit::usage, str("--tau ", tau, " must be a cosine in [-1, 1]"));
  if (!(t >= 0 && t <= 1)) throw Error(Exit::usage, str("--slerp ", t, " must be in [0, 1]"));
  if (a.head_offsets != b.head_offsets || a.positions != b.positions)
    throw Error(Exit::usage, str("layers ", la, " and ", la + 1,
                                 " hold different entries; minicache merges layers of the same "
                                 "entries (before eviction)"));
  for (const Layer* l : {&a, &b})
    if (!l->k_encoding.dense() || !l->v_encoding.dense())
      throw Error(Exit::data, "minicache merges dense layers (kv-compress -d first)");
  (void)header;
  MinicacheStats stats;
  b.k_stored = minicache_tensor(a.k, b.k, la, tau, t, stats);
  b.v_stored = minicache_tensor(a.v, b.v, la, tau, t, stats);
  return stats;
}

MergeMethod parse_merge_method(const std::string& name) {
  if (name == "nearest") return MergeMethod::nearest;
  if (name == "cam") return MergeMethod::cam;
  if (name == "cluster") return MergeMethod::cluster;
  throw Error(Exit::usage, str("unknown merge method '", name, "' (nearest, cam, cluster)"));
}

void merge_layer(const Header& header, int l, Layer& in, const MergeOptions& options, Layer& out) {
  switch (options.method) {
    case MergeMethod::cam:
      return merge_cam(header, l, in, options, out);
    case MergeMethod::cluster:
      return merge_cluster(header, l, in, options, out);
    case MergeMethod::nearest:
      break;
  }
  merge_nearest(header, l, in, options, out);
}

Snapshot merge_snapshot(const Snapshot& snap, const MergeOptions& options) {
  check_evict_options(snap.header, options.select);
  Snapshot out;
  out.header = snap.header;
  out.layers.resize(snap.layers.size());
  for (int l = 0; l < int(snap.layers.size()); ++l) {
    Layer in = snap.layers[size_t(l)];
    merge_layer(snap.header, l, in, options, out.layers[size_t(l)]);
  }
  return out;
}

}  // namespace kv
