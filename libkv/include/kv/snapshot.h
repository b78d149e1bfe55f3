// The in-memory form of a kvsnap snapshot (formats/kvsnap.md is the normative spec).
// A snapshot is split in two: the Header (everything but per-layer arrays, small) and one Layer
// per transformer layer, so tools can stream a file holding about one layer in memory.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kv/encoding.h"
#include "kv/tensor.h"

namespace kv {

constexpr int kFormatMajor = 1;  // readers refuse files with any other major version
constexpr int kFormatMinor = 1;  // additions only: readers ignore what they do not know

struct ModelInfo {
  std::string arch = "llama";  // architecture family
  std::string name;            // e.g. "stories260K"
  std::string file_sha256;     // hash of the model file the cache came from ("" if synthetic)
  int n_layers = 0;
  int n_q_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int context_length = 0;
  double rope_theta = 10000.0;
  int rope_dims = 0;                 // leading dims of each head that RoPE rotates
  std::string rope_style = "pairs";  // "pairs": (x[2i], x[2i+1]); "halves": (x[i], x[i+d/2])
  std::string key_rope = "applied";  // keys are stored post-RoPE, as inference engines hold them

  int group_size() const { return n_kv_heads ? n_q_heads / n_kv_heads : 0; }
  bool operator==(const ModelInfo&) const = default;
};

// One provenance record, like a samtools @PG line: ids chain each record to the one before.
struct Provenance {
  std::string id;       // unique in the file: program name, ".N" appended on repeats
  std::string program;  // e.g. "kv-evict"
  std::string version;  // kvtk version
  std::string command_line;
  std::string time;      // UTC, ISO 8601
  std::string previous;  // id of the previous record, "" for the first
  bool operator==(const Provenance&) const = default;
};

struct Header {
  int format_major = kFormatMajor;
  int format_minor = kFormatMinor;
  ModelInfo model;
  int64_t n_tokens = 0;         // length of the original token sequence
  std::vector<int32_t> tokens;  // [n_tokens]
  std::string text;             // optional prompt text

  // Side data. Each present group implies per-layer arrays in every layer (see Layer).
  std::vector<int32_t> window_positions;  // observation window: positions of its W queries
  bool has_attn_stats = false;            // per-layer attn_acc / attn_last
  std::vector<int32_t> probe_tokens;      // continuation tokens for evaluation [P]
  std::vector<int32_t> probe_positions;   // their positions [P]
  Tensor probe_logits;                    // optional f32 [P, vocab] reference logits

  std::vector<Provenance> provenance;  // oldest first
  std::string history;                 // NCO-style, newest line first

  bool has_window() const { return !window_positions.empty(); }
  bool has_probe() const { return !probe_tokens.empty(); }
};

// One layer: per KV head, a ragged list of entries stored CSR-style.
struct Layer {
  std::vector<int32_t> positions;     // [N] original positions, increasing within each head
  std::vector<int64_t> head_offsets;  // [n_kv_heads + 1]: head h owns rows [off[h], off[h+1])
  Tensor k;                           // [N, head_dim]
  Tensor v;                           // [N, head_dim]
  std::vector<float> mass;  // [N] optional: tokens each entry stands for, > 0 (empty = all 1)
  // How k and v are stored. Readers decode an encoded k or v into f32 and keep its encoding here;
  // the writer encodes a k or v whose encoding is not dense (see encoding.h).
  Encoding k_encoding, v_encoding;
  // When set, written as they are instead of k and v (kv-offload's paged tensors).
  std::shared_ptr<const Encoded> k_stored, v_stored;

  Tensor window_q;   // [n_q_heads * W, head_dim] post-RoPE window queries, if the header has W
  Tensor attn_acc;   // [n_q_heads, n_tokens] attention received, summed over later queries
  Tensor attn_last;  // [n_q_heads, n_tokens] attention of the last prompt query
  Tensor probe_q;    // [n_q_heads * P, head_dim] post-RoPE probe queries

  int64_t entries() const { return int64_t(positions.size()); }
  int64_t head_entries(int h) const { return head_offsets[h + 1] - head_offsets[h]; }
};

// A whole snapshot in memory, for small caches and tests.
struct Snapshot {
  Header header;
  std::vector<Layer> layers;
};

// Checks the header's own consistency; throws Error(Exit::data) naming the problem.
void validate_header(const Header& h);
// Checks a layer against the header: shapes, offsets, positions, mass; `check_values` also
// rejects NaN/Inf in k and v and in the side data (check_side_values). Throws
// Error(Exit::data) "layer L: ...".
void validate_layer(const Header& h, int layer_index, const Layer& layer, bool check_values);
// Rejects NaN/Inf in a layer's side data (window_q, attn_acc, attn_last, probe_q): scores and
// kv-eval's metrics read them, and a NaN there would only bend the results without a word.
void check_side_values(int layer_index, const Layer& layer);

// Appends a provenance record for `program` run with argv, and the matching history line.
void append_provenance(Header& h, const std::string& program, int argc, const char* const* argv);
// Shell-quoted command line from argv, on one line: arguments with control characters (a
// newline) in bash's $'...' form.
std::string quote_command_line(int argc, const char* const* argv);

// Bytes the entries of a layer would take as dense f16 k and v (the reference for ratios).
inline int64_t dense_f16_bytes(int64_t entries, int head_dim) {
  return entries * head_dim * 2 * 2;
}

}  // namespace kv
