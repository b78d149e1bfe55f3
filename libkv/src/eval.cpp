#include "kv/eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>

#include "kv/attention.h"
#include "kv/capture.h"
#include "kv/error.h"
#include "kv/str.h"
#include "kvk/cuda.h"

namespace kv {

namespace {

template <class T>
void same(const char* field, const T& a, const T& b) {
  if (a == b) return;
  if constexpr (std::is_arithmetic_v<T> || std::is_same_v<T, std::string>)
    throw Error(Exit::data, str("reference and candidate differ in ", field, " (", a, " vs ", b,
                                "): not caches of the same sequence and model"));
  else
    throw Error(Exit::data, str("reference and candidate differ in ", field,
                                ": not caches of the same sequence and model"));
}

// log-softmax of one row of logits, in double.
void log_softmax(const float* logits, int64_t n, std::vector<double>& out) {
  out.resize(size_t(n));
  double mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, double(logits[i]));
  double z = 0;
  for (int64_t i = 0; i < n; ++i) z += std::exp(double(logits[i]) - mx);
  const double lz = mx + std::log(z);
  for (int64_t i = 0; i < n; ++i) out[size_t(i)] = double(logits[i]) - lz;
}

}  // namespace

AttentionFidelity& AttentionFidelity::operator+=(const AttentionFidelity& o) {
  rows += o.rows;
  rel_error += o.rel_error;
  cosine += o.cosine;
  mass_recall += o.mass_recall;
  topk_recall += o.topk_recall;
  return *this;
}

void check_comparable(const Header& r, const Header& c) {
  const ModelInfo &a = r.model, &b = c.model;
  same("model.n_layers", a.n_layers, b.n_layers);
  same("model.n_q_heads", a.n_q_heads, b.n_q_heads);
  // A candidate may hold fewer KV heads (kv-merge -m heads): groups of the reference's heads.
  if (b.n_kv_heads < 1 || b.n_kv_heads > a.n_kv_heads || a.n_kv_heads % b.n_kv_heads)
    same("model.n_kv_heads", a.n_kv_heads, b.n_kv_heads);
  same("model.head_dim", a.head_dim, b.head_dim);
  same("model.rope_theta", a.rope_theta, b.rope_theta);
  same("model.rope_dims", a.rope_dims, b.rope_dims);
  same("model.rope_style", a.rope_style, b.rope_style);
  same("model.file_sha256", a.file_sha256, b.file_sha256);
  same("n_tokens", r.n_tokens, c.n_tokens);
  same("tokens", r.tokens, c.tokens);
  same("probe tokens", r.probe_tokens, c.probe_tokens);
  same("probe positions", r.probe_positions, c.probe_positions);
}

AttentionFidelity attention_fidelity(const Header& header, const Layer& ref_layer,
                                     const Layer& cand_layer, int topk) {
  if (!header.has_probe())
    throw Error(Exit::data,
                "attention metrics need probe queries, which the reference lacks (capture with "
                "kv-capture --probe P)");
  const ModelInfo& m = header.model;
  const int D = m.head_dim, Hq = m.n_q_heads, G = m.group_size();
  const int64_t P = int64_t(header.probe_tokens.size()), T = header.n_tokens;
  const std::vector<float> q = ref_layer.probe_q.to_f32();
  const std::vector<float> rk = ref_layer.k.to_f32(), rv = ref_layer.v.to_f32();
  const std::vector<float> ck = cand_layer.k.to_f32(), cv = cand_layer.v.to_f32();
  const int32_t* qpos = header.probe_positions.data();
  std::vector<AttentionFidelity> per_head(static_cast<size_t>(Hq));
#pragma omp parallel for schedule(dynamic)
  for (int j = 0; j < Hq; ++j) {
    const HeadView ref = head_view(ref_layer, j / G, rk, rv, D);
    // The candidate's own grouping: it may hold fewer KV heads (kv-merge -m heads).
    const int Gc = Hq / int(cand_layer.head_offsets.size() - 1);
    const HeadView cand = head_view(cand_layer, j / Gc, ck, cv, D);
    std::vector<float> w_ref(size_t(P * ref.n)), w_cand(size_t(P * cand.n));
    std::vector<float> o_ref(size_t(P * D)), o_cand(size_t(P * D));
    const float* qj = q.data() + int64_t(j) * P * D;
    attention_weights(ref, qj, qpos, P, w_ref.data());
    attention_apply(ref, w_ref.data(), P, o_ref.data());
    attention_weights(cand, qj, qpos, P, w_cand.data());
    attention_apply(cand, w_cand.data(), P, o_cand.data());
    std::vector<char> held(static_cast<size_t>(T), 0);
    for (int64_t i = 0; i < cand.n; ++i)
      if (cand.positions[i] >= 0 && cand.positions[i] < T) held[size_t(cand.positions[i])] = 1;
    std::vector<int64_t> order(static_cast<size_t>(ref.n));
    AttentionFidelity& f = per_head[size_t(j)];
    for (int64_t i = 0; i < P; ++i) {
      const float *a = o_cand.data() + i * D, *b = o_ref.data() + i * D;
      double diff = 0, na = 0, nb = 0, dot = 0;
      for (int d = 0; d < D; ++d) {
        diff += (double(a[d]) - b[d]) * (double(a[d]) - b[d]);
        na += double(a[d]) * a[d];
        nb += double(b[d]) * b[d];
        dot += double(a[d]) * b[d];
      }
      f.rel_error += nb > 0 ? std::sqrt(diff / nb) : (na > 0 ? 1.0 : 0.0);
      f.cosine += na > 0 && nb > 0 ? dot / std::sqrt(na * nb) : (na == nb ? 1.0 : 0.0);
      const float* wr = w_ref.data() + i * ref.n;
      double recall = 0;
      for (int64_t e = 0; e < ref.n; ++e)
        if (held[size_t(ref.positions[e])]) recall += wr[e];
      f.mass_recall += recall;
      // Top-k of the reference attention among the entries this query sees.
      const int64_t visible =
          std::upper_bound(ref.positions, ref.positions + ref.n, qpos[i]) - ref.positions;
      const int64_t k = std::min<int64_t>(topk, visible);
      if (k > 0) {
        std::iota(order.begin(), order.begin() + visible, 0);
        std::partial_sort(order.begin(), order.begin() + k, order.begin() + visible,
                          [&](int64_t x, int64_t y) { return wr[x] > wr[y]; });
        int64_t hit = 0;
        for (int64_t e = 0; e < k; ++e) hit += held[size_t(ref.positions[order[size_t(e)]])];
        f.topk_recall += double(hit) / double(k);
      } else {
        f.topk_recall += 1.0;
      }
      ++f.rows;
    }
  }
  AttentionFidelity total;
  for (const auto& f : per_head) total += f;
  return total;
}

std::vector<float> probe_logits(const Model& model, const Header& header,
                                const std::vector<Layer>& layers) {
  if (!header.has_probe())
    throw Error(Exit::data,
                "model metrics need probe tokens, which the reference lacks (capture with "
                "kv-capture --probe P)");
  const int64_t P = int64_t(header.probe_tokens.size());
  Session session(model, header.n_tokens + P);
  session.load(header, layers);
  std::vector<float> logits;
  session.forward(header.probe_tokens.data(), P, logits, true);
  return logits;
}

void check_model_reproduces_capture(const Header& reference, const std::vector<float>& logits) {
  const Tensor& stored = reference.probe_logits;
  if (stored.size() == 0 || reference.probe_tokens.empty()) return;
  const int64_t vocab = stored.cols();
  if (stored.size() != logits.size())
    throw Error(Exit::data, str("the model gives ", logits.size(),
                                " probe logits where the "
                                "reference stores ",
                                stored.size(),
                                ": not the model it was "
                                "captured with"));
  // The caches hold keys and values rounded to their stored type (f16 by default), so the
  // runtime's logits after them differ a little from the capture's own (kModelCheckKl).
  const ModelFidelity f = compare_logits(stored.to_f32(), logits, vocab, reference.probe_tokens);
  if (!(f.kl <= kModelCheckKl))
    throw Error(Exit::data, str("the model does not reproduce the reference's captured probe "
                                "logits (KL ",
                                f.kl, " from them, top-1 agreement ", f.top1_agreement,
                                "): not the model the caches came from?"));
}

ModelFidelity compare_logits(const std::vector<float>& ref, const std::vector<float>& cand,
                             int64_t vocab, const std::vector<int32_t>& probe_tokens) {
  const int64_t P = int64_t(probe_tokens.size());
  if (int64_t(ref.size()) != P * vocab || int64_t(cand.size()) != P * vocab)
    throw Error(Exit::software, "logit tables do not match the probe");
  ModelFidelity f;
  std::vector<double> lr, lc;
  double nll_ref = 0, nll_cand = 0, kl = 0;
  int64_t agree = 0;
  for (int64_t i = 0; i < P; ++i) {
    const float *r = ref.data() + i * vocab, *c = cand.data() + i * vocab;
    log_softmax(r, vocab, lr);
    log_softmax(c, vocab, lc);
    double row_kl = 0;
    for (int64_t t = 0; t < vocab; ++t)
      row_kl += std::exp(lr[size_t(t)]) * (lr[size_t(t)] - lc[size_t(t)]);
    kl += std::max(0.0, row_kl);
    agree += std::max_element(r, r + vocab) - r == std::max_element(c, c + vocab) - c;
    if (i + 1 < P) {  // row i predicts probe token i + 1
      nll_ref -= lr[size_t(probe_tokens[size_t(i + 1)])];
      nll_cand -= lc[size_t(probe_tokens[size_t(i + 1)])];
    }
  }
  f.tokens = P;
  f.kl = P ? kl / double(P) : 0;
  f.top1_agreement = P ? double(agree) / double(P) : 0;
  f.ppl_reference = P > 1 ? std::exp(nll_ref / double(P - 1)) : 0;
  f.ppl_candidate = P > 1 ? std::exp(nll_cand / double(P - 1)) : 0;
  return f;
}

namespace {

// The CUDA form: each layer's heads padded to its longest head, padding masked by the bias.
double decode_step_seconds_cuda(const ModelInfo& m, const std::vector<Layer>& layers,
                                const std::vector<float>& queries, int reps) {
  const int D = m.head_dim, H = m.n_kv_heads;
  if (!kvk::cuda::attend_supported(D, m.group_size()))
    throw Error(Exit::unavailable,
                str("CUDA decode attention handles head_dim 32, 64, 128 or 256 and groups of 1, "
                    "2, 4 or 8 query heads; this model has head_dim ",
                    D, " and groups of ", m.group_size(), " (use --device cpu)"));
  const DType type = layers.empty() ? DType::f16 : layers[0].k.dtype();
  const size_t row = kvk::dtype_size(type) * size_t(D);
  std::vector<std::vector<std::byte>> k(layers.size()), v(layers.size());
  std::vector<std::vector<float>> bias(layers.size());
  std::vector<kvk::cuda::HostLayer> host(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& layer = layers[l];
    if (layer.k.dtype() != type || layer.v.dtype() != type)
      throw Error(Exit::data, "decode timing needs keys and values of one type in every layer");
    int64_t n = 1;
    for (int h = 0; h < H; ++h) n = std::max(n, layer.head_entries(h));
    k[l].assign(size_t(H) * size_t(n) * row, std::byte{0});
    v[l].assign(k[l].size(), std::byte{0});
    bias[l].assign(size_t(H) * size_t(n), -INFINITY);
    for (int h = 0; h < H; ++h) {
      const int64_t begin = layer.head_offsets[size_t(h)], count = layer.head_entries(h);
      const auto* ks = static_cast<const std::byte*>(layer.k.data()) + size_t(begin) * row;
      const auto* vs = static_cast<const std::byte*>(layer.v.data()) + size_t(begin) * row;
      std::memcpy(&k[l][size_t(h) * size_t(n) * row], ks, size_t(count) * row);
      std::memcpy(&v[l][size_t(h) * size_t(n) * row], vs, size_t(count) * row);
      for (int64_t j = 0; j < count; ++j)
        bias[l][size_t(h) * size_t(n) + size_t(j)] =
            layer.mass.empty() ? 0.0f : std::log(layer.mass[size_t(begin + j)]);
    }
    host[l] = {k[l].data(), v[l].data(), n, bias[l].data()};
  }
  const double ms = kvk::cuda::decode_step_ms(type, host, H, D, m.group_size(),
                                              1.0f / std::sqrt(float(D)), queries.data(), reps);
  return ms / 1e3;
}

// The q4_0 blocks of a k or v kept as stored, when attention can run on them: rows of whole
// blocks (head_dim a multiple of 32), not rotated, on a CPU with the kernel's instructions
// (elsewhere the decoded values are faster). Null otherwise.
const uint8_t* q4_0_blocks(const std::shared_ptr<const Encoded>& stored, int head_dim) {
  if (!stored || stored->encoding.scheme != "q4_0" || stored->encoding.hadamard ||
      !kvk::q4_0_codes_supported(head_dim))
    return nullptr;
  for (const CodeArray& a : stored->arrays)
    if (a.name == "blocks") return a.bytes.data();
  return nullptr;
}

// The layer's heads as KIVI-2 views when its k and v are kept as stored KIVI-2 codes that the
// kernel runs on here (kv::kivi2_heads, kvk::kivi2_codes_supported); empty otherwise.
std::vector<kvk::Kivi2Head> kivi2_view(const ModelInfo& model, const Layer& layer) {
  if (!layer.k_stored || !layer.v_stored || !kvk::kivi2_codes_supported(model.head_dim)) return {};
  return kivi2_heads(*layer.k_stored, *layer.v_stored,
                     RowLayout{model, layer.head_offsets, layer.positions});
}

}  // namespace

std::string decodes_on_codes(const ModelInfo& model, const std::vector<Layer>& layers) {
  auto all = [&](auto on_codes) {
    return !layers.empty() && std::all_of(layers.begin(), layers.end(), on_codes);
  };
  if (all([&](const Layer& layer) {
        return q4_0_blocks(layer.k_stored, model.head_dim) &&
               q4_0_blocks(layer.v_stored, model.head_dim);
      }))
    return "q4_0";
  if (all([&](const Layer& layer) { return !kivi2_view(model, layer).empty(); })) return "kivi2";
  return "";
}

double decode_step_seconds(const ModelInfo& m, const std::vector<Layer>& layers,
                           const std::vector<float>& queries, int reps, bool cuda) {
  if (cuda) return decode_step_seconds_cuda(m, layers, queries, reps);
  const int D = m.head_dim, Hkv = m.n_kv_heads, G = m.group_size();
  const float scale = 1.0f / std::sqrt(float(D));
  std::vector<std::vector<float>> log_mass(layers.size());
  for (size_t l = 0; l < layers.size(); ++l)
    for (float x : layers[l].mass) log_mass[l].push_back(std::log(x));
  for (const Layer& layer : layers)
    if (layer.k.dtype() != layer.v.dtype())
      throw Error(Exit::data, "decode timing needs keys and values of one type");
  // Which codes each layer is timed on, found once: outside the timed steps.
  std::vector<std::vector<kvk::Kivi2Head>> kivi2_heads_of(layers.size());
  std::vector<std::pair<const uint8_t*, const uint8_t*>> q4_0_of(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    kivi2_heads_of[l] = kivi2_view(m, layers[l]);
    q4_0_of[l] = {q4_0_blocks(layers[l].k_stored, D), q4_0_blocks(layers[l].v_stored, D)};
  }
  const size_t code_row = kvk::q4_0_row_bytes(D);
  std::vector<float> out(queries.size());
  double best = INFINITY;
  for (int r = 0; r < std::max(reps, 1); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& layer = layers[l];
      const size_t ks = kvk::dtype_size(layer.k.dtype()) * size_t(D);
      // (Plain variables: clang refuses structured bindings inside the OpenMP region.)
      const uint8_t *k_codes = q4_0_of[l].first, *v_codes = q4_0_of[l].second;
      const std::vector<kvk::Kivi2Head>& kivi2 = kivi2_heads_of[l];
#pragma omp parallel for schedule(static)
      for (int h = 0; h < Hkv; ++h) {
        const int64_t begin = layer.head_offsets[size_t(h)];
        const size_t q0 = (l * size_t(m.n_q_heads) + size_t(h) * size_t(G)) * size_t(D);
        const float* bias = log_mass[l].empty() ? nullptr : log_mass[l].data() + begin;
        if (!kivi2.empty())
          kvk::attend_head_kivi2(kivi2[size_t(h)], D, &queries[q0], G, scale, bias, &out[q0]);
        else if (k_codes && v_codes)
          kvk::attend_head_q4_0(k_codes + size_t(begin) * code_row,
                                v_codes + size_t(begin) * code_row, layer.head_entries(h), D,
                                &queries[q0], G, scale, bias, &out[q0]);
        else
          kvk::attend_head(layer.k.dtype(),
                           static_cast<const std::byte*>(layer.k.data()) + size_t(begin) * ks,
                           static_cast<const std::byte*>(layer.v.data()) + size_t(begin) * ks,
                           layer.head_entries(h), D, &queries[q0], G, scale, bias, &out[q0]);
      }
    }
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

std::vector<int32_t> generate_after(const Model& model, const Header& header,
                                    const std::vector<Layer>& layers,
                                    const std::vector<int32_t>& cue, int64_t steps) {
  if (cue.empty()) throw Error(Exit::software, "generate_after needs a cue");
  Session session(model, header.n_tokens + int64_t(cue.size()) + steps);
  session.load(header, layers);
  std::vector<float> logits;
  session.forward(cue.data(), int64_t(cue.size()), logits, false);
  return continue_greedy(model, session, logits, steps);
}

std::vector<RecallItem> recall_items(const Tokenizer& tokenizer, const std::vector<int32_t>& prompt,
                                     int max_items) {
  const int64_t T = int64_t(prompt.size()), span = kRecallCue + kRecallTarget;
  auto occurrences = [&](int64_t at) {
    int64_t n = 0;
    for (int64_t p = 0; p + kRecallCue <= T; ++p)
      n += std::equal(prompt.begin() + p, prompt.begin() + p + kRecallCue, prompt.begin() + at);
    return n;
  };
  std::vector<int64_t> starts;
  for (int64_t s = 1; s < T / 2 && s + span <= T; ++s) {
    const std::string prev =
        tokenizer.decode(s >= 2 ? prompt[size_t(s - 2)] : -1, prompt[size_t(s - 1)]);
    const bool boundary =
        !prev.empty() && std::string(".!?\n").find(prev.back()) != std::string::npos;
    if (boundary && occurrences(s) == 1) starts.push_back(s);
  }
  std::vector<RecallItem> items;
  const size_t n = std::min(starts.size(), size_t(std::max(0, max_items)));
  for (size_t i = 0; i < n; ++i) {
    const int64_t s = starts[i * starts.size() / n];
    RecallItem item;
    item.start = s;
    item.cue.assign(prompt.begin() + s, prompt.begin() + s + kRecallCue);
    item.target.assign(prompt.begin() + s + kRecallCue, prompt.begin() + s + span);
    items.push_back(std::move(item));
  }
  return items;
}

double recall_rate(const Model& model, const Header& header, const std::vector<Layer>& layers,
                   const std::vector<RecallItem>& items) {
  if (items.empty()) return 0;
  int64_t hits = 0;
  for (const RecallItem& item : items)
    hits +=
        generate_after(model, header, layers, item.cue, int64_t(item.target.size())) == item.target;
  return double(hits) / double(items.size());
}

}  // namespace kv
