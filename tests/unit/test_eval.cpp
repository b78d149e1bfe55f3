// kv-eval's metrics: hand-computed attention error and mass recall on a tiny cache, identity
// gives zero, comparability errors, the runtime reproducing kv-capture's probe logits exactly,
// sparse and merged caches in the runtime, and KL growing as eviction budgets shrink.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "helpers.h"
#include "kv/capture.h"
#include "kv/error.h"
#include "kv/eval.h"
#include "kv/evict.h"
#include "kv/model.h"

namespace {

// One layer, one KV head and one query head, head_dim 2, three tokens; one probe query at
// position 3 with q = (0, 0): every logit is 0, so the reference attention is uniform (1/3).
// Values (3, 0), (0, 3), (0, 0): o_ref = (1, 1).
kv::Snapshot tiny() {
  return kvtest::one_head_snapshot({1, 0, 0, 1, 1, 1}, {3, 0, 0, 3, 0, 0}, 2, {0, 0});
}

kv::Layer keep_rows(const kv::Layer& in, std::vector<int64_t> rows) {
  kv::Layer copy = in, out;
  kv::apply_selection(copy, {rows}, out);
  return out;
}

const char* env(const char* n) {
  const char* v = std::getenv(n);
  return v ? v : "";
}

}  // namespace

TEST(Eval, IdenticalCandidateHasNoError) {
  const kv::Snapshot s = tiny();
  const auto f = kv::attention_fidelity(s.header, s.layers[0], s.layers[0], 2);
  EXPECT_EQ(f.rows, 1);
  EXPECT_EQ(f.rel_error, 0.0);
  EXPECT_NEAR(f.cosine, 1.0, 1e-12);
  EXPECT_NEAR(f.mass_recall, 1.0, 1e-6);
  EXPECT_EQ(f.topk_recall, 1.0);
  const std::vector<float> logits = {0.5f, -1.0f, 2.0f, 0.0f, 1.0f, 1.0f};
  const auto m = kv::compare_logits(logits, logits, 3, {2, 0});
  EXPECT_EQ(m.kl, 0.0);
  EXPECT_EQ(m.top1_agreement, 1.0);
  EXPECT_EQ(m.ppl_reference, m.ppl_candidate);
}

TEST(Eval, HandComputedErrorAndRecallOfAnEviction) {
  const kv::Snapshot s = tiny();
  // Drop position 0: the candidate attends uniformly to (0, 3) and (0, 0): o = (0, 1.5).
  // ||o - o_ref|| = ||(-1, 0.5)|| = sqrt(1.25); ||o_ref|| = sqrt(2): error sqrt(0.625).
  // cosine = (0 + 1.5) / (1.5 sqrt 2) = 1/sqrt 2. Mass recall: 2/3 of the reference attention.
  const kv::Layer cand = keep_rows(s.layers[0], {1, 2});
  const auto f = kv::attention_fidelity(s.header, s.layers[0], cand, 3);
  EXPECT_NEAR(f.rel_error, std::sqrt(0.625), 1e-6);
  EXPECT_NEAR(f.cosine, 1 / std::sqrt(2.0), 1e-6);
  EXPECT_NEAR(f.mass_recall, 2.0 / 3.0, 1e-6);
  EXPECT_NEAR(f.topk_recall, 2.0 / 3.0, 1e-6);  // top-3 = all three; two are held
  // With q = (1, 0) the logits are (1, 0, 1)/sqrt(2): position 1 is the least attended, so top-2
  // recall after dropping it is 1 while its mass is gone: recall = 1 - e^0 / (2 e^a + 1).
  kv::Snapshot s2 = s;
  const float q[] = {1, 0};
  s2.layers[0].probe_q = kv::Tensor::from_f32(kv::DType::f32, 1, 2, q);
  const auto g =
      kv::attention_fidelity(s2.header, s2.layers[0], keep_rows(s2.layers[0], {0, 2}), 2);
  const double a = std::exp(1 / std::sqrt(2.0));
  EXPECT_NEAR(g.mass_recall, 2 * a / (2 * a + 1), 1e-6);
  EXPECT_EQ(g.topk_recall, 1.0);
}

TEST(Eval, HandComputedLogitComparison) {
  // Two rows over a vocabulary of 2. Reference row 0 = log(1/2, 1/2), candidate row 0 = log(3/4,
  // 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3). Row 1 identical. Probe tokens {0, 1}: row 0
  // predicts token 1: reference nll ln 2, candidate ln 4. Argmax: row 0 ties (first index) vs 0.
  const std::vector<float> ref = {0.0f, 0.0f, 1.0f, 0.0f};
  const std::vector<float> cand = {float(std::log(3.0)), 0.0f, 1.0f, 0.0f};
  const auto m = kv::compare_logits(ref, cand, 2, {0, 1});
  EXPECT_NEAR(m.kl, 0.5 * std::log(4.0 / 3.0) / 2, 1e-7);
  EXPECT_NEAR(m.ppl_reference, 2.0, 1e-6);
  EXPECT_NEAR(m.ppl_candidate, 4.0, 1e-5);
  EXPECT_EQ(m.top1_agreement, 1.0);
}

TEST(Eval, IncomparableSnapshotsAndMissingProbeAreDataErrors) {
  const kv::Snapshot s = tiny();
  kv::Header other = s.header;
  other.tokens[1] = 9;
  try {
    kv::check_comparable(s.header, other);
    ADD_FAILURE() << "different tokens accepted";
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::data);
    EXPECT_NE(std::string(e.what()).find("differ in tokens"), std::string::npos) << e.what();
  }
  other = s.header;
  other.model.n_kv_heads = 2;
  EXPECT_THROW(kv::check_comparable(s.header, other), kv::Error);
  kv::Header no_probe = s.header;
  no_probe.probe_tokens.clear();
  no_probe.probe_positions.clear();
  try {
    kv::attention_fidelity(no_probe, s.layers[0], s.layers[0], 2);
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::data);
    EXPECT_NE(std::string(e.what()).find("kv-capture --probe"), std::string::npos) << e.what();
  }
}

namespace {

struct RealCase {
  std::unique_ptr<kv::Model> model;
  kv::Snapshot snap;  // f32 capture: the runtime's own cache, bit for bit
};

const RealCase* real_case() {
  static std::unique_ptr<RealCase> rc = [] {
    std::unique_ptr<RealCase> r;
    const std::string path = std::string(env("KV_MODELS_DIR")) + "/stories260K.gguf";
    std::ifstream text_in(std::string(env("KV_DATA_DIR")) + "/tinystories_val.txt");
    if (!std::ifstream(path) || !text_in) return r;
    std::stringstream text;
    text << text_in.rdbuf();
    r = std::make_unique<RealCase>();
    r->model = kv::Model::load(path);
    auto ids = r->model->tokenizer().encode(text.str().substr(0, 8000), true);
    std::vector<int32_t> prompt(ids.begin(), ids.begin() + 400),
        probe(ids.begin() + 400, ids.begin() + 464);
    kv::CaptureOptions opt;
    opt.dtype = kv::DType::f32;
    opt.window = 32;
    opt.attn_stats = true;
    r->snap = kv::capture(*r->model, prompt, probe, "", opt);
    return r;
  }();
  return rc.get();
}

#define NEED_REAL()                 \
  const RealCase* rc = real_case(); \
  if (!rc) GTEST_SKIP() << "stories260K or TinyStories not available"

}  // namespace

TEST(EvalReal, RuntimeOnTheReferenceReproducesTheCapturedProbeLogits) {
  NEED_REAL();
  const auto logits = kv::probe_logits(*rc->model, rc->snap.header, rc->snap.layers);
  const kv::Tensor& stored = rc->snap.header.probe_logits;
  ASSERT_EQ(logits.size(), stored.size());
  EXPECT_EQ(0, std::memcmp(logits.data(), stored.data(), stored.bytes()))
      << "the probe teacher-forced after a loaded cache must equal the capture's own run";
}

TEST(EvalReal, DroppedEntriesActLikeEntriesOfVanishingMass) {
  NEED_REAL();
  // The runtime masks a dropped position; an entry of mass m adds log m to its logit. So an
  // evicted cache must behave like the full cache whose dropped entries have mass 1e-30, and a
  // full cache with all masses 1 like the full cache itself.
  kv::EvictOptions o;
  o.score = kv::EvictScore::h2o;
  o.ratio = 0.5;
  const kv::Snapshot evicted = kv::evict_snapshot(rc->snap, o);
  kv::Snapshot faded = rc->snap, ones = rc->snap;
  for (size_t l = 0; l < faded.layers.size(); ++l) {
    kv::Layer& f = faded.layers[l];
    f.mass.assign(f.positions.size(), 1e-30f);
    ones.layers[l].mass.assign(f.positions.size(), 1.0f);
    const kv::Layer& e = evicted.layers[l];
    for (int h = 0; h < 4; ++h)
      for (int64_t i = e.head_offsets[size_t(h)]; i < e.head_offsets[size_t(h) + 1]; ++i)
        f.mass[size_t(f.head_offsets[size_t(h)] + e.positions[size_t(i)])] = 1.0f;
  }
  const auto full = kv::probe_logits(*rc->model, rc->snap.header, rc->snap.layers);
  const auto a = kv::probe_logits(*rc->model, evicted.header, evicted.layers);
  const auto b = kv::probe_logits(*rc->model, faded.header, faded.layers);
  const auto c = kv::probe_logits(*rc->model, ones.header, ones.layers);
  double max_ab = 0, max_full = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_ab = std::max(max_ab, double(std::abs(a[i] - b[i])));
    max_full = std::max(max_full, double(std::abs(a[i] - full[i])));
    ASSERT_EQ(c[i], full[i]) << i;
  }
  EXPECT_LT(max_ab, 1e-4);
  EXPECT_GT(max_full, 1e-2) << "evicting half the cache changes the logits";
}

TEST(EvalReal, KlGrowsAsTheBudgetShrinks) {
  NEED_REAL();
  const auto ref = kv::probe_logits(*rc->model, rc->snap.header, rc->snap.layers);
  for (kv::EvictScore s : {kv::EvictScore::window, kv::EvictScore::h2o, kv::EvictScore::snapkv,
                           kv::EvictScore::random}) {
    double previous = 0, previous_error = 0;
    for (double r : {0.75, 0.5, 0.25, 0.1}) {
      kv::EvictOptions o;
      o.score = s;
      o.ratio = r;
      const kv::Snapshot c = kv::evict_snapshot(rc->snap, o);
      const auto m = kv::compare_logits(ref, kv::probe_logits(*rc->model, c.header, c.layers),
                                        rc->model->config().vocab, rc->snap.header.probe_tokens);
      kv::AttentionFidelity f;
      for (size_t l = 0; l < c.layers.size(); ++l)
        f += kv::attention_fidelity(rc->snap.header, rc->snap.layers[l], c.layers[l], 16);
      std::printf("  %-7s %4.0f%%  KL %.5f  ppl %.4f (ref %.4f)  attention error %.4f\n",
                  kv::evict_score_name(s), r * 100, m.kl, m.ppl_candidate, m.ppl_reference,
                  f.rel_error / double(f.rows));
      EXPECT_GT(m.kl, previous) << kv::evict_score_name(s) << " at " << r;
      EXPECT_GT(f.rel_error / double(f.rows), previous_error)
          << kv::evict_score_name(s) << " at " << r;
      previous = m.kl;
      previous_error = f.rel_error / double(f.rows);
    }
  }
}
