// From a model and a token sequence to a snapshot: runs the prompt, records the KV cache and the
// side data strategies and evaluation need (observation window, attention statistics, probe).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kv/model.h"
#include "kv/snapshot.h"

namespace kv {

struct CaptureOptions {
  DType dtype = DType::f16;  // storage type of k and v
  int window = 0;            // post-RoPE queries of the last W prompt tokens
  bool attn_stats = false;   // attention received per key: summed (H2O) and last query (TOVA)
  bool probe_logits = true;  // store the reference logits of the probe
  std::function<void(int64_t done, int64_t total)> progress;  // prompt tokens processed
};

// Captures `prompt` (its first token is usually BOS). `probe` tokens, if any, are teacher-forced
// after the prompt with the full cache; their queries and next-token logits are stored (row i:
// the distribution after input probe[i], at position prompt.size() + i), while the snapshot's
// cache holds the prompt only. Throws Error(64) for an empty prompt, a window longer than the
// prompt, or a sequence past the model's context.
Snapshot capture(const Model& model, const std::vector<int32_t>& prompt,
                 const std::vector<int32_t>& probe, const std::string& text,
                 const CaptureOptions& options);

// Greedy continuation: the prompt then `steps` generated tokens (stops early at EOS).
std::vector<int32_t> generate_greedy(const Model& model, const std::vector<int32_t>& prompt,
                                     int64_t steps);

// Greedy decoding from a session whose last forward() left next-token `logits` ([vocab]): up to
// `steps` tokens, stopping after EOS or when the session is full.
std::vector<int32_t> continue_greedy(const Model& model, Session& session,
                                     std::vector<float>& logits, int64_t steps);

// Teacher-forced perplexity over documents (each already starting with BOS): exp of the mean
// negative log-likelihood of every token after the first. `n_scored` gets the token count.
double perplexity(const Model& model, const std::vector<std::vector<int32_t>>& docs,
                  int64_t* n_scored);

// log softmax(logits)[target] for one row of `vocab` logits.
double log_prob(const float* logits, int64_t vocab, int32_t target);

}  // namespace kv
