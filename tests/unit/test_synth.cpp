// Synthetic snapshots: deterministic, valid, and carrying the structure they promise.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "helpers.h"
#include "kv/error.h"
#include "kv/rope.h"
#include "kv/stats.h"
#include "kv/synth.h"

namespace {
kv::SynthSpec small_spec() {
  kv::SynthSpec spec;
  spec.model = kv::model_preset("tiny");
  spec.n_tokens = 200;
  spec.window = 8;
  return spec;
}
double dot(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}
}  // namespace

TEST(Synth, SameSeedSameBytesWhateverTheThreads) {
  omp_set_num_threads(1);
  kv::Snapshot a = kv::synth_snapshot(small_spec());
  omp_set_num_threads(2);
  kv::Snapshot b = kv::synth_snapshot(small_spec());
  kvtest::expect_same(a, b);
  kv::SynthSpec other = small_spec();
  other.seed = 2;
  kv::Snapshot c = kv::synth_snapshot(other);
  EXPECT_FALSE(a.layers[0].k.same_contents(c.layers[0].k));
}

TEST(Synth, OutputIsValidWithTheRequestedShape) {
  kv::SynthSpec spec = small_spec();
  spec.dtype = kv::DType::bf16;
  kv::Snapshot s = kv::synth_snapshot(spec);
  kv::validate_header(s.header);
  for (int l = 0; l < 2; ++l) kv::validate_layer(s.header, l, s.layers[size_t(l)], true);
  EXPECT_EQ(s.layers[0].k.dtype(), kv::DType::bf16);
  EXPECT_EQ(s.layers[0].entries(), 2 * 200);
  EXPECT_EQ(s.header.window_positions.front(), 192);
  EXPECT_EQ(s.layers[1].window_q.rows(), 4 * 8);
}

TEST(Synth, HeadsAndLayersDiffer) {
  kv::Snapshot s = kv::synth_snapshot(small_spec());
  auto k0 = s.layers[0].k.to_f32(), k1 = s.layers[1].k.to_f32();
  const size_t head = 200 * 16;
  EXPECT_NE(std::vector<float>(k0.begin(), k0.begin() + head),
            std::vector<float>(k0.begin() + head, k0.end()));
  EXPECT_NE(k0, k1);
}

TEST(Synth, HasOutlierChannelsInLowFrequencyPairs) {
  kv::SynthSpec spec = small_spec();
  spec.n_tokens = 2000;
  kv::Snapshot s = kv::synth_snapshot(spec);
  int found = 0;
  for (const auto& layer : s.layers)
    for (const kv::HeadStats& h : kv::layer_stats(layer, 2)) {
      for (int c : h.outlier_channels) EXPECT_GE(c, 8) << "outliers sit in the slow half";
      found += !h.outlier_channels.empty();
    }
  EXPECT_EQ(found, 4) << "every head has outlier channels";
}

TEST(Synth, SinkDrawsTheWindowQueriesAttention) {
  kv::SynthSpec spec = small_spec();
  spec.n_tokens = 500;
  kv::Snapshot s = kv::synth_snapshot(spec);
  const kv::Layer& layer = s.layers[0];
  auto k = layer.k.to_f32(), q = layer.window_q.to_f32();
  // Query head 0 (KV head 0), last window query: softmax weight of position 0 vs the mean.
  const float* qr = &q[size_t(7) * 16];
  std::vector<double> logits(500);
  for (int t = 0; t < 500; ++t) logits[size_t(t)] = dot(qr, &k[size_t(t) * 16], 16) / 4.0;
  double mx = *std::max_element(logits.begin(), logits.end()), z = 0;
  for (double x : logits) z += std::exp(x - mx);
  // Uniform attention would give it 1/500; a real sink draws a large share.
  EXPECT_GT(std::exp(logits[0] - mx) / z, 0.1) << "the sink draws over 50x its uniform share";
}

TEST(Synth, AttentionStatisticsComeFromTheWindowQueries) {
  kv::SynthSpec spec = small_spec();
  spec.attn_stats = true;
  spec.dtype = kv::DType::f32;
  kv::Snapshot s = kv::synth_snapshot(spec);
  ASSERT_TRUE(s.header.has_attn_stats);
  ASSERT_NO_THROW(kv::validate_layer(s.header, 1, s.layers[1], true));
  const kv::Layer& layer = s.layers[1];
  auto k = layer.k.to_f32(), q = layer.window_q.to_f32();
  const float* acc = layer.attn_acc.as<float>();
  const float* last = layer.attn_last.as<float>();
  // Query head 3 reads KV head 1: attn_last is the softmax of its last window query (position
  // 199, which sees every key), computed here by hand.
  const float* qr = &q[size_t(3 * 8 + 7) * 16];
  std::vector<double> logits(200);
  for (int t = 0; t < 200; ++t) logits[size_t(t)] = dot(qr, &k[size_t(200 + t) * 16], 16) / 4.0;
  double mx = *std::max_element(logits.begin(), logits.end()), z = 0;
  for (double x : logits) z += std::exp(x - mx);
  for (int t = 0; t < 200; ++t)
    ASSERT_NEAR(last[3 * 200 + t], std::exp(logits[size_t(t)] - mx) / z, 1e-6) << t;
  // attn_acc sums the 8 window queries' distributions, so each row totals 8 and holds at least
  // the last query's share.
  for (int qh = 0; qh < 4; ++qh) {
    double total = 0;
    for (int t = 0; t < 200; ++t) total += acc[qh * 200 + t];
    EXPECT_NEAR(total, 8.0, 1e-4);
    for (int t = 0; t < 200; ++t) EXPECT_GE(acc[qh * 200 + t], last[qh * 200 + t]);
  }
  spec.window = 0;
  EXPECT_THROW(kv::Synthesizer{spec}, kv::Error);
}

TEST(Rope, UndoRestoresAndDotDependsOnDistanceOnly) {
  kv::RopeTable rope(8, 10000.0, 100);
  float a[8] = {1, 2, 3, 4, 5, 6, 7, 8}, b[8] = {-1, 0.5, 2, -3, 1, 1, -2, 0.25};
  for (bool pairs : {true, false}) {
    float x[8];
    std::copy(a, a + 8, x);
    rope.apply(x, 37, pairs);
    rope.apply(x, 37, pairs, -1);
    for (int i = 0; i < 8; ++i) EXPECT_NEAR(x[i], a[i], 1e-5);
    float q1[8], k1[8], q2[8], k2[8];
    std::copy(a, a + 8, q1), std::copy(b, b + 8, k1), std::copy(a, a + 8, q2),
        std::copy(b, b + 8, k2);
    rope.apply(q1, 50, pairs), rope.apply(k1, 40, pairs);
    rope.apply(q2, 70, pairs), rope.apply(k2, 60, pairs);
    EXPECT_NEAR(dot(q1, k1, 8), dot(q2, k2, 8), 1e-3);
  }
  // Hand-computed: pairs style rotates (x0, x1) by pos * theta^0 = pos radians.
  float x[8] = {1, 0, 0, 0, 0, 0, 0, 0};
  rope.apply(x, 1, true);
  EXPECT_NEAR(x[0], std::cos(1.0), 1e-6);
  EXPECT_NEAR(x[1], std::sin(1.0), 1e-6);
}

TEST(Synth, BadSpecsAreUsageErrors) {
  kv::SynthSpec spec = small_spec();
  spec.window = 201;
  EXPECT_THROW(kv::Synthesizer{spec}, kv::Error);
  spec = small_spec();
  spec.n_tokens = 0;
  EXPECT_THROW(kv::Synthesizer{spec}, kv::Error);
  // A RoPE base that is not finite and positive would rotate keys into NaN.
  for (double theta : {0.0, -5.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    spec = small_spec();
    spec.model.rope_theta = theta;
    EXPECT_THROW(kv::Synthesizer{spec}, kv::Error) << "theta " << theta;
  }
  try {
    kv::model_preset("gpt5");
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::usage);
  }
}
