// The model runtime: Llama-family weights from GGUF or llama2.c checkpoints, and a Session that
// runs them (batched prefill, one-token decode) over a KV cache that holds exactly what a
// snapshot stores: post-RoPE keys and values per KV head and position.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kv/gguf.h"
#include "kv/rope.h"
#include "kv/snapshot.h"
#include "kv/tokenizer.h"

namespace kv {

struct ModelConfig {
  std::string arch = "llama";
  std::string name;
  int dim = 0, hidden = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int vocab = 0, context = 0, rope_dims = 0;
  float norm_eps = 1e-5f;
  double rope_theta = 10000.0;
  bool tied_output = true;
};

// A weight matrix [rows = outputs, cols = inputs], row-major, in its stored type.
struct Weight {
  GgmlType type = GgmlType::F32;
  const uint8_t* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t row_bytes() const;
  // Rows [r0, r0 + n) as f32.
  void rows_f32(int64_t r0, int64_t n, float* out) const;
};

struct LayerWeights {
  Weight attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_down, w_up;
};

class Model {
 public:
  // Loads a GGUF file or a llama2.c checkpoint (told apart by their first bytes). A llama2.c
  // checkpoint needs `tokenizer_path` to tokenize text. Throws Error(66) if unreadable, (65) if
  // malformed or unsupported.
  static std::unique_ptr<Model> load(const std::string& path, const std::string& tokenizer_path = "");
  ~Model();

  const ModelConfig& config() const { return config_; }
  bool has_tokenizer() const { return tokenizer_ != nullptr; }
  const Tokenizer& tokenizer() const;  // Error(64) when the model has none
  const std::string& file_sha256() const { return sha256_; }
  const std::string& format() const { return format_; }  // "gguf v3", "llama2.c legacy", ...
  ModelInfo info() const;  // the snapshot's model description

  const Weight& token_embd() const { return token_embd_; }
  const LayerWeights& layer(int l) const { return layers_[size_t(l)]; }
  const Weight& output_norm() const { return output_norm_; }
  const Weight& output() const { return output_; }

 private:
  Model() = default;
  void load_gguf(const std::string& path);
  void load_llama2c(const std::string& path, const std::string& tokenizer_path);
  void check_shapes() const;

  ModelConfig config_;
  std::string sha256_, format_;
  std::unique_ptr<GgufFile> gguf_;
  void* map_ = nullptr;  // llama2.c mapping
  size_t map_size_ = 0;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::string tokenizer_error_;  // why a GGUF vocabulary could not be used
  Weight token_embd_, output_norm_, output_;
  std::vector<LayerWeights> layers_;
};

// Y[B, rows] = X[B, cols] W^T, dequantizing W in blocks of rows; OpenMP over row blocks.
void linear(const float* X, int64_t B, const Weight& W, float* Y);

// A KV cache and the forward pass over it.
class Session {
 public:
  Session(const Model& model, int64_t capacity);

  // Runs `n` tokens at positions n_past() .. n_past()+n-1 (in batches), appending their keys and
  // values. Writes next-token logits for every token (all_logits, [n, vocab]) or for the last
  // one only ([vocab]) into `logits` (resized).
  void forward(const int32_t* tokens, int64_t n, std::vector<float>& logits, bool all_logits);
  int64_t n_past() const { return n_past_; }

  // Replaces the cache with a snapshot's (any dense dtype); decoding then continues at position
  // n_tokens, appending dense entries. Evicted caches load too: positions a head no longer holds
  // are masked out of attention, and a merged entry's logit gets + log(mass). Error(65) when the
  // snapshot's model shape differs.
  void load(const Header& header, const std::vector<Layer>& layers);
  int64_t capacity() const { return capacity_; }

  // Post-RoPE key / value of (layer, KV head, position): head_dim floats.
  const float* key(int l, int h, int64_t pos) const;
  const float* value(int l, int h, int64_t pos) const;

  // What forward() records besides the cache.
  struct Capture {
    int64_t queries_from = INT64_MAX;  // record post-RoPE queries of positions >= this
    bool attn_stats = false;           // accumulate attention received per (layer, q head, key)
  } capture;
  // Called after each batch of forward() with the number of tokens of this call done so far.
  std::function<void(int64_t done, int64_t total)> on_progress;
  // Recorded queries: per layer, rows [position][q head][head_dim] in the order processed.
  std::vector<std::vector<float>> queries;
  std::vector<int32_t> query_positions;
  // Attention statistics, per layer [q head][capacity]: the sum over processed queries of the
  // attention each key received (H2O), and the attention row of the latest query (TOVA).
  std::vector<std::vector<float>> attn_acc, attn_last;
  // Attention outputs (before the output projection) of the same positions as `queries`.
  std::vector<std::vector<float>> attn_outputs;

 private:
  const Model& model_;
  const ModelConfig& c_;
  int64_t capacity_, n_past_ = 0;
  std::vector<std::vector<float>> k_, v_;  // per layer [kv head][capacity][head_dim]
  // Per layer [kv head][capacity] logit bias of a loaded sparse or merged cache: -inf for a
  // dropped position, log(mass) for a merged entry; empty for a full, unmerged layer.
  std::vector<std::vector<float>> bias_;
  std::unique_ptr<RopeTable> rope_;
};

}  // namespace kv
