// Seeded synthetic snapshots with the structure real caches have, for shapes the bundled model
// lacks: a few large-magnitude key channels (in low-frequency RoPE pairs, as KIVI/KVQuant report),
// an attention sink at position 0 (a key aligned with the queries, a near-zero value), smooth
// RoPE rotation of keys and window queries. Output depends only on the spec, not on threads.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kv/rope.h"
#include "kv/snapshot.h"

namespace kv {

struct SynthSpec {
  ModelInfo model;
  int64_t n_tokens = 256;
  DType dtype = DType::f16;
  uint64_t seed = 1;
  int window = 0;  // observation-window queries to store (0: none)
  // Attention statistics computed from the window queries (needs window > 0): attn_last is the
  // last window query's attention, attn_acc the sum over the window queries (a real capture sums
  // over all later prompt queries; the window is the part of it a synthetic cache can afford).
  bool attn_stats = false;
  int probe = 0;            // probe queries at positions T..T+P-1 (random probe tokens; no logits)
  int outlier_pairs = 2;    // RoPE pairs per head with large-magnitude keys
  float outlier_scale = 8;  // their mean magnitude, relative to unit noise
  int vocab = 32000;        // token ids are drawn below this
};

// The most probe queries a Synthesizer takes.
inline constexpr int kSynthMaxProbe = 65536;

// Model shapes by name: "tiny", "stories260k", "llama2-7b", "llama3-8b", "mistral-7b".
// Throws Error(Exit::usage) for an unknown name.
ModelInfo model_preset(const std::string& name);
std::string model_preset_names();

class Synthesizer {
 public:
  explicit Synthesizer(const SynthSpec& spec);  // validates (Exit::usage)
  const Header& header() const { return header_; }
  void layer(int l, Layer& out) const;

 private:
  void window_attention_stats(const std::vector<float>& q, const std::vector<float>& k,
                              Layer& out) const;
  SynthSpec spec_;
  Header header_;
  std::unique_ptr<RopeTable> rope_;
};

Snapshot synth_snapshot(const SynthSpec& spec);

}  // namespace kv
