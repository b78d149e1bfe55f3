// Per-head key/value statistics of a layer (kv-inspect --stats, --plot).
#pragma once
#include <vector>

#include "kv/snapshot.h"

namespace kv {

struct HeadStats {
  int64_t entries = 0;
  double k_norm_mean = 0, k_norm_max = 0;  // L2 norms of key rows
  double v_norm_mean = 0, v_norm_max = 0;
  std::vector<float> k_channel_abs_mean;  // [head_dim] mean |k_c| over the head's entries
  std::vector<int> outlier_channels;      // channels whose mean |k| > kOutlierRatio x median
};

constexpr double kOutlierRatio = 4.0;

// Statistics of each KV head of `layer`; values are converted through `ops`.
std::vector<HeadStats> layer_stats(const Layer& layer, int n_kv_heads,
                                   const kvk::Ops& ops = kvk::cpu_ops());

}  // namespace kv
