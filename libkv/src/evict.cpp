#include "kv/evict.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>

#include "kv/attention.h"
#include "kv/error.h"
#include "kv/str.h"

namespace kv {
namespace {

constexpr float kAlwaysKept = std::numeric_limits<float>::infinity();

template <class E, size_t N>
E parse_name(const std::string& name, const char* option,
             const std::pair<const char*, E> (&table)[N]) {
  std::string known;
  for (const auto& [n, e] : table) {
    if (name == n) return e;
    known += known.empty() ? n : str(", ", n);
  }
  throw Error(Exit::usage, str(option, " '", name, "' is not one of ", known));
}

constexpr std::pair<const char*, EvictScore> kScores[] = {
    {"window", EvictScore::window}, {"h2o", EvictScore::h2o},     {"tova", EvictScore::tova},
    {"snapkv", EvictScore::snapkv}, {"knorm", EvictScore::knorm}, {"random", EvictScore::random}};
constexpr std::pair<const char*, EvictAlloc> kAllocs[] = {{"uniform", EvictAlloc::uniform},
                                                          {"pyramid", EvictAlloc::pyramid},
                                                          {"adaptive", EvictAlloc::adaptive}};

int sink_count(const EvictOptions& o) {
  return o.sink >= 0 ? o.sink : o.score == EvictScore::window ? 4 : 0;
}

// The budget of one head under a uniform allocation: --budget, or --ratio of its own entries
// (rounded, at least one), never more than it holds.
int64_t head_budget(const Layer& layer, int h, const EvictOptions& o) {
  const int64_t n = layer.head_entries(h);
  const int64_t b = evict_budget(o) > 0 ? evict_budget(o)
                                        : std::max<int64_t>(1, std::llround(o.ratio * double(n)));
  return std::min(b, n);
}

// The mean budget per head of a layer: PyramidKV's C, AdaKV's b.
int64_t mean_budget(const Layer& layer, const EvictOptions& o) {
  if (evict_budget(o) > 0) return evict_budget(o);
  const double heads = double(layer.head_offsets.size() - 1);
  return std::max<int64_t>(1, std::llround(o.ratio * double(layer.entries()) / heads));
}

int64_t recent_count(const Layer& layer, int h, const EvictOptions& o) {
  if (o.recent >= 0) return o.recent;
  if (o.score != EvictScore::h2o) return 0;
  // H2O splits its budget: half heavy hitters, half the most recent tokens.
  return (o.alloc == EvictAlloc::uniform ? head_budget(layer, h, o) : mean_budget(layer, o)) / 2;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A float view of a side-data tensor (stored f32 by our writers, but any float type is valid).
const float* as_f32(const Tensor& t, std::vector<float>& holder) {
  if (t.dtype() == DType::f32) return t.as<float>();
  holder = t.to_f32();
  return holder.data();
}

// 1-D pooling with stride 1 and kernel/2 padding on each side: avg counts the padding as zeros
// (PyTorch's avg_pool1d default, which SnapKV's code uses), max ignores it.
void pool_1d(const std::vector<float>& in, int kernel, PoolKind kind, std::vector<float>& out) {
  const int64_t n = int64_t(in.size()), half = kernel / 2;
  out.resize(in.size());
  for (int64_t t = 0; t < n; ++t) {
    const int64_t lo = std::max<int64_t>(0, t - half), hi = std::min(n - 1, t + half);
    float acc = kind == PoolKind::avg ? 0.0f : -INFINITY;
    for (int64_t u = lo; u <= hi; ++u)
      acc = kind == PoolKind::avg ? acc + in[size_t(u)] : std::max(acc, in[size_t(u)]);
    out[size_t(t)] = kind == PoolKind::avg ? acc / float(kernel) : acc;
  }
}

// SnapKV for one KV head: each query head of the group votes with the attention its window
// queries give each entry outside the window, the votes are pooled along the entries, and the
// group's pooled votes are combined (mean or max). Window entries are left to the caller.
void snapkv_head(const Header& header, const Layer& layer, int h, const float* window_q,
                 const EvictOptions& o, float* scores) {
  const ModelInfo& m = header.model;
  const int D = m.head_dim, G = m.group_size();
  const int64_t W = int64_t(header.window_positions.size());
  const int64_t begin = layer.head_offsets[size_t(h)], n = layer.head_entries(h);
  thread_local std::vector<float> log_mass, votes, vote, pooled, combined;
  const int32_t* positions = layer.positions.data() + begin;
  const float* bias =
      mass_bias(layer.mass.empty() ? nullptr : layer.mass.data() + begin, n, log_mass);

  std::vector<int64_t> outside;  // entries outside the window, in position order
  for (int64_t j = 0; j < n; ++j)
    if (!std::binary_search(header.window_positions.begin(), header.window_positions.end(),
                            positions[j]))
      outside.push_back(j);
  // Usually the window is the last W entries, and the votes are a plain vectorizable sum.
  const bool window_at_end = outside.empty() || outside.back() == int64_t(outside.size()) - 1;
  // Each window query sees the entries up to its position (positions increase along a head);
  // the group's query heads are consecutive rows of window_q, each a group of W queries.
  thread_local std::vector<int64_t> visible;
  visible.clear();
  for (int g = 0; g < G; ++g)
    for (const int32_t p : header.window_positions)
      visible.push_back(std::upper_bound(positions, positions + n, p) - positions);
  votes.resize(size_t(G * n));
  kvk::attention_votes(window_q + int64_t(h) * G * W * D, G * W, visible.data(), W, layer.k.dtype(),
                       static_cast<const std::byte*>(layer.k.data()) +
                           begin * D * int64_t(kvk::dtype_size(layer.k.dtype())),
                       n, D, 1.0f / std::sqrt(float(D)), bias, votes.data());
  vote.resize(outside.size());
  combined.assign(outside.size(), o.group_agg == GroupAgg::mean ? 0.0f : -INFINITY);
  for (int g = 0; g < G; ++g) {
    const float* row = votes.data() + int64_t(g) * n;
    if (window_at_end)
      std::copy(row, row + outside.size(), vote.begin());
    else
      for (size_t t = 0; t < outside.size(); ++t) vote[t] = row[outside[t]];
    pool_1d(vote, o.kernel, o.pool, pooled);
    for (size_t t = 0; t < outside.size(); ++t)
      combined[t] = o.group_agg == GroupAgg::mean ? combined[t] + pooled[t] / float(G)
                                                  : std::max(combined[t], pooled[t]);
  }
  for (size_t t = 0; t < outside.size(); ++t) scores[outside[t]] = combined[t];
}

// Per-position statistic of the query heads of KV head h ([H_q, T] rows), combined.
void group_statistic(const Header& header, int h, const float* stat, const int32_t* positions,
                     int64_t n, GroupAgg agg, float* scores) {
  const int G = header.model.group_size();
  const int64_t T = header.n_tokens;
  for (int64_t j = 0; j < n; ++j) {
    float s = agg == GroupAgg::mean ? 0.0f : -INFINITY;
    for (int g = 0; g < G; ++g) {
      const float a = stat[(int64_t(h) * G + g) * T + positions[j]];
      s = agg == GroupAgg::mean ? s + a / float(G) : std::max(s, a);
    }
    scores[j] = s;
  }
}

// Ranking inside a head and across heads: higher score first, ties to the more recent entry.
struct Ranked {
  float score;
  int32_t position;
  int32_t head;
  int64_t row;
};
struct RanksBefore {
  bool operator()(const Ranked& a, const Ranked& b) const {
    if (a.score != b.score) return a.score > b.score;
    if (a.position != b.position) return a.position > b.position;
    return a.head < b.head;
  }
};

// The entries of head h with their best `top` first (in no particular order among themselves):
// selection needs the split, not a full sort.
std::vector<Ranked> head_top(const Layer& layer, int h, const std::vector<float>& scores,
                             int64_t top) {
  std::vector<Ranked> r;
  r.reserve(size_t(layer.head_entries(h)));
  for (int64_t i = layer.head_offsets[size_t(h)]; i < layer.head_offsets[size_t(h) + 1]; ++i)
    r.push_back({scores[size_t(i)], layer.positions[size_t(i)], h, i});
  if (top > 0 && top < int64_t(r.size()))
    std::nth_element(r.begin(), r.begin() + top, r.end(), RanksBefore());
  return r;
}

}  // namespace

EvictScore parse_evict_score(const std::string& name) {
  return parse_name(name, "--score", kScores);
}
EvictAlloc parse_evict_alloc(const std::string& name) {
  return parse_name(name, "--alloc", kAllocs);
}
GroupAgg parse_group_agg(const std::string& name) {
  constexpr std::pair<const char*, GroupAgg> t[] = {{"mean", GroupAgg::mean},
                                                    {"max", GroupAgg::max}};
  return parse_name(name, "--group-agg", t);
}
PoolKind parse_pool(const std::string& name) {
  constexpr std::pair<const char*, PoolKind> t[] = {{"avg", PoolKind::avg}, {"max", PoolKind::max}};
  return parse_name(name, "--pool", t);
}
const char* evict_score_name(EvictScore s) {
  for (const auto& [n, e] : kScores)
    if (e == s) return n;
  return "?";
}
const char* evict_alloc_name(EvictAlloc a) {
  for (const auto& [n, e] : kAllocs)
    if (e == a) return n;
  return "?";
}

int64_t evict_budget(const EvictOptions& o) {
  if (o.budget != 0 || o.ratio != 0) return o.budget;
  return o.score == EvictScore::window && o.recent >= 0 ? sink_count(o) + o.recent : 0;
}

void check_evict_options(const Header& header, const EvictOptions& o) {
  const int64_t budget = evict_budget(o);
  const bool has_budget = budget != 0, has_ratio = o.ratio != 0;
  if (has_budget && has_ratio) throw Error(Exit::usage, "give --budget or --ratio, not both");
  if (!has_budget && !has_ratio) throw Error(Exit::usage, "give --budget N or --ratio r");
  if (has_budget && budget < 1)
    throw Error(Exit::usage, str("--budget ", budget, " must be at least 1"));
  if (has_budget && budget > header.n_tokens)
    throw Error(Exit::usage, str("--budget ", budget, " is larger than the sequence (",
                                 header.n_tokens, " tokens)"));
  if (has_ratio && !(o.ratio > 0 && o.ratio <= 1))
    throw Error(Exit::usage, str("--ratio ", o.ratio, " must be in (0, 1]"));
  if (o.sink < -1 || o.recent < -1)
    throw Error(Exit::usage, "--sink and --recent must not be negative");
  if (o.kernel < 1 || o.kernel % 2 == 0)
    throw Error(Exit::usage, str("--kernel ", o.kernel, " must be odd and at least 1"));
  if (!(o.beta >= 1)) throw Error(Exit::usage, str("--beta ", o.beta, " must be at least 1"));
  if (!(o.alpha >= 0 && o.alpha <= 1))
    throw Error(Exit::usage, str("--alpha ", o.alpha, " must be in [0, 1]"));
  const char* name = evict_score_name(o.score);
  if ((o.score == EvictScore::h2o || o.score == EvictScore::tova) && !header.has_attn_stats)
    throw Error(Exit::data, str("--score ", name,
                                " needs attention statistics, which this snapshot lacks "
                                "(capture with kv-capture --attn-stats)"));
  if (o.score == EvictScore::snapkv && !header.has_window())
    throw Error(Exit::data, str("--score snapkv needs observation-window queries, which this "
                                "snapshot lacks (capture with kv-capture --window W)"));
}

std::vector<float> score_layer(const Header& header, int l, const Layer& layer,
                               const EvictOptions& o) {
  const int H = header.model.n_kv_heads;
  std::vector<float> scores(size_t(layer.entries()));
  std::vector<float> holder;
  const float* stat = nullptr;
  if (o.score == EvictScore::h2o) stat = as_f32(layer.attn_acc, holder);
  if (o.score == EvictScore::tova) stat = as_f32(layer.attn_last, holder);
  const float* window_q = o.score == EvictScore::snapkv ? as_f32(layer.window_q, holder) : nullptr;
  std::vector<float> k32;
  if (o.score == EvictScore::knorm) k32 = layer.k.to_f32();
  const int D = header.model.head_dim;

#pragma omp parallel for schedule(dynamic) if (o.score == EvictScore::snapkv && H > 1)
  for (int h = 0; h < H; ++h) {
    const int64_t begin = layer.head_offsets[size_t(h)], n = layer.head_entries(h);
    float* s = scores.data() + begin;
    const int32_t* pos = layer.positions.data() + begin;
    switch (o.score) {
      case EvictScore::window:  // StreamingLLM: the most recent
        for (int64_t j = 0; j < n; ++j) s[j] = float(pos[j]);
        break;
      case EvictScore::h2o:
      case EvictScore::tova:
        group_statistic(header, h, stat, pos, n, o.group_agg, s);
        break;
      case EvictScore::snapkv:
        snapkv_head(header, layer, h, window_q, o, s);
        for (int64_t j = 0; j < n; ++j)
          if (std::binary_search(header.window_positions.begin(), header.window_positions.end(),
                                 pos[j]))
            s[j] = kAlwaysKept;
        break;
      case EvictScore::knorm:  // low key norm draws attention: keep it
        for (int64_t j = 0; j < n; ++j) {
          const float* k = k32.data() + (begin + j) * D;
          double sq = 0;
          for (int d = 0; d < D; ++d) sq += double(k[d]) * k[d];
          s[j] = -float(std::sqrt(sq));
        }
        break;
      case EvictScore::random:
        for (int64_t j = 0; j < n; ++j) {
          uint64_t x = splitmix64(splitmix64(splitmix64(o.seed) ^ uint64_t(l)) ^ uint64_t(h));
          x = splitmix64(x ^ uint64_t(uint32_t(pos[j])));
          s[j] = float(x >> 40) * 0x1p-24f;
        }
        break;
    }
  }
  for (int h = 0; h < H; ++h) {
    const int64_t begin = layer.head_offsets[size_t(h)], n = layer.head_entries(h);
    float* s = scores.data() + begin;
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(s[j]))
        throw Error(Exit::data, str("layer ", l, " head ", h, ": the ", evict_score_name(o.score),
                                    " score of position ", layer.positions[size_t(begin + j)],
                                    " is NaN (NaN in the side data it reads?)"));
    const int64_t sinks = std::min<int64_t>(sink_count(o), n);
    const int64_t recent = std::min(recent_count(layer, h, o), n);
    std::fill(s, s + sinks, kAlwaysKept);
    std::fill(s + n - recent, s + n, kAlwaysKept);
  }
  return scores;
}

std::vector<int64_t> allocate_layer(const Header& header, int l, const Layer& layer,
                                    const std::vector<float>& scores, const EvictOptions& o) {
  const int H = header.model.n_kv_heads, L = header.model.n_layers;
  std::vector<int64_t> kept(static_cast<size_t>(H)), protected_count(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h)
    for (int64_t i = layer.head_offsets[size_t(h)]; i < layer.head_offsets[size_t(h) + 1]; ++i)
      protected_count[size_t(h)] += scores[size_t(i)] == kAlwaysKept;

  switch (o.alloc) {
    case EvictAlloc::uniform:
      for (int h = 0; h < H; ++h) kept[size_t(h)] = head_budget(layer, h, o);
      break;
    case EvictAlloc::pyramid: {
      // PyramidKV: a linear schedule from 2(C - W) - min beyond the window at layer 0 down to
      // min = (C - W) / beta at the last layer; W is what the score always keeps.
      const double C = double(mean_budget(layer, o));
      const double W = double(*std::max_element(protected_count.begin(), protected_count.end()));
      if (C < W)
        throw Error(Exit::usage,
                    str("layer ", l, ": the mean budget ", C, " is smaller than the ", W,
                        " entries the ", evict_score_name(o.score), " score always keeps"));
      const double lo = (C - W) / o.beta, hi = 2 * (C - W) - lo;
      double b = L > 1 ? W + hi - double(l) * (hi - lo) / double(L - 1) : C;
      // A budget as large as the longest head compresses nothing (as in PyramidKV's code).
      int64_t longest = 0;
      for (int h = 0; h < H; ++h) longest = std::max(longest, layer.head_entries(h));
      if (C >= double(longest)) b = C;
      for (int h = 0; h < H; ++h)
        kept[size_t(h)] = std::min(int64_t(std::floor(b)), layer.head_entries(h));
      break;
    }
    case EvictAlloc::adaptive: {
      // AdaKV: every head keeps its own best alpha * b; the rest of the layer's budget goes to the
      // best remaining entries across all heads.
      std::vector<Ranked> rest;
      int64_t total = 0, floors = 0;
      for (int h = 0; h < H; ++h) {
        const int64_t b = head_budget(layer, h, o);
        const int64_t own = std::min<int64_t>(int64_t(std::floor(o.alpha * double(b))), b);
        total += b;
        floors += own;
        kept[size_t(h)] = own;
        const std::vector<Ranked> r = head_top(layer, h, scores, own);
        rest.insert(rest.end(), r.begin() + own, r.end());
      }
      const int64_t extra = std::min<int64_t>(total - floors, int64_t(rest.size()));
      std::nth_element(rest.begin(), rest.begin() + extra, rest.end(), RanksBefore());
      for (int64_t i = 0; i < extra; ++i) ++kept[size_t(rest[size_t(i)].head)];
      break;
    }
  }
  for (int h = 0; h < H; ++h)
    if (kept[size_t(h)] < protected_count[size_t(h)])
      throw Error(
          Exit::usage,
          str("layer ", l, " head ", h, " keeps ", kept[size_t(h)], " entries, fewer than the ",
              protected_count[size_t(h)], " the ", evict_score_name(o.score),
              " score always keeps (sinks, recent, window): raise the budget or lower "
              "--sink/--recent"));
  return kept;
}

Selection select_layer(const Header& header, int l, const Layer& layer,
                       const EvictOptions& options) {
  const std::vector<float> scores = score_layer(header, l, layer, options);
  const std::vector<int64_t> kept = allocate_layer(header, l, layer, scores, options);
  Selection selection(kept.size());
  for (int h = 0; h < int(kept.size()); ++h) {
    const std::vector<Ranked> ranked = head_top(layer, h, scores, kept[size_t(h)]);
    auto& rows = selection[size_t(h)];
    for (int64_t i = 0; i < kept[size_t(h)]; ++i) rows.push_back(ranked[size_t(i)].row);
    std::sort(rows.begin(), rows.end());
  }
  return selection;
}

void apply_selection(Layer& in, const Selection& kept, Layer& out) {
  int64_t total = 0;
  for (const auto& rows : kept) total += int64_t(rows.size());
  const int64_t D = in.k.cols();
  out.positions.resize(size_t(total));
  out.head_offsets.assign(1, 0);
  out.mass.resize(in.mass.empty() ? 0 : size_t(total));
  out.k.resize(in.k.dtype(), total, D);
  out.v.resize(in.v.dtype(), total, D);
  const size_t k_row = size_t(D) * kvk::dtype_size(in.k.dtype());
  const size_t v_row = size_t(D) * kvk::dtype_size(in.v.dtype());
  const auto* k_in = static_cast<const std::byte*>(in.k.data());
  const auto* v_in = static_cast<const std::byte*>(in.v.data());
  auto* k_out = static_cast<std::byte*>(out.k.data());
  auto* v_out = static_cast<std::byte*>(out.v.data());
  int64_t o = 0;
  for (const auto& rows : kept) {
    for (int64_t r : rows) {
      out.positions[size_t(o)] = in.positions[size_t(r)];
      if (!in.mass.empty()) out.mass[size_t(o)] = in.mass[size_t(r)];
      std::memcpy(k_out + size_t(o) * k_row, k_in + size_t(r) * k_row, k_row);
      std::memcpy(v_out + size_t(o) * v_row, v_in + size_t(r) * v_row, v_row);
      ++o;
    }
    out.head_offsets.push_back(o);
  }
  // The kept rows keep their encoding: the writer encodes them again (see encoding.h).
  out.k_encoding = in.k_encoding;
  out.v_encoding = in.v_encoding;
  std::swap(out.window_q, in.window_q);
  std::swap(out.attn_acc, in.attn_acc);
  std::swap(out.attn_last, in.attn_last);
  std::swap(out.probe_q, in.probe_q);
}

Snapshot evict_snapshot(const Snapshot& snap, const EvictOptions& options) {
  check_evict_options(snap.header, options);
  Snapshot out;
  out.header = snap.header;
  out.layers.resize(snap.layers.size());
  for (int l = 0; l < int(snap.layers.size()); ++l) {
    Layer in = snap.layers[size_t(l)];
    apply_selection(in, select_layer(snap.header, l, in, options), out.layers[size_t(l)]);
  }
  return out;
}

}  // namespace kv
