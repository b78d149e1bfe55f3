#include "kv/synth.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kv/attention.h"
#include "kv/error.h"
#include "kv/str.h"

namespace kv {

namespace {

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t fmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A reproducible stream per (seed, a, b, c), independent of how work is split across threads.
struct Rng {
  uint64_t state;
  Rng(uint64_t seed, uint64_t a, uint64_t b, uint64_t c)
      : state(fmix64(seed + 0x632be59bd9b4e019ull)) {
    uint64_t salt = 0x9e3779b97f4a7c15ull;
    for (uint64_t x : {a, b, c}) {
      state = fmix64(state ^ fmix64(x + salt));
      salt += 0x9e3779b97f4a7c15ull;
    }
  }
  // Approximately standard normal: Irwin-Hall sum of four 16-bit uniforms, rescaled. Cheap
  // enough for gigabytes of synthetic data; the tails are bounded at +-3.46, which is fine here.
  float normal() {
    uint64_t r = splitmix(state);
    float sum =
        float(r & 0xffff) + float((r >> 16) & 0xffff) + float((r >> 32) & 0xffff) + float(r >> 48);
    return (sum * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
  }
  uint64_t next() { return splitmix(state); }
};

ModelInfo shape(const char* name, int layers, int q, int kv, int dim, int ctx, double theta) {
  ModelInfo m;
  m.arch = "llama";
  m.name = name;
  m.n_layers = layers;
  m.n_q_heads = q;
  m.n_kv_heads = kv;
  m.head_dim = dim;
  m.context_length = ctx;
  m.rope_theta = theta;
  m.rope_dims = dim;
  return m;
}

}  // namespace

ModelInfo model_preset(const std::string& name) {
  if (name == "tiny") return shape("synthetic-tiny", 2, 4, 2, 16, 4096, 10000);
  if (name == "stories260k") return shape("synthetic-stories260k", 5, 8, 4, 8, 512, 10000);
  if (name == "llama2-7b") return shape("synthetic-llama2-7b", 32, 32, 32, 128, 4096, 10000);
  if (name == "llama3-8b") return shape("synthetic-llama3-8b", 32, 32, 8, 128, 8192, 500000);
  if (name == "mistral-7b") return shape("synthetic-mistral-7b", 32, 32, 8, 128, 32768, 1000000);
  throw Error(Exit::usage, "unknown preset '" + name + "' (expected " + model_preset_names() + ")");
}

std::string model_preset_names() {
  return "tiny, stories260k, llama2-7b, llama3-8b, mistral-7b";
}

Synthesizer::Synthesizer(const SynthSpec& spec) : spec_(spec) {
  const ModelInfo& m = spec.model;
  if (spec.n_tokens < 1) throw Error(Exit::usage, "--tokens must be at least 1");
  if (spec.window < 0 || spec.window > spec.n_tokens)
    throw Error(Exit::usage,
                str("--window ", spec.window, " must be in [0, tokens = ", spec.n_tokens, "]"));
  if (spec.probe < 0 || spec.probe > kSynthMaxProbe)
    throw Error(Exit::usage, str("--probe ", spec.probe, " must be in [0, ", kSynthMaxProbe, "]"));
  if (!(m.rope_theta > 0 && std::isfinite(m.rope_theta)))
    throw Error(Exit::usage, str("--rope-theta ", m.rope_theta, " must be finite and positive"));
  if (spec.attn_stats && spec.window == 0)
    throw Error(Exit::usage,
                "--attn-stats needs --window W: the statistics come from the window queries");
  if (spec.outlier_pairs < 0 || 2 * spec.outlier_pairs > m.rope_dims)
    throw Error(Exit::usage, "--outlier-pairs must be in [0, head_dim / 2]");
  if (spec.vocab < 1) throw Error(Exit::usage, "--vocab must be positive");
  Header& h = header_;
  h.model = m;
  h.n_tokens = spec.n_tokens;
  h.tokens.resize(size_t(spec.n_tokens));
  Rng rng(spec.seed, 0xffff, 0, 0);
  h.tokens[0] = 1;  // BOS, as a real prompt starts
  for (size_t t = 1; t < h.tokens.size(); ++t)
    h.tokens[t] = int32_t(rng.next() % uint64_t(spec.vocab));
  for (int64_t p = spec.n_tokens - spec.window; p < spec.n_tokens; ++p)
    h.window_positions.push_back(int32_t(p));
  h.has_attn_stats = spec.attn_stats;
  for (int p = 0; p < spec.probe; ++p) {  // probe queries follow the prompt; tokens drawn too
    h.probe_tokens.push_back(int32_t(rng.next() % uint64_t(spec.vocab)));
    h.probe_positions.push_back(int32_t(spec.n_tokens + p));
  }
  try {
    validate_header(h);
  } catch (const Error& e) {
    throw Error(Exit::usage, e.what());
  }
  rope_ = std::make_unique<RopeTable>(m.rope_dims, m.rope_theta, spec.n_tokens + spec.probe);
}

void Synthesizer::layer(int l, Layer& out) const {
  const ModelInfo& m = spec_.model;
  const int D = m.head_dim, Hkv = m.n_kv_heads, G = m.group_size();
  const int64_t T = spec_.n_tokens, N = T * Hkv, W = spec_.window;
  const bool pairs = m.rope_style == "pairs";
  out.positions.resize(size_t(N));
  out.head_offsets.resize(size_t(Hkv) + 1);
  for (int h = 0; h <= Hkv; ++h) out.head_offsets[size_t(h)] = int64_t(h) * T;
  out.mass.clear();
  out.attn_acc.clear();
  out.attn_last.clear();
  out.probe_q.clear();

  // Channel `side` (0 or 1) of RoPE pair `pair` in this model's layout.
  const int n_pairs = m.rope_dims / 2;
  auto channel = [&](int pair, int side) {
    return pairs ? 2 * pair + side : pair + side * n_pairs;
  };
  // The sink lives in the slowest-rotating pair, which barely turns over the whole context, so
  // every later query still lines up with it (real sinks are position-independent too). Its
  // logit against a window query is about ln(T) + 1: the sink draws most of the attention.
  const int sink_channel = channel(n_pairs - 1, 0);
  const float query_sink = 2.0f;
  const float key_sink = float((std::log(double(T)) + 1.0) * std::sqrt(double(D)) / query_sink);

  // Per-head mean key: unit-scale noise everywhere, large in a few low-frequency RoPE pairs.
  std::vector<float> mean(size_t(Hkv) * D);
  for (int h = 0; h < Hkv; ++h) {
    Rng rng(spec_.seed, uint64_t(l), uint64_t(h), 0xabc);
    float* mu = &mean[size_t(h) * D];
    for (int c = 0; c < D; ++c) mu[c] = 0.3f * rng.normal();
    for (int o = 0; o < spec_.outlier_pairs; ++o) {
      // Pick among the slow half of the pairs, where real outlier channels sit, but not the
      // slowest pair, which carries the sink.
      const int span = std::max(1, n_pairs - 1 - n_pairs / 2);
      int pair = n_pairs / 2 + int(rng.next() % uint64_t(span));
      float mag = spec_.outlier_scale * (0.75f + 0.5f * float(rng.next() % 1000) / 1000.0f);
      float sign = rng.next() & 1 ? 1.0f : -1.0f;
      mu[channel(pair, 0)] = sign * mag;
      mu[channel(pair, 1)] = sign * mag * 0.5f;
    }
  }
  std::vector<float> k(size_t(N) * D), v(size_t(N) * D);
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < Hkv; ++h)
    for (int64_t t = 0; t < T; ++t) {
      Rng rng(spec_.seed, uint64_t(l), uint64_t(h), uint64_t(t) + 1);
      const float* mu = &mean[size_t(h) * D];
      const size_t row = size_t(h * T + t);
      float* kr = &k[row * D];
      float* vr = &v[row * D];
      const float vscale = t == 0 ? 0.05f : 1.0f;  // sinks carry near-zero values
      for (int c = 0; c < D; ++c) {
        kr[c] = mu[c] + rng.normal();
        vr[c] = vscale * rng.normal();
      }
      if (t == 0) kr[sink_channel] = key_sink;
      rope_->apply(kr, t, pairs);
      out.positions[row] = int32_t(t);
    }
  out.k = Tensor::from_f32(spec_.dtype, N, D, k.data());
  out.v = Tensor::from_f32(spec_.dtype, N, D, v.data());

  // Window and probe queries lean toward their KV head's mean key (so keys sharing its outlier
  // channels draw attention) and toward the sink channel; each query row has its own stream.
  auto queries = [&](int64_t count, int64_t first_position, uint64_t stream) {
    std::vector<float> q(size_t(m.n_q_heads) * size_t(count) * D);
    for (int qh = 0; qh < m.n_q_heads; ++qh)
      for (int64_t w = 0; w < count; ++w) {
        Rng rng(spec_.seed, uint64_t(l), uint64_t(qh), stream + uint64_t(w));
        const float* mu = &mean[size_t(qh / G) * D];
        float* qr = &q[(size_t(qh) * size_t(count) + size_t(w)) * D];
        for (int c = 0; c < D; ++c) qr[c] = 0.25f * mu[c] + rng.normal();
        qr[sink_channel] += query_sink;
        rope_->apply(qr, first_position + w, pairs);
      }
    return q;
  };
  if (W > 0) {
    const std::vector<float> q = queries(W, T - W, 0x1000000);
    out.window_q = Tensor::from_f32(DType::f32, int64_t(m.n_q_heads) * W, D, q.data());
    if (spec_.attn_stats) window_attention_stats(q, k, out);
  } else {
    out.window_q.clear();
  }
  if (spec_.probe > 0) {
    const std::vector<float> q = queries(spec_.probe, T, 0x2000000);
    out.probe_q = Tensor::from_f32(DType::f32, int64_t(m.n_q_heads) * spec_.probe, D, q.data());
  }
}

void Synthesizer::window_attention_stats(const std::vector<float>& q, const std::vector<float>& k,
                                         Layer& out) const {
  const ModelInfo& m = spec_.model;
  const int D = m.head_dim, G = m.group_size();
  const int64_t T = spec_.n_tokens, W = spec_.window;
  out.attn_acc.resize(DType::f32, m.n_q_heads, T);
  out.attn_last.resize(DType::f32, m.n_q_heads, T);
#pragma omp parallel for schedule(dynamic)
  for (int qh = 0; qh < m.n_q_heads; ++qh) {
    HeadView head;
    head.k = k.data() + int64_t(qh / G) * T * D;
    head.positions = out.positions.data() + int64_t(qh / G) * T;
    head.n = T;
    head.dim = D;
    std::vector<float> weights(size_t(W * T));
    attention_weights(head, q.data() + int64_t(qh) * W * D, header_.window_positions.data(), W,
                      weights.data());
    float* acc = out.attn_acc.as<float>() + int64_t(qh) * T;
    std::fill(acc, acc + T, 0.0f);
    for (int64_t w = 0; w < W; ++w)
      for (int64_t j = 0; j < T; ++j) acc[j] += weights[size_t(w * T + j)];
    std::copy_n(weights.data() + (W - 1) * T, T, out.attn_last.as<float>() + int64_t(qh) * T);
  }
}

Snapshot synth_snapshot(const SynthSpec& spec) {
  Synthesizer s(spec);
  Snapshot snap;
  snap.header = s.header();
  snap.layers.resize(size_t(spec.model.n_layers));
  for (int l = 0; l < spec.model.n_layers; ++l) s.layer(l, snap.layers[size_t(l)]);
  return snap;
}

}  // namespace kv
