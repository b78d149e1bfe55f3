// The model runtime and capture against the golden figures of ../shared/models/README.md, the
// two loaders against each other, and captured side data against the runtime's own attention.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>

#include "kv/capture.h"
#include "kv/error.h"
#include "kv/model.h"

namespace {

std::string models_dir() {
  const char* d = std::getenv("KV_MODELS_DIR");
  return d ? d : "";
}

#define NEED_MODELS()                                                          \
  if (models_dir().empty() || !std::ifstream(models_dir() + "/stories260K.gguf")) \
  GTEST_SKIP() << "KV_MODELS_DIR with stories260K is not available"

std::unique_ptr<kv::Model> gguf_model() { return kv::Model::load(models_dir() + "/stories260K.gguf"); }
std::unique_ptr<kv::Model> bin_model() {
  return kv::Model::load(models_dir() + "/stories260K.bin", models_dir() + "/tok512.bin");
}

const char* kGolden =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily";

std::vector<float> f32(const kv::Tensor& t) { return t.to_f32(); }

}  // namespace

TEST(Model, ConfigOfStories260K) {
  NEED_MODELS();
  std::unique_ptr<kv::Model> models[] = {gguf_model(), bin_model()};
  for (const auto& m : models) {
    const kv::ModelConfig& c = m->config();
    EXPECT_EQ(c.dim, 64);
    EXPECT_EQ(c.hidden, 172);
    EXPECT_EQ(c.n_layers, 5);
    EXPECT_EQ(c.n_heads, 8);
    EXPECT_EQ(c.n_kv_heads, 4);
    EXPECT_EQ(c.head_dim, 8);
    EXPECT_EQ(c.vocab, 512);
  }
  EXPECT_TRUE(models[1]->config().tied_output);  // llama2.c header: positive vocab = shared
  EXPECT_EQ(gguf_model()->file_sha256(), "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d");
  EXPECT_EQ(bin_model()->file_sha256(), "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696");
}

TEST(Model, GoldenTokensLogitsAndContinuationFromBothFiles) {
  NEED_MODELS();
  std::unique_ptr<kv::Model> models[] = {gguf_model(), bin_model()};
  for (const auto& m : models) {
    SCOPED_TRACE(m->format());
    auto ids = m->tokenizer().encode("Once upon a time", true);
    EXPECT_EQ(ids, (std::vector<int32_t>{1, 403, 407, 261, 378}));
    kv::Session s(*m, 16);
    std::vector<float> logits;
    s.forward(ids.data(), int64_t(ids.size()), logits, false);
    std::vector<int> order(512);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + 5, order.end(),
                      [&](int a, int b) { return logits[size_t(a)] > logits[size_t(b)]; });
    const int want_ids[5] = {432, 383, 322, 353, 323};
    const float want[5] = {17.7994f, 14.2813f, 9.7096f, 9.5873f, 9.1342f};
    for (int i = 0; i < 5; ++i) {
      EXPECT_EQ(order[size_t(i)], want_ids[i]);
      EXPECT_NEAR(logits[size_t(want_ids[i])], want[i], 1e-3);
    }
    double mx = *std::max_element(logits.begin(), logits.end()), z = 0;
    for (float x : logits) z += std::exp(double(x) - mx);
    EXPECT_NEAR(mx + std::log(z), 17.8311, 1e-3);
    // 64 steps as llama2.c counts them: positions 1..64 after BOS, prompt tokens included.
    auto out = kv::generate_greedy(*m, ids, 64 + 1 - 5);
    EXPECT_EQ(out.size(), 65u);
    EXPECT_EQ(m->tokenizer().decode(out), kGolden);
  }
}

TEST(Model, BatchedPrefillEqualsTokenByToken) {
  NEED_MODELS();
  auto m = gguf_model();
  auto ids = m->tokenizer().encode(kGolden, true);  // 64 tokens + more: crosses a batch boundary
  ids.insert(ids.end(), ids.begin() + 1, ids.end());
  kv::Session a(*m, int64_t(ids.size())), b(*m, int64_t(ids.size()));
  std::vector<float> la, lb;
  a.forward(ids.data(), int64_t(ids.size()), la, false);
  for (size_t i = 0; i < ids.size(); ++i) b.forward(&ids[i], 1, lb, false);
  for (size_t i = 0; i < la.size(); ++i) ASSERT_NEAR(la[i], lb[i], 1e-4) << i;
  const int64_t last = int64_t(ids.size()) - 1;
  for (int l = 0; l < 5; ++l)
    for (int h = 0; h < 4; ++h)
      for (int d = 0; d < 8; ++d) ASSERT_NEAR(a.key(l, h, last)[d], b.key(l, h, last)[d], 1e-5);
}

TEST(Capture, GgufAndLlama2cCapturesAreIdentical) {
  NEED_MODELS();
  kv::CaptureOptions opt;
  opt.dtype = kv::DType::f32;
  opt.window = 8;
  opt.attn_stats = true;
  auto mg = gguf_model(), mb = bin_model();
  auto all = mg->tokenizer().encode(kGolden, true);
  std::vector<int32_t> prompt(all.begin(), all.begin() + 40), probe(all.begin() + 40, all.end());
  kv::Snapshot g = kv::capture(*mg, prompt, probe, "", opt);
  kv::Snapshot b = kv::capture(*mb, prompt, probe, "", opt);
  ASSERT_EQ(g.layers.size(), b.layers.size());
  for (size_t l = 0; l < g.layers.size(); ++l) {
    for (auto t : {&kv::Layer::k, &kv::Layer::v, &kv::Layer::window_q, &kv::Layer::attn_acc,
                   &kv::Layer::attn_last, &kv::Layer::probe_q}) {
      EXPECT_TRUE((g.layers[l].*t).same_contents(b.layers[l].*t)) << "layer " << l;
      EXPECT_FALSE((g.layers[l].*t).empty());
    }
  }
  EXPECT_TRUE(g.header.probe_logits.same_contents(b.header.probe_logits));
}

TEST(Capture, AttentionFromCapturedKvAndWindowEqualsRuntime) {
  NEED_MODELS();
  auto m = gguf_model();
  auto prompt = m->tokenizer().encode(kGolden, true);
  const int64_t T = int64_t(prompt.size()), W = 16;
  kv::CaptureOptions opt;
  opt.dtype = kv::DType::f32;
  opt.window = int(W);
  kv::Snapshot snap = kv::capture(*m, prompt, {}, "", opt);
  // The runtime's own attention outputs for the window positions.
  kv::Session s(*m, T);
  s.capture.queries_from = T - W;
  std::vector<float> logits;
  s.forward(prompt.data(), T, logits, false);
  for (int l = 0; l < 5; ++l) {
    const auto k = f32(snap.layers[size_t(l)].k), v = f32(snap.layers[size_t(l)].v);
    const auto q = f32(snap.layers[size_t(l)].window_q);
    const auto& runtime = s.attn_outputs[size_t(l)];  // [W][8 heads][8]
    ASSERT_EQ(runtime.size(), size_t(W * 64));
    for (int64_t qh = 0; qh < 8; ++qh)
      for (int64_t w = 0; w < W; ++w) {
        const int64_t pos = T - W + w, kvh = qh / 2;
        const float* qr = &q[size_t((qh * W + w) * 8)];
        std::vector<double> a(size_t(pos + 1));
        double mx = -1e30, z = 0;
        for (int64_t j = 0; j <= pos; ++j) {
          double dot = 0;
          for (int d = 0; d < 8; ++d) dot += double(qr[d]) * k[size_t((kvh * T + j) * 8 + d)];
          a[size_t(j)] = dot / std::sqrt(8.0);
          mx = std::max(mx, a[size_t(j)]);
        }
        for (auto& x : a) z += (x = std::exp(x - mx));
        for (int d = 0; d < 8; ++d) {
          double o = 0;
          for (int64_t j = 0; j <= pos; ++j) o += a[size_t(j)] / z * v[size_t((kvh * T + j) * 8 + d)];
          ASSERT_NEAR(o, runtime[size_t((w * 8 + qh) * 8 + d)], 2e-5) << "layer " << l << " head " << qh;
        }
      }
  }
}

TEST(Capture, AttentionStatisticsAreDistributions) {
  NEED_MODELS();
  auto m = gguf_model();
  auto prompt = m->tokenizer().encode(kGolden, true);
  const int64_t T = int64_t(prompt.size());
  kv::CaptureOptions opt;
  opt.attn_stats = true;
  kv::Snapshot snap = kv::capture(*m, prompt, {}, "", opt);
  for (const auto& layer : snap.layers) {
    auto acc = f32(layer.attn_acc), last = f32(layer.attn_last);
    for (int h = 0; h < 8; ++h) {
      double sum_acc = 0, sum_last = 0;
      for (int64_t j = 0; j < T; ++j) sum_acc += acc[size_t(h * T + j)], sum_last += last[size_t(h * T + j)];
      EXPECT_NEAR(sum_acc, double(T), 1e-3);  // every query's row sums to 1
      EXPECT_NEAR(sum_last, 1.0, 1e-5);
      // Key 0 is seen by all T queries, the last key only by the last query.
      EXPECT_NEAR(acc[size_t(h * T + T - 1)], last[size_t(h * T + T - 1)], 1e-6);
    }
  }
}

TEST(Capture, ProbeLogitsRowsPredictTheNextProbeToken) {
  NEED_MODELS();
  auto m = gguf_model();
  auto all = m->tokenizer().encode(kGolden, true);
  std::vector<int32_t> prompt(all.begin(), all.begin() + 30), probe(all.begin() + 30, all.end());
  kv::Snapshot snap = kv::capture(*m, prompt, probe, "", {});
  const auto logits = f32(snap.header.probe_logits);
  // The golden text is the model's own greedy output: every row's argmax is the next token.
  for (size_t i = 0; i + 1 < probe.size(); ++i) {
    const float* row = &logits[i * 512];
    EXPECT_EQ(std::max_element(row, row + 512) - row, probe[i + 1]) << i;
  }
  EXPECT_EQ(snap.header.probe_positions.front(), 30);
}

TEST(Capture, PerplexityOnTinyStoriesIsInRange) {
  NEED_MODELS();
  const char* data = std::getenv("KV_DATA_DIR");
  std::ifstream in(std::string(data ? data : "") + "/tinystories_val.txt");
  if (!in) GTEST_SKIP() << "KV_DATA_DIR not available";
  auto m = gguf_model();
  std::vector<std::vector<int32_t>> docs;
  std::string line, para;
  while (docs.size() < 50 && std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      if (!para.empty()) {
        auto ids = m->tokenizer().encode(para, true);
        if (ids.size() > 512) ids.resize(512);
        docs.push_back(ids);
      }
      para.clear();
    } else {
      para += (para.empty() ? "" : "\n") + line;
    }
  }
  int64_t n = 0;
  double ppl = kv::perplexity(*m, docs, &n);
  EXPECT_GT(ppl, 3.5);
  EXPECT_LT(ppl, 5.0);
  EXPECT_GT(n, 4000);
}

TEST(Capture, BadRequestsAreUsageErrors) {
  NEED_MODELS();
  auto m = gguf_model();
  auto ids = m->tokenizer().encode("Once upon a time", true);
  kv::CaptureOptions opt;
  opt.window = 6;
  EXPECT_THROW(kv::capture(*m, ids, {}, "", opt), kv::Error);
  EXPECT_THROW(kv::capture(*m, {}, {}, "", {}), kv::Error);
  std::vector<int32_t> long_prompt(size_t(m->config().context) + 1, 5);
  try {
    kv::capture(*m, long_prompt, {}, "", {});
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::usage);
    EXPECT_NE(std::string(e.what()).find("--ctx"), std::string::npos);
  }
  std::vector<int32_t> bad_id = {1, 999};
  try {
    kv::capture(*m, bad_id, {}, "", {});
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::data);
  }
}

namespace {
// Rewrites the legacy stories260K.bin as a llama2.c "v1" export (magic "ak42", version 1,
// 256-byte header, norms first, then the matrices), the layout of llama2.c's export.py.
std::string write_v1_copy() {
  std::ifstream in(models_dir() + "/stories260K.bin", std::ios::binary);
  std::vector<char> bin((std::istreambuf_iterator<char>(in)), {});
  int32_t h[7];
  std::memcpy(h, bin.data(), sizeof h);
  const int64_t D = h[0], Hd = h[1], L = h[2], heads = h[3], kvh = h[4], V = std::abs(h[5]), ctx = h[6];
  const int64_t kv_dim = D / heads * kvh;
  const float* f = reinterpret_cast<const float*>(bin.data() + 28);
  auto span = [&](int64_t n) {
    std::vector<float> v(f, f + n);
    f += n;
    return v;
  };
  auto emb = span(V * D), att_norm = span(L * D), wq = span(L * D * D), wk = span(L * kv_dim * D),
       wv = span(L * kv_dim * D), wo = span(L * D * D), ffn_norm = span(L * D), w1 = span(L * Hd * D),
       w2 = span(L * D * Hd), w3 = span(L * Hd * D), final_norm = span(D);
  (void)ctx;
  std::string path = ::testing::TempDir() + "/stories260K-v1.bin";
  std::ofstream out(path, std::ios::binary);
  char header[256] = {};
  const uint32_t magic = 0x616b3432;
  const int32_t version = 1;
  std::memcpy(header, &magic, 4);
  std::memcpy(header + 4, &version, 4);
  int32_t params[7] = {h[0], h[1], h[2], h[3], h[4], int32_t(V), h[6]};
  std::memcpy(header + 8, params, sizeof params);
  header[36] = 1;  // shared classifier
  out.write(header, 256);
  for (const auto* v : {&att_norm, &ffn_norm, &final_norm, &emb, &wq, &wk, &wv, &wo, &w1, &w2, &w3})
    out.write(reinterpret_cast<const char*>(v->data()), std::streamsize(v->size() * 4));
  return path;
}
}  // namespace

TEST(Model, Llama2cV1ExportGivesTheSameLogits) {
  NEED_MODELS();
  auto v1 = kv::Model::load(write_v1_copy(), models_dir() + "/tok512.bin");
  EXPECT_EQ(v1->format(), "llama2.c v1");
  auto legacy = bin_model();
  auto ids = legacy->tokenizer().encode(kGolden, true);
  kv::Session a(*v1, int64_t(ids.size())), b(*legacy, int64_t(ids.size()));
  std::vector<float> la, lb;
  a.forward(ids.data(), int64_t(ids.size()), la, true);
  b.forward(ids.data(), int64_t(ids.size()), lb, true);
  EXPECT_EQ(la, lb);
}

TEST(Model, BadModelFilesAreDataErrors) {
  NEED_MODELS();
  const std::string dir = ::testing::TempDir();
  auto expect_code = [](const std::string& path, kv::Exit code, const std::string& needle) {
    try {
      kv::Model::load(path, "");
      ADD_FAILURE() << path << " loaded";
    } catch (const kv::Error& e) {
      EXPECT_EQ(int(e.code()), int(code)) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_code(dir + "/missing.gguf", kv::Exit::no_input, "No such file");
  { std::ofstream(dir + "/text.bin") << "hello, this is not a model at all, just some text\n"; }
  expect_code(dir + "/text.bin", kv::Exit::data, "neither a GGUF file nor a llama2.c checkpoint");
  std::ifstream in(models_dir() + "/stories260K.bin", std::ios::binary);
  std::vector<char> bin((std::istreambuf_iterator<char>(in)), {});
  for (size_t cut : {size_t(20), size_t(1000), bin.size() / 2, bin.size() - 4}) {
    std::ofstream(dir + "/cut.bin", std::ios::binary).write(bin.data(), std::streamsize(cut));
    expect_code(dir + "/cut.bin", kv::Exit::data, cut < 28 ? "too short" : "truncated");
  }
}

TEST(Capture, SnapshotLoadsBackAndDecodingContinuesIdentically) {
  NEED_MODELS();
  auto m = gguf_model();
  auto all = m->tokenizer().encode(kGolden, true);
  std::vector<int32_t> prompt(all.begin(), all.begin() + 30), rest(all.begin() + 30, all.end());
  kv::CaptureOptions opt;
  opt.dtype = kv::DType::f32;
  kv::Snapshot snap = kv::capture(*m, prompt, {}, "", opt);
  // Continue from the snapshot and from a fresh run of the prompt: identical logits.
  kv::Session from_snap(*m, int64_t(all.size())), direct(*m, int64_t(all.size()));
  from_snap.load(snap.header, snap.layers);
  EXPECT_EQ(from_snap.n_past(), 30);
  std::vector<float> a, b;
  direct.forward(prompt.data(), 30, b, false);
  from_snap.forward(rest.data(), int64_t(rest.size()), a, true);
  direct.forward(rest.data(), int64_t(rest.size()), b, true);
  EXPECT_EQ(a, b);
  // A layer whose arrays disagree (positions dropped, k and v not) is refused; a position past
  // the sequence too (evicted caches load: tests/unit/test_eval.cpp).
  kv::Snapshot bad = snap;
  bad.layers[2].positions.erase(bad.layers[2].positions.begin() + 3);
  bad.layers[2].head_offsets = {0, 29, 59, 89, 119};
  EXPECT_THROW(kv::Session(*m, 64).load(bad.header, bad.layers), kv::Error);
  bad = snap;
  bad.layers[1].positions[5] = 30;
  EXPECT_THROW(kv::Session(*m, 64).load(bad.header, bad.layers), kv::Error);
}
