#include "helpers.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "kv/capture.h"
#include "kv/error.h"
#include "kv/model.h"

namespace kvtest {

// KV_MODELS_DIR, KV_DATA_DIR and KV_BIN default to the build's paths unless already set.
[[maybe_unused]] static const bool env_defaults = [] {
  setenv("KV_MODELS_DIR", KV_MODELS_DIR_DEFAULT, 0);
  setenv("KV_DATA_DIR", KV_DATA_DIR_DEFAULT, 0);
  setenv("KV_BIN", KV_BIN_DEFAULT, 0);
  return true;
}();

int exit_code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const kv::Error& e) {
    return int(e.code());
  }
  return 0;
}

const kv::Snapshot* stories_capture() {
  static std::unique_ptr<kv::Snapshot> snap = [] {
    std::unique_ptr<kv::Snapshot> s;
    const std::string model_path = std::string(std::getenv("KV_MODELS_DIR")) + "/stories260K.gguf";
    std::ifstream text_in(std::string(std::getenv("KV_DATA_DIR")) + "/tinystories_val.txt");
    if (!std::ifstream(model_path) || !text_in) return s;
    std::stringstream text;
    text << text_in.rdbuf();
    auto model = kv::Model::load(model_path);
    auto ids = model->tokenizer().encode(text.str().substr(0, 8000), true);
    if (ids.size() < 464) return s;
    std::vector<int32_t> prompt(ids.begin(), ids.begin() + 400),
        probe(ids.begin() + 400, ids.begin() + 464);
    kv::CaptureOptions opt;
    opt.window = 32;
    opt.attn_stats = true;
    s = std::make_unique<kv::Snapshot>(kv::capture(*model, prompt, probe, "", opt));
    return s;
  }();
  return snap.get();
}

kv::Snapshot one_head_snapshot(const std::vector<float>& k, const std::vector<float>& v, int dim,
                               const std::vector<float>& probe_q) {
  kv::Snapshot s;
  kv::Header& h = s.header;
  h.model.n_layers = h.model.n_q_heads = h.model.n_kv_heads = 1;
  h.model.head_dim = h.model.rope_dims = dim;
  h.model.context_length = 1 << 16;
  h.n_tokens = int64_t(k.size()) / dim;
  kv::Layer l;
  for (int64_t t = 0; t < h.n_tokens; ++t) {
    h.tokens.push_back(int32_t(t + 1));
    l.positions.push_back(int32_t(t));
  }
  for (int64_t p = 0; p < int64_t(probe_q.size()) / dim; ++p) {
    h.probe_tokens.push_back(9);
    h.probe_positions.push_back(int32_t(h.n_tokens + p));
  }
  l.head_offsets = {0, h.n_tokens};
  l.k = kv::Tensor::from_f32(kv::DType::f32, h.n_tokens, dim, k.data());
  l.v = kv::Tensor::from_f32(kv::DType::f32, h.n_tokens, dim, v.data());
  if (!probe_q.empty())
    l.probe_q =
        kv::Tensor::from_f32(kv::DType::f32, int64_t(probe_q.size()) / dim, dim, probe_q.data());
  s.layers.push_back(l);
  return s;
}

kv::Snapshot tiny_snapshot(kv::DType dtype, bool side_data, bool ragged) {
  kv::Snapshot s;
  kv::Header& h = s.header;
  h.model.name = "tiny-test";
  h.model.n_layers = 2;
  h.model.n_q_heads = 4;
  h.model.n_kv_heads = 2;
  h.model.head_dim = 4;
  h.model.rope_dims = 4;
  h.model.context_length = 64;
  h.n_tokens = 6;
  h.tokens = {1, 10, 11, 12, 13, 14};
  h.text = "hello kv";
  if (side_data) {
    h.window_positions = {4, 5};
    h.has_attn_stats = true;
    h.probe_tokens = {7, 8, 9};
    h.probe_positions = {6, 7, 8};
    std::vector<float> logits(3 * 5);
    for (size_t i = 0; i < logits.size(); ++i) logits[i] = 0.5f * float(i) - 3.0f;
    h.probe_logits = kv::Tensor::from_f32(kv::DType::f32, 3, 5, logits.data());
  }
  for (int l = 0; l < 2; ++l) {
    kv::Layer layer;
    // Layer 1 ragged: head 0 keeps positions {0, 2, 5}, head 1 keeps {1, 3, 4, 5}.
    if (ragged && l == 1) {
      layer.positions = {0, 2, 5, 1, 3, 4, 5};
      layer.head_offsets = {0, 3, 7};
      layer.mass = {1.0f, 2.0f, 3.0f, 1.0f, 1.0f, 1.5f, 1.0f};
    } else {
      for (int hd = 0; hd < 2; ++hd)
        for (int t = 0; t < 6; ++t) layer.positions.push_back(t);
      layer.head_offsets = {0, 6, 12};
    }
    const int64_t n = layer.entries();
    std::vector<float> k(size_t(n) * 4), v(k.size());
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = 0.25f * float(i) - float(l);  // exactly representable in f16 and bf16
      v[i] = -0.5f * float(i) + 2.0f;
    }
    layer.k = kv::Tensor::from_f32(dtype, n, 4, k.data());
    layer.v = kv::Tensor::from_f32(dtype, n, 4, v.data());
    if (side_data) {
      std::vector<float> q(4 * 2 * 4), acc(4 * 6), last(4 * 6), pq(4 * 3 * 4);
      for (size_t i = 0; i < q.size(); ++i) q[i] = float(i) * 0.1f + float(l);
      for (size_t i = 0; i < acc.size(); ++i) acc[i] = float(i % 6) * 0.5f;
      for (size_t i = 0; i < last.size(); ++i) last[i] = 1.0f / 6.0f;
      for (size_t i = 0; i < pq.size(); ++i) pq[i] = -float(i);
      layer.window_q = kv::Tensor::from_f32(kv::DType::f32, 8, 4, q.data());
      layer.attn_acc = kv::Tensor::from_f32(kv::DType::f32, 4, 6, acc.data());
      layer.attn_last = kv::Tensor::from_f32(kv::DType::f32, 4, 6, last.data());
      layer.probe_q = kv::Tensor::from_f32(kv::DType::f32, 12, 4, pq.data());
    }
    s.layers.push_back(std::move(layer));
  }
  return s;
}

void expect_same(const kv::Snapshot& a, const kv::Snapshot& b) {
  const kv::Header &x = a.header, &y = b.header;
  EXPECT_EQ(x.model, y.model);
  EXPECT_EQ(x.n_tokens, y.n_tokens);
  EXPECT_EQ(x.tokens, y.tokens);
  EXPECT_EQ(x.text, y.text);
  EXPECT_EQ(x.window_positions, y.window_positions);
  EXPECT_EQ(x.has_attn_stats, y.has_attn_stats);
  EXPECT_EQ(x.probe_tokens, y.probe_tokens);
  EXPECT_EQ(x.probe_positions, y.probe_positions);
  EXPECT_TRUE(x.probe_logits.same_contents(y.probe_logits));
  EXPECT_EQ(x.provenance, y.provenance);
  EXPECT_EQ(x.history, y.history);
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const kv::Layer &p = a.layers[l], &q = b.layers[l];
    EXPECT_EQ(p.positions, q.positions);
    EXPECT_EQ(p.head_offsets, q.head_offsets);
    EXPECT_EQ(p.mass, q.mass);
    EXPECT_TRUE(p.k.same_contents(q.k));
    EXPECT_TRUE(p.v.same_contents(q.v));
    EXPECT_TRUE(p.window_q.same_contents(q.window_q));
    EXPECT_TRUE(p.attn_acc.same_contents(q.attn_acc));
    EXPECT_TRUE(p.attn_last.same_contents(q.attn_last));
    EXPECT_TRUE(p.probe_q.same_contents(q.probe_q));
  }
}

std::string temp_dir() {
  static std::string dir = [] {
    std::string templ = (std::filesystem::temp_directory_path() / "kvtest.XXXXXX").string();
    const char* made = mkdtemp(templ.data());
    if (!made) std::abort();
    std::string d = made;
    static struct Cleanup {
      std::string path;
      ~Cleanup() { std::filesystem::remove_all(path); }
    } cleanup{d};
    return d;
  }();
  return dir;
}

}  // namespace kvtest

std::vector<double> online_softmax_step(const std::vector<double>& scores, double& m, double& l,
                                        std::vector<double>& o) {
  const double mx = std::max(m, *std::max_element(scores.begin(), scores.end()));
  const double alpha = m == -INFINITY ? 0.0 : std::exp(m - mx);
  m = mx;
  l *= alpha;
  for (double& x : o) x *= alpha;
  std::vector<double> p(scores.size());
  for (size_t j = 0; j < scores.size(); ++j) l += p[j] = std::exp(scores[j] - mx);
  return p;
}
