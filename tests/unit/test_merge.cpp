// kv-merge's nearest method: hand-computed merges, the threshold, the mass rule (duplicates
// merged into one entry of mass k leave attention unchanged), and real-cache invariants.
#include <gtest/gtest.h>

#include <cmath>

#include "helpers.h"
#include "kv/attention.h"
#include "kv/error.h"
#include "kv/eval.h"
#include "kv/merge.h"
#include "kv/snapshot_io.h"

namespace {

// One layer, one KV head, one query head, head_dim 2; two probe queries after the tokens.
kv::Snapshot tiny(const std::vector<float>& k, const std::vector<float>& v) {
  return kvtest::one_head_snapshot(k, v, 2, {0.7f, -0.2f, -1.0f, 0.5f});
}

kv::MergeOptions keep_recent(int64_t budget, double tau) {
  kv::MergeOptions o;
  o.select.score = kv::EvictScore::window;
  o.select.sink = 0;
  o.select.budget = budget;
  o.tau = tau;
  return o;
}

}  // namespace

TEST(MergeNearest, HandComputedMeanAndMass) {
  // Keep the 2 most recent tokens: (1, 0) with v (0, 2) and (0, 1) with v (1, 1). Token 0,
  // key (2, 0) (cosine 1 with kept token 1, 0 with token 2), value (4, 0), joins token 1:
  // k = ((2,0) + (1,0)) / 2 = (1.5, 0), v = ((4,0) + (0,2)) / 2 = (2, 1), mass 2.
  kv::Snapshot s = tiny({2, 0, 1, 0, 0, 1}, {4, 0, 0, 2, 1, 1});
  const kv::Snapshot m = kv::merge_snapshot(s, keep_recent(2, 0.5));
  const kv::Layer& l = m.layers[0];
  ASSERT_EQ(l.positions, (std::vector<int32_t>{1, 2}));
  ASSERT_EQ(l.mass, (std::vector<float>{2.0f, 1.0f}));
  const auto k = l.k.to_f32(), v = l.v.to_f32();
  EXPECT_EQ(k, (std::vector<float>{1.5f, 0, 0, 1}));
  EXPECT_EQ(v, (std::vector<float>{2, 1, 1, 1}));
}

TEST(MergeNearest, BelowTheThresholdAnEntryIsDropped) {
  // Token 0's key (-1, 0) has cosine -1 with (1, 0) and 0 with (0, 1): its best is 0.
  kv::Snapshot s = tiny({-1, 0, 1, 0, 0, 1}, {4, 0, 0, 2, 1, 1});
  EXPECT_EQ(kv::merge_snapshot(s, keep_recent(2, 0.1)).layers[0].mass,
            (std::vector<float>{1.0f, 1.0f}));
  // At tau 0 it joins token 2 (cosine 0 beats -1): v = ((4, 0) + (1, 1)) / 2 = (2.5, 0.5).
  const kv::Snapshot m = kv::merge_snapshot(s, keep_recent(2, 0.0));
  EXPECT_EQ(m.layers[0].mass, (std::vector<float>{1.0f, 2.0f}));
  EXPECT_EQ(m.layers[0].v.to_f32(), (std::vector<float>{0, 2, 2.5f, 0.5f}));
  try {
    kv::merge_snapshot(s, keep_recent(2, 1.5));
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::usage);
  }
}

TEST(MergeNearest, DuplicatesMergedIntoOneEntryLeaveAttentionUnchanged) {
  // Tokens 0 and 1 are the same (key and value); token 2 differs. Keeping the 2 most recent
  // merges token 0 into token 1 with mass 2: by the log-mass rule the attention output of any
  // query is exactly what the 3 entries gave.
  kv::Snapshot s = tiny({0.3f, -0.8f, 0.3f, -0.8f, 1.1f, 0.4f}, {1, 2, 1, 2, -3, 0.5f});
  const kv::Snapshot m = kv::merge_snapshot(s, keep_recent(2, 0.99));
  ASSERT_EQ(m.layers[0].mass, (std::vector<float>{2.0f, 1.0f}));
  const auto ref = kv::layer_attention(s.header.model, s.layers[0], s.layers[0].probe_q,
                                       s.header.probe_positions);
  const auto got = kv::layer_attention(m.header.model, m.layers[0], s.layers[0].probe_q,
                                       s.header.probe_positions);
  ASSERT_EQ(ref.size(), got.size());
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-6) << i;
  // Plain eviction of token 0 changes the output.
  kv::EvictOptions e = keep_recent(2, 0).select;
  const kv::Snapshot ev = kv::evict_snapshot(s, e);
  const auto dropped = kv::layer_attention(ev.header.model, ev.layers[0], s.layers[0].probe_q,
                                           s.header.probe_positions);
  EXPECT_GT(std::abs(dropped[0] - ref[0]), 1e-3);
}

TEST(MergeNearest, MassIsConservedAndStoredTypeKept) {
  // 64 tokens of a 2-head f16 layer: the masses of the kept entries add up to every token when
  // everything merges (tau -1), and the stored type stays f16.
  kv::Snapshot s;
  s.header.model.n_layers = 1;
  s.header.model.n_q_heads = 2;
  s.header.model.n_kv_heads = 2;
  s.header.model.head_dim = 8;
  s.header.model.rope_dims = 8;
  s.header.model.context_length = 128;
  s.header.n_tokens = 64;
  s.header.tokens.assign(64, 5);
  kv::Layer l;
  std::vector<float> k(2 * 64 * 8), v(k.size());
  for (size_t i = 0; i < k.size(); ++i)
    k[i] = std::sin(0.37f * float(i)), v[i] = std::cos(0.11f * float(i));
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < 64; ++t) l.positions.push_back(t);
  l.head_offsets = {0, 64, 128};
  l.k = kv::Tensor::from_f32(kv::DType::f16, 128, 8, k.data());
  l.v = kv::Tensor::from_f32(kv::DType::f16, 128, 8, v.data());
  s.layers.push_back(l);
  kv::MergeOptions o;
  o.select.score = kv::EvictScore::knorm;
  o.select.budget = 10;
  o.tau = -1;
  const kv::Snapshot m = kv::merge_snapshot(s, o);
  const kv::Layer& ml = m.layers[0];
  EXPECT_EQ(ml.k.dtype(), kv::DType::f16);
  EXPECT_EQ(ml.entries(), 20);
  for (int h = 0; h < 2; ++h) {
    double total = 0;
    for (int64_t i = ml.head_offsets[size_t(h)]; i < ml.head_offsets[size_t(h) + 1]; ++i)
      total += ml.mass[size_t(i)];
    EXPECT_EQ(total, 64.0) << "head " << h;
  }
  EXPECT_NO_THROW(kv::validate_layer(m.header, 0, ml, true));
}

namespace {

// tiny() with attention statistics: attn_acc = attn_last = `attention` (one query head).
kv::Snapshot with_attention(kv::Snapshot s, const std::vector<float>& attention) {
  s.header.has_attn_stats = true;
  const int64_t T = int64_t(attention.size());
  s.layers[0].attn_acc = kv::Tensor::from_f32(kv::DType::f32, 1, T, attention.data());
  s.layers[0].attn_last = s.layers[0].attn_acc;
  return s;
}

kv::MergeOptions by_h2o(kv::MergeMethod method, int64_t budget, double tau = 0) {
  kv::MergeOptions o;
  o.method = method;
  o.select.score = kv::EvictScore::h2o;
  o.select.sink = 0;
  o.select.recent = 0;
  o.select.budget = budget;
  o.tau = tau;
  return o;
}

}  // namespace

TEST(MergeCam, DroppedValuesJoinTheNextKeptEntryByAttentionRatio) {
  // Four tokens, h2o scores 0.4 0.1 0.3 0.2: tokens 0 and 2 stay. Token 1 joins its next kept
  // neighbour, token 2, with weight 0.1 / 0.3; token 3 has none after it and joins the last
  // kept, token 2 again, with 0.2 / 0.3. Token 2: mass 1 + 1/3 + 2/3 = 2, its key unchanged,
  // value (v2 + v1 / 3 + 2 v3 / 3) / 2 = ((0, 3) + (3, 0) / 3 + 2 (0, 6) / 3) / 2 = (0.5, 3.5).
  kv::Snapshot s = with_attention(
      kvtest::one_head_snapshot({1, 0, 0, 1, 2, 2, -1, 1}, {9, 9, 3, 0, 0, 3, 0, 6}, 2, {1, 0}),
      {0.4f, 0.1f, 0.3f, 0.2f});
  const kv::Snapshot m = kv::merge_snapshot(s, by_h2o(kv::MergeMethod::cam, 2));
  const kv::Layer& l = m.layers[0];
  ASSERT_EQ(l.positions, (std::vector<int32_t>{0, 2}));
  EXPECT_FLOAT_EQ(l.mass[0], 1.0f);
  EXPECT_FLOAT_EQ(l.mass[1], 2.0f);
  const auto k = l.k.to_f32(), v = l.v.to_f32();
  EXPECT_EQ(k, (std::vector<float>{1, 0, 2, 2}));
  EXPECT_FLOAT_EQ(v[0], 9);
  EXPECT_FLOAT_EQ(v[2], 0.5f);
  EXPECT_FLOAT_EQ(v[3], 3.5f);
  // Scores that are not attention are refused.
  kv::MergeOptions bad = by_h2o(kv::MergeMethod::cam, 2);
  bad.select.score = kv::EvictScore::knorm;
  try {
    kv::merge_snapshot(s, bad);
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::usage);
  }
}

TEST(MergeCluster, RunsOfSimilarKeysMergeIntoTheirPivotWithGaussianWeights) {
  // Keys (1, 0), (2, 0) | (0, 1), (0, 3): two runs of cosine 1 (between runs: 0 < tau 0.9).
  // h2o scores 0.4 0.1 0.2 0.3 keep tokens 0 and 3, the pivots. Token 1 joins token 0: squared
  // distance 1, the set's mean squared distance 1, weight exp(-1/2); token 2 joins token 3
  // (distance 4, mean 4, the same weight). Keys and values are weighted means.
  kv::Snapshot s = with_attention(
      kvtest::one_head_snapshot({1, 0, 2, 0, 0, 1, 0, 3}, {1, 0, 3, 0, 0, 1, 0, 5}, 2, {1, 1}),
      {0.4f, 0.1f, 0.2f, 0.3f});
  const kv::Snapshot m = kv::merge_snapshot(s, by_h2o(kv::MergeMethod::cluster, 2, 0.9));
  const kv::Layer& l = m.layers[0];
  ASSERT_EQ(l.positions, (std::vector<int32_t>{0, 3}));
  const float w = std::exp(-0.5f);
  EXPECT_FLOAT_EQ(l.mass[0], 1 + w);
  EXPECT_FLOAT_EQ(l.mass[1], 1 + w);
  const auto k = l.k.to_f32(), v = l.v.to_f32();
  EXPECT_FLOAT_EQ(k[0], (1 + 2 * w) / (1 + w));
  EXPECT_FLOAT_EQ(v[0], (1 + 3 * w) / (1 + w));
  EXPECT_FLOAT_EQ(k[3], (3 + 1 * w) / (1 + w));
  EXPECT_FLOAT_EQ(v[3], (5 + 1 * w) / (1 + w));
  // At tau 1 a cosine of exactly 1 still joins; orthogonal neighbours never do.
  const kv::Snapshot e = kv::merge_snapshot(s, by_h2o(kv::MergeMethod::cluster, 2, 1.0));
  EXPECT_FLOAT_EQ(e.layers[0].mass[0], 1 + w);
  kv::Snapshot orth = with_attention(
      kvtest::one_head_snapshot({1, 0, 0, 1, 1, 0, 0, 1}, {1, 0, 3, 0, 0, 1, 0, 5}, 2, {1, 1}),
      {0.4f, 0.1f, 0.2f, 0.3f});
  EXPECT_EQ(kv::merge_snapshot(orth, by_h2o(kv::MergeMethod::cluster, 2, 0.9)).layers[0].mass,
            (std::vector<float>{1, 1}));
}

TEST(MergeCluster, DuplicatesMergedIntoOneEntryLeaveAttentionUnchanged) {
  // A token repeated three times (identical keys: one set, weight 1 each) next to a distinct
  // one: kept as one entry of mass 3, attention outputs equal those over all four rows.
  kv::Snapshot s =
      with_attention(kvtest::one_head_snapshot({1, 2, 1, 2, 1, 2, -2, 1}, {5, 1, 5, 1, 5, 1, 0, 4},
                                               2, {0.3f, -0.6f, 1.0f, 0.2f}),
                     {0.1f, 0.2f, 0.3f, 0.4f});
  const kv::Snapshot m = kv::merge_snapshot(s, by_h2o(kv::MergeMethod::cluster, 2, 0.99));
  ASSERT_EQ(m.layers[0].mass, (std::vector<float>{3, 1}));
  const auto ref = kv::layer_attention(s.header.model, s.layers[0], s.layers[0].probe_q,
                                       s.header.probe_positions);
  const auto got = kv::layer_attention(m.header.model, m.layers[0], m.layers[0].probe_q,
                                       m.header.probe_positions);
  ASSERT_EQ(ref.size(), got.size());
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-6) << i;
}

TEST(MergeHeads, KvHeadsAreMeanPooledIntoGroups) {
  const kv::Snapshot s = kvtest::tiny_snapshot(kv::DType::f32, true, false);  // 2 KV heads
  kv::Header out_header;
  kv::Layer out;
  kv::merge_heads(s.header, s.layers[0], 1, out_header, out);
  EXPECT_EQ(out_header.model.n_kv_heads, 1);
  EXPECT_EQ(out_header.model.n_q_heads, s.header.model.n_q_heads);
  EXPECT_EQ(out_header.model.group_size(), 4);
  const kv::Layer& in = s.layers[0];
  ASSERT_EQ(out.head_offsets, (std::vector<int64_t>{0, in.head_entries(0)}));
  const auto k = in.k.to_f32(), v = in.v.to_f32(), km = out.k.to_f32(), vm = out.v.to_f32();
  const int D = s.header.model.head_dim;
  const int64_t n = in.head_entries(0);
  for (int64_t i = 0; i < n * D; ++i) {
    EXPECT_FLOAT_EQ(km[size_t(i)], (k[size_t(i)] + k[size_t(n * D + i)]) / 2);
    EXPECT_FLOAT_EQ(vm[size_t(i)], (v[size_t(i)] + v[size_t(n * D + i)]) / 2);
  }
  EXPECT_NO_THROW(kv::validate_layer(out_header, 0, out, true));
  // Groups that do not divide the heads, or heads holding different positions, are refused.
  auto code = [&](const kv::Layer& layer, int groups) {
    try {
      kv::merge_heads(s.header, layer, groups, out_header, out);
    } catch (const kv::Error& e) {
      return int(e.code());
    }
    return 0;
  };
  EXPECT_EQ(code(in, 3), 64);
  const kv::Snapshot ragged = kvtest::tiny_snapshot(kv::DType::f32, true, true);
  EXPECT_EQ(code(ragged.layers[1], 1), 64);
}

TEST(MergeReal, CamLosesLessThanEvictionWithTheSameScore) {
  const kv::Snapshot* real = kvtest::stories_capture();
  if (!real) GTEST_SKIP() << "stories260K or TinyStories not available";
  // The acceptance comparison (attention-output error on the probe, as kv-eval reports it): at
  // 100 and 200 of 400 tokens per head, CaM-style merging with SnapKV's selection beats SnapKV's
  // eviction; at 50 it does not (reported, not asserted), and nearest is worse throughout.
  auto error = [&](const kv::Snapshot& cand) {
    kv::AttentionFidelity f;
    for (size_t l = 0; l < real->layers.size(); ++l)
      f += kv::attention_fidelity(real->header, real->layers[l], cand.layers[l], 16);
    return f.rel_error / double(f.rows);
  };
  for (int64_t budget : {50, 100, 200}) {
    kv::EvictOptions e;
    e.score = kv::EvictScore::snapkv;
    e.budget = budget;
    kv::MergeOptions m;
    m.select = e;
    const double evict = error(kv::evict_snapshot(*real, e));
    m.method = kv::MergeMethod::cam;
    const double cam = error(kv::merge_snapshot(*real, m));
    m.method = kv::MergeMethod::nearest;
    const double nearest = error(kv::merge_snapshot(*real, m));
    m.method = kv::MergeMethod::cluster;
    m.tau = 0.9;
    const double cluster = error(kv::merge_snapshot(*real, m));
    std::printf("  budget %3lld: snapkv eviction %.4f, cam %.4f, cluster %.4f, nearest %.4f\n",
                (long long)budget, evict, cam, cluster, nearest);
    if (budget >= 100) {
      EXPECT_LT(cam, evict) << budget;
    }
  }
}

TEST(MergeMinicache, PairsShareDirectionsAndKeepTheirNorms) {
  // Two layers of one head, two tokens, head_dim 2. Token 0: a = (1, 0), b = (0, 2) (cosine 0);
  // token 1: a = (3, 4), b = (6, 8) (cosine 1). At tau -1 both merge: token 0's direction is
  // SLERP((1, 0), (0, 1), 0.6) = (sin 0.4 pi/2, sin 0.6 pi/2), layer 0 keeps norm 1, layer 1
  // norm 2; token 1's direction is (0.6, 0.8) itself.
  kv::Snapshot s = kvtest::one_head_snapshot({1, 0, 3, 4}, {1, 0, 3, 4}, 2, {1, 0});
  s.header.model.n_layers = 2;
  s.layers.push_back(s.layers[0]);
  const std::vector<float> b = {0, 2, 6, 8};
  s.layers[1].k = kv::Tensor::from_f32(kv::DType::f32, 2, 2, b.data());
  s.layers[1].v = s.layers[1].k;
  kv::Layer a = s.layers[0], c = s.layers[1];
  const kv::MinicacheStats st = kv::merge_minicache_pair(s.header, 0, a, c, -1.0, 0.6);
  EXPECT_EQ(st.rows, 4);
  EXPECT_EQ(st.merged, 4);
  kv::Snapshot m = s;
  m.layers = {a, c};
  const std::string path = kvtest::temp_dir() + "/minicache.kv.h5";
  kv::write_snapshot(path, m);
  const kv::Snapshot back = kv::read_snapshot(path);
  const double e0 = std::sin(0.4 * M_PI / 2), e1 = std::sin(0.6 * M_PI / 2);
  const auto k0 = back.layers[0].k.to_f32(), k1 = back.layers[1].k.to_f32();
  EXPECT_NEAR(k0[0], e0, 1e-6);
  EXPECT_NEAR(k0[1], e1, 1e-6);
  EXPECT_NEAR(k1[0], 2 * e0, 2e-3);  // the norm is stored as f16
  EXPECT_NEAR(k1[1], 2 * e1, 2e-3);
  EXPECT_NEAR(k0[2], 3, 1e-6);
  EXPECT_NEAR(k1[3], 8, 1e-2);
  EXPECT_TRUE(back.layers[1].k_encoding.dense());  // read back as a dense tensor
  // At tau 1 only the parallel token merges (in k and in v), and then exactly.
  a = s.layers[0];
  c = s.layers[1];
  EXPECT_EQ(kv::merge_minicache_pair(s.header, 0, a, c, 1.0, 0.6).merged, 2);
  EXPECT_EQ(a.k.to_f32(), s.layers[0].k.to_f32());
  // Layers holding different entries are refused.
  kv::Layer short_layer = kvtest::one_head_snapshot({1, 0}, {1, 0}, 2, {1, 0}).layers[0];
  a = s.layers[0];
  try {
    kv::merge_minicache_pair(s.header, 0, a, short_layer, 0.5, 0.6);
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::usage);
  }
}
