// Token eviction and the attention helpers on hand-made caches small enough to work out on paper
// (head_dim 2, a few tokens, f32): every expected score, count and kept position below is derived
// in the comment beside it from ../shared/METHODS.md and the documented semantics of kv/evict.h
// and kv/attention.h, never from running the library.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "helpers.h"
#include "kv/attention.h"
#include "kv/error.h"
#include "kv/evict.h"

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// With head_dim 2, q . k / sqrt(2) = ln 2 * k_x for q = (kA, 0): exp of the logit is 2^k_x, so
// keys with k_x in {0, 1, 2} get unnormalized weights 1, 2, 4.
const float kA = float(std::sqrt(2.0) * std::log(2.0));

using Positions = std::vector<int32_t>;

kv::Header make_header(int layers, int q_heads, int kv_heads, int64_t tokens) {
  kv::Header h;
  h.model.name = "hand";
  h.model.n_layers = layers;
  h.model.n_q_heads = q_heads;
  h.model.n_kv_heads = kv_heads;
  h.model.head_dim = 2;
  h.model.rope_dims = 2;
  h.model.context_length = 64;
  h.n_tokens = tokens;
  h.tokens.assign(size_t(tokens), 1);
  return h;
}

// A head_dim-2 layer from the positions each KV head holds; k and v are [N, 2] row-major (zeros
// when not given).
kv::Layer make_layer(const std::vector<Positions>& heads, std::vector<float> k = {},
                     std::vector<float> v = {}, kv::DType dtype = kv::DType::f32) {
  kv::Layer out;
  out.head_offsets = {0};
  for (const Positions& p : heads) {
    out.positions.insert(out.positions.end(), p.begin(), p.end());
    out.head_offsets.push_back(out.entries());
  }
  const int64_t n = out.entries();
  if (k.empty()) k.assign(size_t(n) * 2, 0.0f);
  if (v.empty()) v.assign(size_t(n) * 2, 0.0f);
  EXPECT_EQ(k.size(), size_t(n) * 2);
  EXPECT_EQ(v.size(), size_t(n) * 2);
  out.k = kv::Tensor::from_f32(dtype, n, 2, k.data());
  out.v = kv::Tensor::from_f32(dtype, n, 2, v.data());
  return out;
}

Positions iota(int32_t n) {
  Positions p;
  for (int32_t i = 0; i < n; ++i) p.push_back(i);
  return p;
}

kv::Tensor f32(int64_t rows, int64_t cols, const std::vector<float>& values) {
  EXPECT_EQ(values.size(), size_t(rows * cols));
  return kv::Tensor::from_f32(kv::DType::f32, rows, cols, values.data());
}

kv::EvictOptions options(kv::EvictScore score, int64_t budget) {
  kv::EvictOptions o;
  o.score = score;
  o.budget = budget;
  return o;
}

void expect_scores(const std::vector<float>& got, const std::vector<float>& want,
                   float tol = 1e-6f) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE("row " + std::to_string(i));
    if (std::isinf(want[i]))
      EXPECT_EQ(got[i], want[i]);
    else
      EXPECT_NEAR(got[i], want[i], tol);
  }
}

// The code and message of the kv::Error `f` throws (Exit::ok and "" if none).
template <class F>
std::pair<kv::Exit, std::string> error_of(F&& f) {
  try {
    f();
  } catch (const kv::Error& e) {
    return {e.code(), e.what()};
  }
  return {kv::Exit::ok, ""};
}

// ---------------------------------------------------------------------------------------------
// window (StreamingLLM)

TEST(EvictWindow, SinksAndMostRecent) {
  // T = 8, budget 4, sink 2: positions 0 and 1 are sinks (+inf), the others score their position,
  // so the two best remaining are 7 and 6: kept {0, 1, 6, 7}.
  const kv::Header h = make_header(1, 1, 1, 8);
  const kv::Layer layer = make_layer({iota(8)});
  kv::EvictOptions o = options(kv::EvictScore::window, 4);
  o.sink = 2;
  EXPECT_NO_THROW(kv::check_evict_options(h, o));
  expect_scores(kv::score_layer(h, 0, layer, o), {kInf, kInf, 2, 3, 4, 5, 6, 7});
  EXPECT_EQ(kv::allocate_layer(h, 0, layer, kv::score_layer(h, 0, layer, o), o),
            std::vector<int64_t>{4});
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 1, 6, 7}}));
}

TEST(EvictWindow, DefaultSinkIsFour) {
  // --sink unset for window means 4 sinks: budget 6 of T = 8 keeps {0, 1, 2, 3} and {6, 7}.
  const kv::Header h = make_header(1, 1, 1, 8);
  const kv::Layer layer = make_layer({iota(8)});
  EXPECT_EQ(kv::select_layer(h, 0, layer, options(kv::EvictScore::window, 6)),
            (kv::Selection{{0, 1, 2, 3, 6, 7}}));
}

TEST(EvictWindow, RaggedHeadsKeepTheirOwnFirstAndLast) {
  // Head 0 holds positions {0, 2, 3, 5, 6, 7} (rows 0-5), head 1 {1, 4, 7} (rows 6-8). Sink 1,
  // budget 3: head 0 keeps its first entry (position 0) and its two latest (6, 7) = rows 0, 4, 5;
  // head 1 keeps all three rows 6, 7, 8.
  const kv::Header h = make_header(1, 2, 2, 8);
  const kv::Layer layer = make_layer({{0, 2, 3, 5, 6, 7}, {1, 4, 7}});
  kv::EvictOptions o = options(kv::EvictScore::window, 3);
  o.sink = 1;
  expect_scores(kv::score_layer(h, 0, layer, o), {kInf, 2, 3, 5, 6, 7, kInf, 4, 7});
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 4, 5}, {6, 7, 8}}));
}

TEST(EvictWindow, RecentWithoutBudgetGivesSinkPlusRecent) {
  // No --budget: window's budget is sink + recent = 1 + 2 = 3; the sink (0) and the two recent
  // entries (6, 7) are all +inf and fill it.
  const kv::Header h = make_header(1, 1, 1, 8);
  const kv::Layer layer = make_layer({iota(8)});
  kv::EvictOptions o = options(kv::EvictScore::window, 0);
  o.sink = 1;
  o.recent = 2;
  EXPECT_EQ(kv::evict_budget(o), 3);
  EXPECT_NO_THROW(kv::check_evict_options(h, o));
  expect_scores(kv::score_layer(h, 0, layer, o), {kInf, 1, 2, 3, 4, 5, kInf, kInf});
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 6, 7}}));
  // The default sink (4) counts too: 4 + 2 = 6.
  o.sink = -1;
  EXPECT_EQ(kv::evict_budget(o), 6);
  // Only window derives a budget from --recent; other scores and a missing --recent give 0.
  o.score = kv::EvictScore::h2o;
  EXPECT_EQ(kv::evict_budget(o), 0);
  o.score = kv::EvictScore::window;
  o.recent = -1;
  EXPECT_EQ(kv::evict_budget(o), 0);
  // --ratio sets the budget: 0.
  o.recent = 2;
  o.ratio = 0.5;
  EXPECT_EQ(kv::evict_budget(o), 0);
}

// ---------------------------------------------------------------------------------------------
// h2o

TEST(EvictH2O, HalfRecentHalfHeavyHitters) {
  // attn_acc = [.9 .1 .5 .3 .8 .2 .05 .01]; budget 4, recent defaults to 4 / 2 = 2: positions 6
  // and 7 are +inf, and the two highest of positions 0-5 are .9 (0) and .8 (4): kept {0, 4, 6, 7}.
  kv::Header h = make_header(1, 1, 1, 8);
  h.has_attn_stats = true;
  kv::Layer layer = make_layer({iota(8)});
  layer.attn_acc = f32(1, 8, {0.9f, 0.1f, 0.5f, 0.3f, 0.8f, 0.2f, 0.05f, 0.01f});
  kv::EvictOptions o = options(kv::EvictScore::h2o, 4);
  EXPECT_NO_THROW(kv::check_evict_options(h, o));
  expect_scores(kv::score_layer(h, 0, layer, o), {0.9f, 0.1f, 0.5f, 0.3f, 0.8f, 0.2f, kInf, kInf});
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 4, 6, 7}}));
  // --recent 0: the four heaviest alone, .9 .8 .5 .3 = positions {0, 2, 3, 4}.
  o.recent = 0;
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 2, 3, 4}}));
}

TEST(EvictH2O, GroupMeanAndMaxPickDifferently) {
  // One KV head read by two query heads (G = 2), T = 6, budget 4, recent 2 (positions 4, 5).
  //   q0: [.9 .1 .6 .5 0 0]     q1: [.1 .8 .6 .4 0 0]
  //   mean over 0-3: [.5 .45 .6 .45] -> best two .6 (2), .5 (0): kept {0, 2, 4, 5}
  //   max  over 0-3: [.9 .8 .6 .5]   -> best two .9 (0), .8 (1): kept {0, 1, 4, 5}
  kv::Header h = make_header(1, 2, 1, 6);
  h.has_attn_stats = true;
  kv::Layer layer = make_layer({iota(6)});
  layer.attn_acc = f32(2, 6, {0.9f, 0.1f, 0.6f, 0.5f, 0, 0, 0.1f, 0.8f, 0.6f, 0.4f, 0, 0});
  kv::EvictOptions o = options(kv::EvictScore::h2o, 4);
  expect_scores(kv::score_layer(h, 0, layer, o), {0.5f, 0.45f, 0.6f, 0.45f, kInf, kInf});
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 2, 4, 5}}));
  o.group_agg = kv::GroupAgg::max;
  expect_scores(kv::score_layer(h, 0, layer, o), {0.9f, 0.8f, 0.6f, 0.5f, kInf, kInf});
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 1, 4, 5}}));
}

TEST(EvictH2O, RatioSplitsEachHeadsOwnBudget) {
  // --ratio 0.5 on ragged heads: head 0 holds 8 entries (budget 4, recent 2), head 1 holds
  // positions {1, 3, 5, 7} (rows 8-11; budget 2, recent 1). Query head h reads attn_acc row h at
  // the entry's position (not its row).
  //   head 0: acc [.9 .1 .5 .3 .8 .2 .05 .01] -> 6, 7 recent, then 0 and 4: rows {0, 4, 6, 7}
  //   head 1: acc at 1, 3, 5 = .2 .7 .4, position 7 recent -> 3 and 7: rows {9, 11}
  kv::Header h = make_header(1, 2, 2, 8);
  h.has_attn_stats = true;
  kv::Layer layer = make_layer({iota(8), {1, 3, 5, 7}});
  layer.attn_acc = f32(2, 8,
                       {0.9f, 0.1f, 0.5f, 0.3f, 0.8f, 0.2f, 0.05f, 0.01f,  //
                        0.9f, 0.2f, 0.9f, 0.7f, 0.9f, 0.4f, 0.9f, 0.0f});
  kv::EvictOptions o = options(kv::EvictScore::h2o, 0);
  o.ratio = 0.5;
  EXPECT_NO_THROW(kv::check_evict_options(h, o));
  expect_scores(kv::score_layer(h, 0, layer, o),
                {0.9f, 0.1f, 0.5f, 0.3f, 0.8f, 0.2f, kInf, kInf, 0.2f, 0.7f, 0.4f, kInf});
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 4, 6, 7}, {9, 11}}));
}

TEST(EvictH2O, NaNStatisticIsADataError) {
  kv::Header h = make_header(1, 1, 1, 4);
  h.has_attn_stats = true;
  kv::Layer layer = make_layer({iota(4)});
  layer.attn_acc = f32(1, 4, {0.1f, NAN, 0.3f, 0.4f});
  kv::EvictOptions o = options(kv::EvictScore::h2o, 2);
  o.recent = 0;
  EXPECT_EQ(error_of([&] { kv::score_layer(h, 0, layer, o); }).first, kv::Exit::data);
}

// ---------------------------------------------------------------------------------------------
// tova

TEST(EvictTova, LastQueryTopKMeanAndMaxOverTheGroup) {
  // Two KV heads, four query heads (G = 2: query heads 0, 1 read KV head 0; 2, 3 read KV head 1),
  // T = 6, budget 2, no sinks or recent. Head 0 holds positions 0-5 (rows 0-5), head 1 holds
  // {0, 2, 3, 5} (rows 6-9).
  //   q0: [.05 .50 .00 .15 .20 .10]   q1: [.05 .00 .40 .30 .05 .20]
  //   head 0 mean [.05 .25 .2 .225 .125 .15] -> 1, 3;  max [.05 .5 .4 .3 .2 .2] -> 1, 2
  //   q2: [.35 .1 .1 .1 .1 .3]        q3: [0 .1 .5 .2 .1 .1]
  //   head 1 at positions 0, 2, 3, 5: mean [.175 .3 .15 .2] -> 2, 5 = rows 7, 9;
  //                                   max  [.35 .5 .2 .3]   -> 0, 2 = rows 6, 7
  kv::Header h = make_header(1, 4, 2, 6);
  h.has_attn_stats = true;
  kv::Layer layer = make_layer({iota(6), {0, 2, 3, 5}});
  layer.attn_last = f32(4, 6, {0.05f, 0.5f, 0.0f, 0.15f, 0.2f,  0.1f,  //
                               0.05f, 0.0f, 0.4f, 0.3f,  0.05f, 0.2f,  //
                               0.35f, 0.1f, 0.1f, 0.1f,  0.1f,  0.3f,  //
                               0.0f,  0.1f, 0.5f, 0.2f,  0.1f,  0.1f});
  kv::EvictOptions o = options(kv::EvictScore::tova, 2);
  EXPECT_NO_THROW(kv::check_evict_options(h, o));
  expect_scores(kv::score_layer(h, 0, layer, o),
                {0.05f, 0.25f, 0.2f, 0.225f, 0.125f, 0.15f, 0.175f, 0.3f, 0.15f, 0.2f});
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{1, 3}, {7, 9}}));
  o.group_agg = kv::GroupAgg::max;
  expect_scores(kv::score_layer(h, 0, layer, o),
                {0.05f, 0.5f, 0.4f, 0.3f, 0.2f, 0.2f, 0.35f, 0.5f, 0.2f, 0.3f});
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{1, 2}, {6, 7}}));
}

// ---------------------------------------------------------------------------------------------
// snapkv
//
// T = 8, one KV head, observation window at positions {6, 7}. Keys k_j = (x_j, y_j):
//   position  0      1      2      3      4      5      6      7
//   k         (0,1)  (0,0)  (1,1)  (1,2)  (2,0)  (2,2)  (1,0)  (2,0)
// Window query at 6 is (kA, 0): exp(logit_j) = 2^x_j = [1 1 2 2 4 4 2] over positions 0-6, sum 16
// (position 7 is after it and masked; unmasked it would add 4 and make the sum 20).
// Window query at 7 is (0, kA): exp(logit_j) = 2^y_j = [2 1 2 4 1 4 1 1], sum 16.
// Votes of positions 0-5 (outside the window): (2^x + 2^y) / 16 = [3 2 4 6 5 8] / 16.

kv::Header snapkv_header(int q_heads) {
  kv::Header h = make_header(1, q_heads, 1, 8);
  h.window_positions = {6, 7};
  return h;
}

kv::Layer snapkv_layer(int q_heads) {
  kv::Layer layer = make_layer({iota(8)}, {0, 1, 0, 0, 1, 1, 1, 2, 2, 0, 2, 2, 1, 0, 2, 0});
  std::vector<float> q = {kA, 0, 0, kA};
  // A second query head (when asked) has zero queries: uniform attention, 1/7 from the query at 6
  // and 1/8 from the query at 7, so every outside entry gets the vote 1/7 + 1/8 = 15/56.
  if (q_heads == 2) q.insert(q.end(), {0, 0, 0, 0});
  layer.window_q = f32(2 * q_heads, 2, q);
  return layer;
}

TEST(EvictSnapKV, KernelOneIsTheRawVote) {
  // No pooling: scores are the votes [3 2 4 6 5 8] / 16, window +inf. Budget 4 = the window and
  // the two best votes, 8/16 (5) and 6/16 (3): kept {3, 5, 6, 7}.
  const kv::Header h = snapkv_header(1);
  const kv::Layer layer = snapkv_layer(1);
  kv::EvictOptions o = options(kv::EvictScore::snapkv, 4);
  o.kernel = 1;
  EXPECT_NO_THROW(kv::check_evict_options(h, o));
  expect_scores(kv::score_layer(h, 0, layer, o),
                {3 / 16.f, 2 / 16.f, 4 / 16.f, 6 / 16.f, 5 / 16.f, 8 / 16.f, kInf, kInf}, 1e-5f);
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{3, 5, 6, 7}}));
}

TEST(EvictSnapKV, AvgPoolingCountsThePaddingAsZeros) {
  // Kernel 3, avg: each vote sums itself and its neighbours among positions 0-5, zero beyond the
  // ends, over 3: [3+2, 3+2+4, 2+4+6, 4+6+5, 6+5+8, 5+8] / 48 = [5 9 12 15 19 13] / 48.
  // Best two: 19 (4) and 15 (3): kept {3, 4, 6, 7}. (Dividing the ends by 2 instead would make
  // position 5 13/32 and keep {4, 5}.)
  const kv::Header h = snapkv_header(1);
  const kv::Layer layer = snapkv_layer(1);
  kv::EvictOptions o = options(kv::EvictScore::snapkv, 4);
  o.kernel = 3;
  expect_scores(kv::score_layer(h, 0, layer, o),
                {5 / 48.f, 9 / 48.f, 12 / 48.f, 15 / 48.f, 19 / 48.f, 13 / 48.f, kInf, kInf},
                1e-5f);
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{3, 4, 6, 7}}));
  // The default kernel 5: [3+2+4, 3+2+4+6, 3+2+4+6+5, 2+4+6+5+8, 4+6+5+8, 6+5+8] / 80.
  o.kernel = 5;
  expect_scores(kv::score_layer(h, 0, layer, o),
                {9 / 80.f, 15 / 80.f, 20 / 80.f, 25 / 80.f, 23 / 80.f, 19 / 80.f, kInf, kInf},
                1e-5f);
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{3, 4, 6, 7}}));
}

TEST(EvictSnapKV, MaxPooling) {
  // Kernel 3, max: [max(3,2), max(3,2,4), max(2,4,6), max(4,6,5), max(6,5,8), max(5,8)] / 16
  // = [3 4 6 6 8 8] / 16: positions 4 and 5 lead, kept {4, 5, 6, 7}.
  const kv::Header h = snapkv_header(1);
  const kv::Layer layer = snapkv_layer(1);
  kv::EvictOptions o = options(kv::EvictScore::snapkv, 4);
  o.kernel = 3;
  o.pool = kv::PoolKind::max;
  expect_scores(kv::score_layer(h, 0, layer, o),
                {3 / 16.f, 4 / 16.f, 6 / 16.f, 6 / 16.f, 8 / 16.f, 8 / 16.f, kInf, kInf}, 1e-5f);
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{4, 5, 6, 7}}));
}

TEST(EvictSnapKV, WindowAlwaysKept) {
  // A budget of 2 = W keeps exactly the window {6, 7}, whatever the votes outside; a budget of 1
  // cannot hold the window.
  const kv::Header h = snapkv_header(1);
  const kv::Layer layer = snapkv_layer(1);
  kv::EvictOptions o = options(kv::EvictScore::snapkv, 2);
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{6, 7}}));
  o.budget = 1;
  EXPECT_EQ(error_of([&] { kv::select_layer(h, 0, layer, o); }).first, kv::Exit::usage);
}

TEST(EvictSnapKV, GroupMeanAndMax) {
  // Query head 1 votes 15/56 for every outside entry. Kernel 1:
  //   mean = (v + 15/56) / 2 with v = [3 2 4 6 5 8] / 16
  //   max  = max(v, 15/56 = .268) = [15/56 15/56 15/56 6/16 5/16 8/16]
  const kv::Header h = snapkv_header(2);
  const kv::Layer layer = snapkv_layer(2);
  kv::EvictOptions o = options(kv::EvictScore::snapkv, 4);
  o.kernel = 1;
  const float u = 15 / 56.f;
  std::vector<float> mean;
  for (float v : {3 / 16.f, 2 / 16.f, 4 / 16.f, 6 / 16.f, 5 / 16.f, 8 / 16.f})
    mean.push_back((v + u) / 2);
  mean.insert(mean.end(), {kInf, kInf});
  expect_scores(kv::score_layer(h, 0, layer, o), mean, 1e-5f);
  o.group_agg = kv::GroupAgg::max;
  expect_scores(kv::score_layer(h, 0, layer, o),
                {u, u, u, 6 / 16.f, 5 / 16.f, 8 / 16.f, kInf, kInf}, 1e-5f);
}

// ---------------------------------------------------------------------------------------------
// knorm, random

TEST(EvictKnorm, LowestNormKeysKept) {
  // Keys (3,4) (0,1) (2,0) (0,-3) (-4,0) (0,.5): norms 5 1 2 3 4 .5, scores their negatives.
  // Budget 3 keeps the norms .5, 1, 2 = positions {1, 2, 5}; with sink 1, position 0 plus the
  // two lowest {1, 5}. f16 keys hold these values exactly and give the same.
  const kv::Header h = make_header(1, 1, 1, 6);
  const std::vector<float> k = {3, 4, 0, 1, 2, 0, 0, -3, -4, 0, 0, 0.5f};
  for (kv::DType dtype : {kv::DType::f32, kv::DType::f16}) {
    const kv::Layer layer = make_layer({iota(6)}, k, {}, dtype);
    kv::EvictOptions o = options(kv::EvictScore::knorm, 3);
    EXPECT_NO_THROW(kv::check_evict_options(h, o));
    expect_scores(kv::score_layer(h, 0, layer, o), {-5, -1, -2, -3, -4, -0.5f});
    EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{1, 2, 5}}));
    o.sink = 1;
    EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 1, 5}}));
  }
}

TEST(EvictRandom, SeededAndInUnitInterval) {
  const kv::Header h = make_header(1, 1, 1, 64);
  const kv::Layer layer = make_layer({iota(64)});
  kv::EvictOptions o = options(kv::EvictScore::random, 8);
  const std::vector<float> s = kv::score_layer(h, 0, layer, o);
  for (float x : s) {
    EXPECT_GE(x, 0.0f);
    EXPECT_LT(x, 1.0f);
  }
  const kv::Selection a = kv::select_layer(h, 0, layer, o);
  ASSERT_EQ(a.size(), 1u);
  EXPECT_EQ(a[0].size(), 8u);
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), a);
  EXPECT_EQ(kv::score_layer(h, 0, layer, o), s);
  // 8 of 64 chosen by another seed: the same set by chance has probability 1 / C(64, 8).
  o.seed = 2;
  EXPECT_NE(kv::select_layer(h, 0, layer, o), a);
  // Sinks still hold: with sink 2, positions 0 and 1 are +inf and always kept.
  o.sink = 2;
  const kv::Selection b = kv::select_layer(h, 0, layer, o);
  ASSERT_EQ(b[0].size(), 8u);
  EXPECT_EQ(b[0][0], 0);
  EXPECT_EQ(b[0][1], 1);
}

// ---------------------------------------------------------------------------------------------
// allocation

TEST(EvictUniform, RatioPerRaggedHead) {
  // Heads of 6 and 4 entries; budget per head = max(1, round(ratio * entries)):
  //   .3: 1.8 -> 2, 1.2 -> 1     .7: 4.2 -> 4, 2.8 -> 3     .1: .6 -> 1, .4 -> 0 -> 1
  //   1: 6, 4                    --budget 5: 5, and min(5, 4) = 4
  const kv::Header h = make_header(1, 2, 2, 6);
  const kv::Layer layer = make_layer({iota(6), {0, 2, 3, 5}});
  kv::EvictOptions o = options(kv::EvictScore::window, 0);
  o.sink = 0;
  const std::vector<float> s = kv::score_layer(h, 0, layer, o);
  const std::pair<double, std::vector<int64_t>> cases[] = {
      {0.3, {2, 1}}, {0.7, {4, 3}}, {0.1, {1, 1}}, {1.0, {6, 4}}};
  for (const auto& [ratio, want] : cases) {
    SCOPED_TRACE("ratio " + std::to_string(ratio));
    o.ratio = ratio;
    EXPECT_NO_THROW(kv::check_evict_options(h, o));
    EXPECT_EQ(kv::allocate_layer(h, 0, layer, s, o), want);
  }
  // Ratio .3 keeps the latest 2 of head 0 (positions 4, 5 = rows 4, 5) and the latest 1 of
  // head 1 (position 5 = row 9).
  o.ratio = 0.3;
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{4, 5}, {9}}));
  o.ratio = 0;
  o.budget = 5;
  EXPECT_EQ(kv::allocate_layer(h, 0, layer, s, o), (std::vector<int64_t>{5, 4}));
}

TEST(EvictPyramid, LinearScheduleOverLayers) {
  // L = 3, C = 8, W = 2 (window score with sink 1 and recent 1 always keeps two), beta 4:
  //   min = (8 - 2) / 4 = 1.5, max = 2 * 6 - 1.5 = 10.5, step (max - min) / (L - 1) = 4.5
  //   layer 0: floor(2 + 10.5) = 12, layer 1: floor(12.5 - 4.5) = 8, layer 2: floor(3.5) = 3
  // Both heads (16 entries each) get the same count; a head holding only 10 entries keeps 10.
  const kv::Header h = make_header(3, 2, 2, 16);
  const kv::Layer layer = make_layer({iota(16), iota(16)});
  kv::EvictOptions o = options(kv::EvictScore::window, 8);
  o.alloc = kv::EvictAlloc::pyramid;
  o.sink = 1;
  o.recent = 1;
  o.beta = 4;
  EXPECT_NO_THROW(kv::check_evict_options(h, o));
  const int64_t want[] = {12, 8, 3};
  for (int l = 0; l < 3; ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const std::vector<float> s = kv::score_layer(h, l, layer, o);
    EXPECT_EQ(kv::allocate_layer(h, l, layer, s, o), (std::vector<int64_t>{want[l], want[l]}));
  }
  // Layer 2 keeps 3 per head: the sink 0, the recent 15, then the next latest 14.
  EXPECT_EQ(kv::select_layer(h, 2, layer, o), (kv::Selection{{0, 14, 15}, {16, 30, 31}}));
  const kv::Layer ragged = make_layer({iota(16), iota(10)});
  EXPECT_EQ(kv::allocate_layer(h, 0, ragged, kv::score_layer(h, 0, ragged, o), o),
            (std::vector<int64_t>{12, 10}));
  // --ratio .5 of 32 entries over 2 heads gives the same C = 8.
  o.budget = 0;
  o.ratio = 0.5;
  for (int l = 0; l < 3; ++l) {
    SCOPED_TRACE("ratio, layer " + std::to_string(l));
    const std::vector<float> s = kv::score_layer(h, l, layer, o);
    EXPECT_EQ(kv::allocate_layer(h, l, layer, s, o), (std::vector<int64_t>{want[l], want[l]}));
  }
}

TEST(EvictPyramid, DefaultBeta) {
  // C = 12, W = 2, beta 20: min = 10 / 20 = .5, max = 20 - .5 = 19.5, step 9.5:
  //   layer 0: floor(21.5) = 21, layer 1: floor(12) = 12, layer 2: floor(2.5) = 2
  const kv::Header h = make_header(3, 1, 1, 24);
  const kv::Layer layer = make_layer({iota(24)});
  kv::EvictOptions o = options(kv::EvictScore::window, 12);
  o.alloc = kv::EvictAlloc::pyramid;
  o.sink = 1;
  o.recent = 1;
  const int64_t want[] = {21, 12, 2};
  for (int l = 0; l < 3; ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const std::vector<float> s = kv::score_layer(h, l, layer, o);
    EXPECT_EQ(kv::allocate_layer(h, l, layer, s, o), std::vector<int64_t>{want[l]});
  }
}

TEST(EvictPyramid, BudgetBelowProtectedIsUsageError) {
  // C = 3 while sink 2 + recent 2 always keep W = 4.
  const kv::Header h = make_header(3, 1, 1, 8);
  const kv::Layer layer = make_layer({iota(8)});
  kv::EvictOptions o = options(kv::EvictScore::window, 3);
  o.alloc = kv::EvictAlloc::pyramid;
  o.sink = 2;
  o.recent = 2;
  const std::vector<float> s = kv::score_layer(h, 0, layer, o);
  EXPECT_EQ(error_of([&] { kv::allocate_layer(h, 0, layer, s, o); }).first, kv::Exit::usage);
}

TEST(EvictAdaptive, FloorThenGlobalTop) {
  // Two heads of 6 entries, budget 3 (layer total 6), tova scores with G = 1:
  //   head 0: [.9 .8 .7 .6 .5 .05]   head 1: [.1 .02 .03 .04 .01 .06]
  // alpha .2: floor(.6) = 0 own each; global top 6 = .9 .8 .7 .6 .5 (head 0) and .1 (head 1):
  //   counts {5, 1}; head 0 keeps positions 0-4, head 1 position 0 (row 6).
  // alpha .7: floor(2.1) = 2 own each: head 0 {.9 .8}, head 1 {.1 .06}; the 2 left go to the best
  //   of the rest, .7 and .6 (head 0): counts {4, 2}; head 1 keeps positions 0 and 5 (rows 6, 11).
  // alpha 1: every head keeps its own 3.
  kv::Header h = make_header(1, 2, 2, 6);
  h.has_attn_stats = true;
  kv::Layer layer = make_layer({iota(6), iota(6)});
  layer.attn_last = f32(2, 6,
                        {0.9f, 0.8f, 0.7f, 0.6f, 0.5f, 0.05f,  //
                         0.1f, 0.02f, 0.03f, 0.04f, 0.01f, 0.06f});
  kv::EvictOptions o = options(kv::EvictScore::tova, 3);
  o.alloc = kv::EvictAlloc::adaptive;
  EXPECT_NO_THROW(kv::check_evict_options(h, o));
  const std::vector<float> s = kv::score_layer(h, 0, layer, o);
  EXPECT_EQ(kv::allocate_layer(h, 0, layer, s, o), (std::vector<int64_t>{5, 1}));
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 1, 2, 3, 4}, {6}}));
  o.alpha = 0.7;
  EXPECT_EQ(kv::allocate_layer(h, 0, layer, s, o), (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 1, 2, 3}, {6, 11}}));
  o.alpha = 1;
  EXPECT_EQ(kv::allocate_layer(h, 0, layer, s, o), (std::vector<int64_t>{3, 3}));
}

// ---------------------------------------------------------------------------------------------
// apply_selection, evict_snapshot

TEST(EvictApply, CopiesRowsInStoredTypeAndMovesSideData) {
  // Head 0 holds positions {0, 1, 2, 3} (rows 0-3), head 1 {1, 2, 4} (rows 4-6). Row r has
  // k = (r, -r/2) in f16 and v = (r/4, 8 - r) in bf16, all exact. Keeping rows {1, 3} and {4, 6}
  // gives positions {1, 3, 1, 4}, offsets {0, 2, 4}, mass {2, 1, 3, .5}.
  std::vector<float> k, v;
  for (int r = 0; r < 7; ++r) {
    k.insert(k.end(), {float(r), -0.5f * float(r)});
    v.insert(v.end(), {0.25f * float(r), 8.0f - float(r)});
  }
  kv::Layer in = make_layer({{0, 1, 2, 3}, {1, 2, 4}}, k, {}, kv::DType::f16);
  in.v = kv::Tensor::from_f32(kv::DType::bf16, 7, 2, v.data());
  in.mass = {1, 2, 1, 1, 3, 1, 0.5f};
  in.window_q = f32(2, 2, {1, 2, 3, 4});
  in.attn_acc = f32(1, 5, {0.1f, 0.2f, 0.3f, 0.4f, 0.5f});
  in.attn_last = f32(1, 5, {0.5f, 0.4f, 0.3f, 0.2f, 0.1f});
  in.probe_q = f32(1, 2, {7, 8});
  const kv::Layer original = in;

  kv::Layer out;
  kv::apply_selection(in, {{1, 3}, {4, 6}}, out);
  EXPECT_EQ(out.positions, (std::vector<int32_t>{1, 3, 1, 4}));
  EXPECT_EQ(out.head_offsets, (std::vector<int64_t>{0, 2, 4}));
  EXPECT_EQ(out.mass, (std::vector<float>{2, 1, 3, 0.5f}));
  ASSERT_EQ(out.k.dtype(), kv::DType::f16);
  ASSERT_EQ(out.v.dtype(), kv::DType::bf16);
  ASSERT_EQ(out.k.rows(), 4);
  ASSERT_EQ(out.k.cols(), 2);
  ASSERT_EQ(out.v.rows(), 4);
  EXPECT_EQ(out.k.to_f32(), (std::vector<float>{1, -0.5f, 3, -1.5f, 4, -2, 6, -3}));
  EXPECT_EQ(out.v.to_f32(), (std::vector<float>{0.25f, 7, 0.75f, 5, 1, 4, 1.5f, 2}));
  const int64_t rows[] = {1, 3, 4, 6};
  for (int o = 0; o < 4; ++o)
    for (int c = 0; c < 2; ++c) {
      EXPECT_EQ(out.k.as<uint16_t>()[o * 2 + c], original.k.as<uint16_t>()[rows[o] * 2 + c]);
      EXPECT_EQ(out.v.as<uint16_t>()[o * 2 + c], original.v.as<uint16_t>()[rows[o] * 2 + c]);
    }
  EXPECT_TRUE(out.window_q.same_contents(original.window_q));
  EXPECT_TRUE(out.attn_acc.same_contents(original.attn_acc));
  EXPECT_TRUE(out.attn_last.same_contents(original.attn_last));
  EXPECT_TRUE(out.probe_q.same_contents(original.probe_q));

  // Reusing `out` for a layer without mass and an empty head: mass is cleared, head 0 is empty.
  kv::Layer in2 = make_layer({{5}, {6, 7}}, {1, 1, 2, 2, 3, 3});
  kv::apply_selection(in2, {{}, {2}}, out);
  EXPECT_EQ(out.positions, (std::vector<int32_t>{7}));
  EXPECT_EQ(out.head_offsets, (std::vector<int64_t>{0, 0, 1}));
  EXPECT_TRUE(out.mass.empty());
  EXPECT_EQ(out.k.dtype(), kv::DType::f32);
  EXPECT_EQ(out.k.to_f32(), (std::vector<float>{3, 3}));
}

TEST(EvictSnapshot, WindowOnTinySnapshot) {
  // tiny_snapshot: 6 tokens, 2 KV heads; layer 0 has positions 0-5 in both heads, layer 1 is
  // ragged (head 0 {0, 2, 5} rows 0-2 with mass 1 2 3, head 1 {1, 3, 4, 5} rows 3-6 with mass
  // 1 1 1.5 1). Window, sink 1, budget 3: each head keeps its first and its two latest.
  //   layer 0: {0, 4, 5} twice; layer 1: head 0 all of {0, 2, 5}, head 1 {1, 4, 5} = rows 3, 5, 6.
  const kv::Snapshot snap = kvtest::tiny_snapshot(kv::DType::f16, true, true);
  kv::EvictOptions o = options(kv::EvictScore::window, 3);
  o.sink = 1;
  const kv::Snapshot out = kv::evict_snapshot(snap, o);
  ASSERT_EQ(out.layers.size(), 2u);
  EXPECT_EQ(out.header.window_positions, snap.header.window_positions);
  EXPECT_EQ(out.header.n_tokens, 6);
  EXPECT_EQ(out.layers[0].positions, (std::vector<int32_t>{0, 4, 5, 0, 4, 5}));
  EXPECT_EQ(out.layers[0].head_offsets, (std::vector<int64_t>{0, 3, 6}));
  EXPECT_EQ(out.layers[1].positions, (std::vector<int32_t>{0, 2, 5, 1, 4, 5}));
  EXPECT_EQ(out.layers[1].head_offsets, (std::vector<int64_t>{0, 3, 6}));
  EXPECT_EQ(out.layers[1].mass, (std::vector<float>{1, 2, 3, 1, 1.5f, 1}));
  // Layer 1 k is 0.25 * (4 row + col) - 1: kept row 4 is input row 5 = [4 4.25 4.5 4.75].
  const std::vector<float> k1 = out.layers[1].k.to_f32();
  EXPECT_EQ(out.layers[1].k.dtype(), kv::DType::f16);
  EXPECT_EQ(std::vector<float>(k1.begin() + 16, k1.begin() + 20),
            (std::vector<float>{4, 4.25f, 4.5f, 4.75f}));
  for (int l = 0; l < 2; ++l) {
    EXPECT_TRUE(out.layers[size_t(l)].window_q.same_contents(snap.layers[size_t(l)].window_q));
    EXPECT_TRUE(out.layers[size_t(l)].attn_acc.same_contents(snap.layers[size_t(l)].attn_acc));
  }
}

// ---------------------------------------------------------------------------------------------
// errors and names

TEST(EvictErrors, UsageErrors) {
  const kv::Header h = make_header(1, 1, 1, 8);
  auto code = [&](const kv::EvictOptions& o) {
    return error_of([&] { kv::check_evict_options(h, o); }).first;
  };
  kv::EvictOptions o = options(kv::EvictScore::knorm, 4);
  EXPECT_EQ(code(o), kv::Exit::ok);
  o.budget = 0;  // neither --budget nor --ratio
  EXPECT_EQ(code(o), kv::Exit::usage);
  o.budget = -1;
  EXPECT_EQ(code(o), kv::Exit::usage);
  o.budget = 9;  // > 8 tokens
  EXPECT_EQ(code(o), kv::Exit::usage);
  o.budget = 8;
  EXPECT_EQ(code(o), kv::Exit::ok);
  o.budget = 0;
  for (double r : {0.0, -0.5, 1.5}) {
    o.ratio = r;
    EXPECT_EQ(code(o), kv::Exit::usage) << "ratio " << r;
  }
  o.ratio = 1;
  EXPECT_EQ(code(o), kv::Exit::ok);
  o.budget = 4;  // both
  EXPECT_EQ(code(o), kv::Exit::usage);
  o.ratio = 0;
  for (int kernel : {4, 0, -1}) {
    o.kernel = kernel;
    EXPECT_EQ(code(o), kv::Exit::usage) << "kernel " << kernel;
  }
  o.kernel = 3;
  EXPECT_EQ(code(o), kv::Exit::ok);
  o.beta = 0.5;
  EXPECT_EQ(code(o), kv::Exit::usage);
  o.beta = 20;
  o.alpha = 1.5;
  EXPECT_EQ(code(o), kv::Exit::usage);
  o.alpha = 0.2;
  o.sink = -2;
  EXPECT_EQ(code(o), kv::Exit::usage);
}

TEST(EvictErrors, MissingSideDataIsDataErrorNamingTheCaptureOption) {
  kv::Header h = make_header(1, 1, 1, 8);
  for (kv::EvictScore s : {kv::EvictScore::h2o, kv::EvictScore::tova}) {
    const auto [code, message] = error_of([&] { kv::check_evict_options(h, options(s, 4)); });
    EXPECT_EQ(code, kv::Exit::data) << kv::evict_score_name(s);
    EXPECT_NE(message.find("--attn-stats"), std::string::npos) << message;
  }
  const auto [code, message] =
      error_of([&] { kv::check_evict_options(h, options(kv::EvictScore::snapkv, 4)); });
  EXPECT_EQ(code, kv::Exit::data);
  EXPECT_NE(message.find("--window"), std::string::npos) << message;
  // With the side data present they pass.
  h.has_attn_stats = true;
  h.window_positions = {6, 7};
  for (kv::EvictScore s : {kv::EvictScore::h2o, kv::EvictScore::tova, kv::EvictScore::snapkv})
    EXPECT_EQ(error_of([&] { kv::check_evict_options(h, options(s, 4)); }).first, kv::Exit::ok);
}

TEST(EvictErrors, ProtectedBeyondBudgetIsUsageError) {
  // Sink 3 + recent 3 = 6 entries always kept, budget 4: allocate and select refuse.
  const kv::Header h = make_header(1, 1, 1, 8);
  const kv::Layer layer = make_layer({iota(8)});
  kv::EvictOptions o = options(kv::EvictScore::window, 4);
  o.sink = 3;
  o.recent = 3;
  const std::vector<float> s = kv::score_layer(h, 0, layer, o);
  EXPECT_EQ(error_of([&] { kv::allocate_layer(h, 0, layer, s, o); }).first, kv::Exit::usage);
  EXPECT_EQ(error_of([&] { kv::select_layer(h, 0, layer, o); }).first, kv::Exit::usage);
  // Adaptive too: head 0 would keep 4 of its 6 protected entries.
  o.alloc = kv::EvictAlloc::adaptive;
  EXPECT_EQ(error_of([&] { kv::select_layer(h, 0, layer, o); }).first, kv::Exit::usage);
  // Sink 2 + recent 2 fit exactly.
  o.alloc = kv::EvictAlloc::uniform;
  o.sink = 2;
  o.recent = 2;
  EXPECT_EQ(kv::select_layer(h, 0, layer, o), (kv::Selection{{0, 1, 6, 7}}));
}

TEST(EvictNames, ParseAndPrint) {
  EXPECT_EQ(kv::parse_evict_score("h2o"), kv::EvictScore::h2o);
  EXPECT_EQ(kv::parse_evict_score("snapkv"), kv::EvictScore::snapkv);
  EXPECT_EQ(kv::parse_evict_alloc("pyramid"), kv::EvictAlloc::pyramid);
  EXPECT_EQ(kv::parse_group_agg("max"), kv::GroupAgg::max);
  EXPECT_EQ(kv::parse_pool("avg"), kv::PoolKind::avg);
  EXPECT_STREQ(kv::evict_score_name(kv::EvictScore::knorm), "knorm");
  EXPECT_STREQ(kv::evict_alloc_name(kv::EvictAlloc::adaptive), "adaptive");
  EXPECT_EQ(error_of([] { kv::parse_evict_score("h20"); }).first, kv::Exit::usage);
  EXPECT_EQ(error_of([] { kv::parse_evict_alloc("flat"); }).first, kv::Exit::usage);
  EXPECT_EQ(error_of([] { kv::parse_group_agg("sum"); }).first, kv::Exit::usage);
  EXPECT_EQ(error_of([] { kv::parse_pool("min"); }).first, kv::Exit::usage);
}

// ---------------------------------------------------------------------------------------------
// attention helpers
//
// One head of 3 entries at positions 0, 1, 2: k = (1,0) (0,0) (1,0), v = (1,0) (0,1) (2,2),
// mass 1 2 1. With q = (kA, 0) the logits are ln 2, 0, ln 2, plus log mass: ln 2 each, so a query
// that sees all three weights them 1/3 each and reads (1 + 0 + 2, 0 + 1 + 2) / 3 = (1, 1).

struct MassHead {
  std::vector<float> k = {1, 0, 0, 0, 1, 0}, v = {1, 0, 0, 1, 2, 2}, mass = {1, 2, 1};
  std::vector<int32_t> positions = {0, 1, 2};
  kv::HeadView view() const {
    kv::HeadView h;
    h.k = k.data();
    h.v = v.data();
    h.positions = positions.data();
    h.mass = mass.data();
    h.n = 3;
    h.dim = 2;
    return h;
  }
};

void expect_near(const std::vector<float>& got, const std::vector<float>& want, float tol = 1e-5f) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "index " << i;
}

TEST(Attention, WeightsWithMassAndCausalMask) {
  // Queries (kA, 0) at positions 0, 1, 2 and -1:
  //   at 0: only entry 0 is visible -> [1 0 0], output (1, 0)
  //   at 1: entries 0, 1 with exp 2 and 1 * 2 -> [.5 .5 0], output (.5, .5)
  //   at 2: [1/3 1/3 1/3], output (1, 1)
  //   at -1: nothing visible -> an all-zero row, output (0, 0)
  const MassHead m;
  const kv::HeadView head = m.view();
  const std::vector<float> q = {kA, 0, kA, 0, kA, 0, kA, 0};
  const std::vector<int32_t> qpos = {0, 1, 2, -1};
  std::vector<float> w(4 * 3, -1.0f), out(4 * 2, -1.0f);
  kv::attention_weights(head, q.data(), qpos.data(), 4, w.data());
  expect_near(w, {1, 0, 0, 0.5f, 0.5f, 0, 1 / 3.f, 1 / 3.f, 1 / 3.f, 0, 0, 0});
  EXPECT_EQ(w[1], 0.0f);  // masked entries are exactly 0
  EXPECT_EQ(w[2], 0.0f);
  EXPECT_EQ(w[5], 0.0f);
  kv::attention_apply(head, w.data(), 4, out.data());
  expect_near(out, {1, 0, 0.5f, 0.5f, 1, 1, 0, 0});
  // No positions: no mask, every row sees all three.
  kv::attention_weights(head, q.data(), nullptr, 4, w.data());
  for (int i = 0; i < 4; ++i)
    expect_near(std::vector<float>(w.begin() + i * 3, w.begin() + i * 3 + 3),
                {1 / 3.f, 1 / 3.f, 1 / 3.f});
}

TEST(Attention, MassTwoEqualsTwoDuplicates) {
  // The mass-2 entry split into two mass-1 copies (positions 0, 1, 1, 2): at position 2 the exps
  // are [2 1 1 2] / 6 -> the copies share 1/6 + 1/6 = 1/3, the weight of the mass-2 entry; at
  // position 1, [2 1 1] / 4 -> .5 and .25 + .25 = .5. Outputs are the same (1, 1) and (.5, .5).
  const MassHead m;
  const std::vector<float> k = {1, 0, 0, 0, 0, 0, 1, 0}, v = {1, 0, 0, 1, 0, 1, 2, 2};
  const std::vector<int32_t> positions = {0, 1, 1, 2};
  kv::HeadView dup;
  dup.k = k.data();
  dup.v = v.data();
  dup.positions = positions.data();
  dup.n = 4;
  dup.dim = 2;
  const std::vector<float> q = {kA, 0, kA, 0};
  const std::vector<int32_t> qpos = {2, 1};
  std::vector<float> w_dup(2 * 4), w_mass(2 * 3), o_dup(4), o_mass(4);
  kv::attention_weights(dup, q.data(), qpos.data(), 2, w_dup.data());
  kv::attention_weights(m.view(), q.data(), qpos.data(), 2, w_mass.data());
  expect_near(w_dup, {1 / 3.f, 1 / 6.f, 1 / 6.f, 1 / 3.f, 0.5f, 0.25f, 0.25f, 0});
  EXPECT_NEAR(w_dup[1] + w_dup[2], w_mass[1], 1e-6f);
  EXPECT_NEAR(w_dup[5] + w_dup[6], w_mass[4], 1e-6f);
  kv::attention_apply(dup, w_dup.data(), 2, o_dup.data());
  kv::attention_apply(m.view(), w_mass.data(), 2, o_mass.data());
  expect_near(o_dup, {1, 1, 0.5f, 0.5f});
  expect_near(o_mass, o_dup);
}

TEST(Attention, ApplyIsTheWeightedSumOfValues) {
  // .25 (1,0) + .5 (0,1) + .25 (2,2) = (.75, 1); second row all on entry 2: (2, 2).
  const MassHead m;
  const std::vector<float> w = {0.25f, 0.5f, 0.25f, 0, 0, 1};
  std::vector<float> out(4, -7.0f);
  kv::attention_apply(m.view(), w.data(), 2, out.data());
  EXPECT_EQ(out, (std::vector<float>{0.75f, 1, 2, 2}));
}

TEST(Attention, HeadView) {
  // Head 1 of a layer holding 2 then 3 entries starts at row 2.
  kv::Layer layer = make_layer({{0, 3}, {1, 2, 5}});
  layer.mass = {1, 2, 3, 4, 5};
  const std::vector<float> k32 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9},
                           v32 = {9, 8, 7, 6, 5, 4, 3, 2, 1, 0};
  const kv::HeadView h = kv::head_view(layer, 1, k32, v32, 2);
  EXPECT_EQ(h.n, 3);
  EXPECT_EQ(h.dim, 2);
  EXPECT_EQ(h.positions[0], 1);
  EXPECT_EQ(h.k[0], 4);
  EXPECT_EQ(h.v[0], 5);
  ASSERT_NE(h.mass, nullptr);
  EXPECT_EQ(h.mass[0], 3);
  layer.mass.clear();
  EXPECT_EQ(kv::head_view(layer, 1, k32, v32, 2).mass, nullptr);
}

TEST(Attention, LayerAttentionGroupsAndMask) {
  // Four query heads on two KV heads (G = 2), two queries each at positions 1 and 2.
  //   KV head 0 = the head above (mass 1 2 1); KV head 1: positions {0, 2}, k zero,
  //   v (4,0) (0,4), mass 3 1: logits 0, weights follow mass.
  //   q head 0 (kA,0) on KV 0: at 1 [.5 .5] -> (.5,.5); at 2 -> (1, 1)
  //   q head 1 (0,0) on KV 0:  at 1 exps [1 2] -> (1/3, 2/3); at 2 [1 2 1]/4 -> (.75, 1)
  //   q heads 2, 3 on KV 1:    at 1 only position 0 -> (4, 0); at 2 [3 1]/4 -> (3, 1)
  kv::ModelInfo model = make_header(1, 4, 2, 3).model;
  kv::Layer layer = make_layer({{0, 1, 2}, {0, 2}}, {1, 0, 0, 0, 1, 0, 0, 0, 0, 0},
                               {1, 0, 0, 1, 2, 2, 4, 0, 0, 4});
  layer.mass = {1, 2, 1, 3, 1};
  const kv::Tensor q = f32(8, 2, {kA, 0, kA, 0, 0, 0, 0, 0, kA, kA, kA, kA, -kA, 3, -kA, 3});
  expect_near(kv::layer_attention(model, layer, q, {1, 2}),
              {0.5f, 0.5f, 1, 1, 1 / 3.f, 2 / 3.f, 0.75f, 1, 4, 0, 3, 1, 4, 0, 3, 1});
  // No positions, no mask: every query reads as from position 2.
  expect_near(kv::layer_attention(model, layer, q, {}),
              {1, 1, 1, 1, 0.75f, 1, 0.75f, 1, 3, 1, 3, 1, 3, 1, 3, 1});
  // Wrong shapes are data errors.
  EXPECT_EQ(error_of([&] {
              kv::layer_attention(model, layer, f32(8, 3, std::vector<float>(24)), {});
            }).first,
            kv::Exit::data);
  EXPECT_EQ(error_of([&] {
              kv::layer_attention(model, layer, f32(7, 2, std::vector<float>(14)), {});
            }).first,
            kv::Exit::data);
  EXPECT_EQ(error_of([&] {
              kv::layer_attention(model, layer, q, {1, 2, 3});
            }).first,
            kv::Exit::data);
}

TEST(Attention, MeanRelativeError) {
  // Row 0: |(0, .5)| / |(3, 4)| = .1; row 1 has a zero reference and is skipped; row 2:
  // |(0, .3)| / |(1, 0)| = .3. Mean over counted rows: .2.
  const std::vector<float> ref = {3, 4, 0, 0, 1, 0}, cand = {3, 4.5f, 1, 1, 1, 0.3f};
  EXPECT_NEAR(kv::mean_relative_error(cand.data(), ref.data(), 3, 2), 0.2, 1e-6);
  EXPECT_EQ(kv::mean_relative_error(ref.data(), ref.data(), 3, 2), 0.0);
  const std::vector<float> zeros(6, 0.0f);
  EXPECT_EQ(kv::mean_relative_error(cand.data(), zeros.data(), 3, 2), 0.0);
}

}  // namespace
