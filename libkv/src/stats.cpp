#include "kv/stats.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "kv/str.h"

namespace kv {

std::vector<HeadStats> layer_stats(const Layer& layer, int n_kv_heads, const kvk::Ops& ops) {
  const int D = int(layer.k.cols());
  const std::vector<float> k = layer.k.to_f32(ops), v = layer.v.to_f32(ops);
  std::vector<HeadStats> out(static_cast<size_t>(n_kv_heads));
  for (int h = 0; h < n_kv_heads; ++h) {
    HeadStats& s = out[size_t(h)];
    const int64_t lo = layer.head_offsets[size_t(h)], hi = layer.head_offsets[size_t(h) + 1];
    s.entries = hi - lo;
    s.k_channel_abs_mean.assign(size_t(D), 0.0f);
    std::vector<double> chan(size_t(D), 0.0);
    for (int64_t i = lo; i < hi; ++i) {
      double kn = 0, vn = 0;
      for (int c = 0; c < D; ++c) {
        const float kc = k[size_t(i) * D + c], vc = v[size_t(i) * D + c];
        kn += double(kc) * kc;
        vn += double(vc) * vc;
        chan[size_t(c)] += std::fabs(kc);
      }
      kn = std::sqrt(kn);
      vn = std::sqrt(vn);
      s.k_norm_mean += kn;
      s.v_norm_mean += vn;
      s.k_norm_max = std::max(s.k_norm_max, kn);
      s.v_norm_max = std::max(s.v_norm_max, vn);
    }
    if (s.entries == 0) continue;
    s.k_norm_mean /= double(s.entries);
    s.v_norm_mean /= double(s.entries);
    for (int c = 0; c < D; ++c) s.k_channel_abs_mean[size_t(c)] = float(chan[size_t(c)] / double(s.entries));
    std::vector<float> sorted = s.k_channel_abs_mean;
    std::nth_element(sorted.begin(), sorted.begin() + D / 2, sorted.end());
    const float median = sorted[size_t(D / 2)];
    for (int c = 0; c < D; ++c)
      if (median > 0 && s.k_channel_abs_mean[size_t(c)] > kOutlierRatio * median)
        s.outlier_channels.push_back(c);
  }
  return out;
}

}  // namespace kv
