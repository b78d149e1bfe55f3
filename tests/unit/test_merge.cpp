// kv-merge's nearest method: hand-computed merges, the threshold, the mass rule (duplicates
// merged into one entry of mass k leave attention unchanged), and real-cache invariants.
#include <gtest/gtest.h>

#include <cmath>

#include "helpers.h"
#include "kv/attention.h"
#include "kv/error.h"
#include "kv/merge.h"

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
