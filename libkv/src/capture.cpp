#include "kv/capture.h"

#include <algorithm>
#include <cmath>

#include "kv/error.h"
#include "kv/str.h"
#include "kvk/ops.h"

namespace kv {

namespace {

// Queries recorded as [position][q head][dim] -> [q head][position][dim], as the format stores.
Tensor by_head(const std::vector<float>& rows, int64_t n_pos, int64_t heads, int64_t dim) {
  std::vector<float> out(rows.size());
  for (int64_t p = 0; p < n_pos; ++p)
    for (int64_t h = 0; h < heads; ++h)
      std::copy_n(&rows[size_t((p * heads + h) * dim)], dim, &out[size_t((h * n_pos + p) * dim)]);
  return Tensor::from_f32(DType::f32, heads * n_pos, dim, out.data());
}

// The first `cols` columns of a [rows][stride] matrix.
Tensor first_columns(const std::vector<float>& m, int64_t rows, int64_t stride, int64_t cols) {
  std::vector<float> out(size_t(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    std::copy_n(&m[size_t(r * stride)], cols, &out[size_t(r * cols)]);
  return Tensor::from_f32(DType::f32, rows, cols, out.data());
}

// A corrupt model (NaN/Inf in its weights or settings) runs without complaint: say so.
void require_finite(const float* x, size_t n, const char* what) {
  if (kvk::count_nonfinite(DType::f32, x, n))
    throw Error(Exit::data, str("the model computed NaN/Inf in ", what,
                                ": its weights or settings are not usable (a corrupt file?)"));
}

}  // namespace

double log_prob(const float* logits, int64_t vocab, int32_t target) {
  float mx = *std::max_element(logits, logits + vocab);
  double z = 0;
  for (int64_t i = 0; i < vocab; ++i) z += std::exp(double(logits[i] - mx));
  return double(logits[target] - mx) - std::log(z);
}

Snapshot capture(const Model& model, const std::vector<int32_t>& prompt,
                 const std::vector<int32_t>& probe, const std::string& text,
                 const CaptureOptions& options) {
  const ModelConfig& c = model.config();
  const int64_t T = int64_t(prompt.size()), P = int64_t(probe.size());
  if (T == 0) throw Error(Exit::usage, "the prompt is empty");
  if (T + P > c.context)
    throw Error(Exit::usage,
                str("prompt (", T, " tokens) plus probe (", P, ") exceed the model's context of ",
                    c.context, " tokens; cap the prompt with --ctx N"));
  if (options.window < 0 || options.window > T)
    throw Error(Exit::usage,
                str("--window ", options.window, " is longer than the prompt (", T, " tokens)"));
  const int64_t W = options.window, Hq = c.n_heads, Hkv = c.n_kv_heads, D = c.head_dim;

  Session session(model, T + P);
  session.capture.queries_from = W ? T - W : INT64_MAX;
  session.capture.attn_stats = options.attn_stats;
  session.on_progress = options.progress;
  std::vector<float> logits;
  session.forward(prompt.data(), T, logits, false);

  Snapshot snap;
  Header& h = snap.header;
  h.model = model.info();
  h.n_tokens = T;
  h.tokens = prompt;
  h.text = text;
  h.has_attn_stats = options.attn_stats;
  for (int64_t p = T - W; p < T; ++p) h.window_positions.push_back(int32_t(p));
  snap.layers.resize(size_t(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    Layer& layer = snap.layers[size_t(l)];
    std::vector<float> k(size_t(Hkv * T * D)), v(k.size());
    for (int64_t hd = 0; hd < Hkv; ++hd) {
      std::copy_n(session.key(l, int(hd), 0), T * D, &k[size_t(hd * T * D)]);
      std::copy_n(session.value(l, int(hd), 0), T * D, &v[size_t(hd * T * D)]);
      for (int64_t p = 0; p < T; ++p) layer.positions.push_back(int32_t(p));
      layer.head_offsets.push_back(hd * T);
    }
    layer.head_offsets.push_back(Hkv * T);
    layer.k = Tensor::from_f32(options.dtype, Hkv * T, D, k.data());
    layer.v = Tensor::from_f32(options.dtype, Hkv * T, D, v.data());
    if (W) layer.window_q = by_head(session.queries[size_t(l)], W, Hq, D);
    if (options.attn_stats) {
      layer.attn_acc = first_columns(session.attn_acc[size_t(l)], Hq, T + P, T);
      layer.attn_last = first_columns(session.attn_last[size_t(l)], Hq, T + P, T);
    }
  }

  if (P) {
    session.capture.queries_from = T;
    session.capture.attn_stats = false;
    for (auto& q : session.queries) q.clear();
    for (auto& o : session.attn_outputs) o.clear();
    session.query_positions.clear();
    std::vector<float> probe_logits;
    session.forward(probe.data(), P, probe_logits, true);
    h.probe_tokens = probe;
    for (int64_t i = 0; i < P; ++i) h.probe_positions.push_back(int32_t(T + i));
    if (options.probe_logits)
      h.probe_logits = Tensor::from_f32(DType::f32, P, c.vocab, probe_logits.data());
    for (int l = 0; l < c.n_layers; ++l)
      snap.layers[size_t(l)].probe_q = by_head(session.queries[size_t(l)], P, Hq, D);
    require_finite(probe_logits.data(), probe_logits.size(), "the probe's logits");
  }
  // A model whose weights or settings hold NaN/Inf (a corrupt file) runs without complaint and
  // writes a cache every reader rejects: say so here, naming the first place it shows.
  for (int l = 0; l < c.n_layers; ++l) {
    const Layer& layer = snap.layers[size_t(l)];
    for (const auto& [t, what] : {std::pair{&layer.k, "keys"},
                                  {&layer.v, "values"},
                                  {&layer.window_q, "window queries"},
                                  {&layer.attn_acc, "attention statistics"},
                                  {&layer.probe_q, "probe queries"}})
      if (kvk::count_nonfinite(t->dtype(), t->data(), t->size()))
        throw Error(Exit::data, str("the model computed NaN/Inf ", what, " in layer ", l,
                                    ": its weights or settings are not usable (a corrupt file?)"));
  }
  return snap;
}

std::vector<int32_t> continue_greedy(const Model& model, Session& session,
                                     std::vector<float>& logits, int64_t steps) {
  std::vector<int32_t> out;
  const int eos = model.has_tokenizer() ? model.tokenizer().eos() : -1;
  while (int64_t(out.size()) < steps) {
    require_finite(logits.data(), logits.size(), "the next-token logits");
    const int32_t next = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(next);
    if (next == eos || int64_t(out.size()) >= steps || session.n_past() >= session.capacity())
      break;
    session.forward(&next, 1, logits, false);
  }
  return out;
}

std::vector<int32_t> generate_greedy(const Model& model, const std::vector<int32_t>& prompt,
                                     int64_t steps) {
  if (prompt.empty()) throw Error(Exit::usage, "the prompt is empty");
  // (steps first capped, so the sum cannot overflow)
  const int64_t cap =
      std::min<int64_t>(model.config().context,
                        int64_t(prompt.size()) + std::min<int64_t>(steps, model.config().context));
  if (int64_t(prompt.size()) > cap)
    throw Error(Exit::usage,
                str("the prompt (", prompt.size(), " tokens) exceeds the model's context"));
  Session session(model, cap);
  std::vector<float> logits;
  std::vector<int32_t> out = prompt;
  session.forward(prompt.data(), int64_t(prompt.size()), logits, false);
  const std::vector<int32_t> more =
      continue_greedy(model, session, logits, cap - int64_t(prompt.size()));
  out.insert(out.end(), more.begin(), more.end());
  return out;
}

double perplexity(const Model& model, const std::vector<std::vector<int32_t>>& docs,
                  int64_t* n_scored) {
  double nll = 0;
  int64_t count = 0;
  const int64_t V = model.config().vocab;
  for (const auto& doc : docs) {
    if (doc.size() < 2) continue;
    Session session(model, int64_t(doc.size()));
    std::vector<float> logits;
    session.forward(doc.data(), int64_t(doc.size()), logits, true);
    for (size_t i = 0; i + 1 < doc.size(); ++i)
      nll -= log_prob(&logits[i * size_t(V)], V, doc[i + 1]);
    count += int64_t(doc.size()) - 1;
  }
  if (n_scored) *n_scored = count;
  if (count == 0) throw Error(Exit::usage, "no tokens to score");
  return std::exp(nll / double(count));
}

}  // namespace kv
