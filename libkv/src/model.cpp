#include "kv/model.h"

#include <fcntl.h>
#include <omp.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kv/error.h"
#include "kv/rope.h"
#include "kv/sha256.h"
#include "kv/str.h"
#include "kvk/ops.h"

namespace kv {

// ---------------------------------------------------------------------------------------------
// Weights

int64_t Weight::row_bytes() const {
  int64_t bv = 1, bb = 4;
  ggml_type_layout(type, &bv, &bb);
  return cols / bv * bb;
}

void Weight::rows_f32(int64_t r0, int64_t n, float* out) const {
  const uint8_t* src = data + r0 * row_bytes();
  if (type == GgmlType::F32)
    std::memcpy(out, src, size_t(n * cols) * 4);
  else
    dequantize(type, src, out, n * cols);
}

void linear(const float* X, int64_t B, const Weight& W, float* Y) {
  const int64_t N = W.rows, K = W.cols;
  // Row blocks of about 128 KiB of f32 weights (whole 16-row panels of the GEMM kernel):
  // dequantized once, reused for all B rows of X.
  const int64_t block = std::max<int64_t>(16, (int64_t(32768) / K) / 16 * 16);
  const int64_t n_blocks = (N + block - 1) / block;
  // Small products run on one thread: a fork/join costs more than they do, and on a loaded
  // machine a spinning barrier can wait a whole scheduler slice for a descheduled thread.
  const bool threaded = double(B) * double(K) * double(N) > double(1 << 20) && n_blocks > 1;
#pragma omp parallel if (threaded)
  {
    std::vector<float> buf(W.type == GgmlType::F32 ? 0 : size_t(block * K));
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const int64_t n0 = bi * block, nb = std::min(block, N - n0);
      const float* w;
      if (W.type == GgmlType::F32) {
        w = reinterpret_cast<const float*>(W.data) + n0 * K;
      } else {
        W.rows_f32(n0, nb, buf.data());
        w = buf.data();
      }
      kvk::gemm_nt(X, B, K, w, nb, Y + n0, N);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

[[noreturn]] void bad(const std::string& msg) {
  throw Error(Exit::data, msg);
}

std::string file_stem(const std::string& path) {
  std::string base = path.substr(path.find_last_of('/') + 1);
  return base.substr(0, base.find('.'));
}

// Maps a whole file read-only; throws Error(66) naming it.
void* map_file(const std::string& path, size_t* size) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(Exit::no_input, "cannot open '" + path + "': " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(Exit::no_input, "cannot open '" + path + "': not a regular file");
  }
  *size = size_t(st.st_size);
  void* p = *size ? ::mmap(nullptr, *size, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
  ::close(fd);
  if (*size && p == MAP_FAILED) throw Error(Exit::io, "cannot map '" + path + "': " + errno_text());
  return p;
}

Weight weight_from_gguf(const GgufFile& g, const std::string& name, int64_t rows, int64_t cols,
                        bool required = true) {
  const GgufTensor* t = g.find_tensor(name);
  if (!t) {
    if (!required) return Weight{};
    bad("'" + g.name() + "': tensor '" + name + "' is missing");
  }
  const int64_t want_rows = rows, got_rows = t->dims.size() > 1 ? t->dims[1] : 1;
  if (t->dims.size() > 2 || t->dims[0] != cols || got_rows != want_rows)
    bad(str("'", g.name(), "': tensor '", name, "' has shape [", t->dims[0], ", ", got_rows,
            "] (ggml order), expected [", cols, ", ", want_rows, "]"));
  int64_t bv, bb;
  if (!ggml_type_layout(t->type, &bv, &bb) ||
      (t->type != GgmlType::F32 && t->type != GgmlType::F16 && t->type != GgmlType::BF16 &&
       t->type != GgmlType::Q8_0 && t->type != GgmlType::Q4_0 && t->type != GgmlType::Q4_K &&
       t->type != GgmlType::Q6_K))
    bad("'" + g.name() + "': tensor '" + name + "' has type " + ggml_type_name(t->type) +
        ", which kvtk cannot dequantize (supported: f32, f16, bf16, q8_0, q4_0, q4_K, q6_K)");
  return Weight{t->type, t->data, rows, cols};
}

}  // namespace

Model::~Model() {
  if (map_) ::munmap(map_, map_size_);
}

const Tokenizer& Model::tokenizer() const {
  if (!tokenizer_ && !tokenizer_error_.empty())
    throw Error(Exit::data, tokenizer_error_ + "; pass token ids with --tokens FILE instead");
  if (!tokenizer_)
    throw Error(Exit::usage,
                "this model has no tokenizer: pass --tokenizer FILE (a llama2.c "
                "tokenizer.bin) or token ids with --tokens FILE");
  return *tokenizer_;
}

ModelInfo Model::info() const {
  ModelInfo m;
  m.arch = config_.arch;
  m.name = config_.name;
  m.file_sha256 = sha256_;
  m.n_layers = config_.n_layers;
  m.n_q_heads = config_.n_heads;
  m.n_kv_heads = config_.n_kv_heads;
  m.head_dim = config_.head_dim;
  m.context_length = config_.context;
  m.rope_theta = config_.rope_theta;
  m.rope_dims = config_.rope_dims;
  m.rope_style = "pairs";  // llama2.c and GGUF llama both rotate adjacent pairs
  return m;
}

std::unique_ptr<Model> Model::load(const std::string& path, const std::string& tokenizer_path) {
  std::unique_ptr<Model> m(new Model());
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(Exit::no_input, "cannot open '" + path + "': " + errno_text());
  char magic[4] = {};
  ssize_t got = ::read(fd, magic, 4);
  ::close(fd);
  if (got == 4 && std::memcmp(magic, "GGUF", 4) == 0)
    m->load_gguf(path);
  else
    m->load_llama2c(path, tokenizer_path);
  m->check_shapes();
  return m;
}

void Model::load_gguf(const std::string& path) {
  gguf_ = std::make_unique<GgufFile>(path);
  const GgufFile& g = *gguf_;
  const std::string where = "'" + path + "'";
  const std::string arch = g.has("general.architecture")
                               ? g.get("general.architecture").as_string("general.architecture")
                               : "";
  if (arch != "llama")
    bad(where + ": unsupported architecture '" + arch +
        "' (kvtk runs llama-family models: Llama 1/2/3, Mistral, TinyLlama, stories)");
  // A shape value: a 64-bit field in GGUF, an int here (2^32 + 5 layers must not become 5).
  auto geti = [&](const std::string& key, int64_t def, bool required) -> int {
    const std::string k = "llama." + key;
    if (!g.has(k)) {
      if (required) bad(where + ": missing metadata '" + k + "'");
      return int(def);
    }
    const int64_t v = g.get(k).as_int(k);
    if (v < 0 || v > (int64_t(1) << 24))
      bad(str(where, ": metadata '", k, "' is ", v, ", outside [0, 2^24]"));
    return int(v);
  };
  ModelConfig& c = config_;
  c.arch = "llama";
  // Converters often leave general.name as the architecture ("llama"); the file name says more.
  c.name = g.has("general.name") ? g.get("general.name").as_string("general.name") : "";
  if (c.name.empty() || c.name == arch) c.name = file_stem(path);
  c.n_layers = geti("block_count", 0, true);
  c.dim = geti("embedding_length", 0, true);
  c.hidden = geti("feed_forward_length", 0, true);
  c.n_heads = geti("attention.head_count", 0, true);
  c.n_kv_heads = geti("attention.head_count_kv", c.n_heads, false);
  c.context = geti("context_length", 0, true);
  if (c.n_heads <= 0 || c.dim <= 0 || c.dim % c.n_heads)
    bad(str(where, ": embedding_length ", c.dim, " is not a positive multiple of head_count ",
            c.n_heads));
  c.head_dim = c.dim / c.n_heads;
  c.rope_dims = geti("rope.dimension_count", c.head_dim, false);
  if (g.has("llama.rope.freq_base"))
    c.rope_theta = g.get("llama.rope.freq_base").as_float("llama.rope.freq_base");
  if (g.has("llama.attention.layer_norm_rms_epsilon"))
    c.norm_eps = float(g.get("llama.attention.layer_norm_rms_epsilon")
                           .as_float("llama.attention.layer_norm_rms_epsilon"));
  if (!(c.norm_eps > 0) || !std::isfinite(c.norm_eps) || !(c.rope_theta > 0) ||
      !std::isfinite(c.rope_theta))
    bad(str(where, ": layer_norm_rms_epsilon ", c.norm_eps, " and rope.freq_base ", c.rope_theta,
            " must be finite and positive"));
  const GgufTensor* embd = g.find_tensor("token_embd.weight");
  if (!embd || embd->dims.size() != 2) bad(where + ": tensor 'token_embd.weight' is missing");
  c.vocab = int(embd->dims[1]);
  if (c.n_layers <= 0 || c.hidden <= 0 || c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads ||
      c.context <= 0)
    bad(str(where, ": inconsistent shape (block_count ", c.n_layers, ", feed_forward_length ",
            c.hidden, ", head_count ", c.n_heads, ", head_count_kv ", c.n_kv_heads,
            ", context_length ", c.context, ")"));
  const int64_t kv_dim = int64_t(c.n_kv_heads) * c.head_dim;
  token_embd_ = weight_from_gguf(g, "token_embd.weight", c.vocab, c.dim);
  output_norm_ = weight_from_gguf(g, "output_norm.weight", 1, c.dim);
  output_ = weight_from_gguf(g, "output.weight", c.vocab, c.dim, false);
  c.tied_output = output_.data == nullptr;
  if (c.tied_output) output_ = token_embd_;
  layers_.resize(size_t(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LayerWeights& w = layers_[size_t(l)];
    w.attn_norm = weight_from_gguf(g, p + "attn_norm.weight", 1, c.dim);
    w.wq = weight_from_gguf(g, p + "attn_q.weight", c.dim, c.dim);
    w.wk = weight_from_gguf(g, p + "attn_k.weight", kv_dim, c.dim);
    w.wv = weight_from_gguf(g, p + "attn_v.weight", kv_dim, c.dim);
    w.wo = weight_from_gguf(g, p + "attn_output.weight", c.dim, c.dim);
    w.ffn_norm = weight_from_gguf(g, p + "ffn_norm.weight", 1, c.dim);
    w.w_gate = weight_from_gguf(g, p + "ffn_gate.weight", c.hidden, c.dim);
    w.w_down = weight_from_gguf(g, p + "ffn_down.weight", c.dim, c.hidden);
    w.w_up = weight_from_gguf(g, p + "ffn_up.weight", c.hidden, c.dim);
  }
  format_ = "gguf v" + std::to_string(g.version());
  size_t size = 0;
  void* p = map_file(path, &size);
  sha256_ = sha256_hex(p, size);
  if (p) ::munmap(p, size);
  if (g.has("tokenizer.ggml.tokens")) {
    // A vocabulary kvtk cannot tokenize with (e.g. Llama 3's BPE "gpt2") does not stop the model
    // from running on token ids (--tokens); asking for the tokenizer reports it.
    try {
      tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_gguf(g));
    } catch (const Error& e) {
      tokenizer_error_ = e.what();
    }
  }
}

void Model::load_llama2c(const std::string& path, const std::string& tokenizer_path) {
  const std::string where = "'" + path + "'";
  map_ = map_file(path, &map_size_);
  const auto* base = static_cast<const uint8_t*>(map_);
  auto read_i32 = [&](size_t off) {
    int32_t v;
    std::memcpy(&v, base + off, 4);
    return v;
  };
  if (map_size_ < 28) bad(where + " is neither a GGUF file nor a llama2.c checkpoint (too short)");
  size_t header = 28, p0 = 0;
  bool shared = true;
  uint32_t magic;
  std::memcpy(&magic, base, 4);
  if (magic == 0x616b3432) {  // "ak42": llama2.c export v1+
    if (map_size_ < 256) bad(where + ": llama2.c v1 header is truncated");
    const int32_t version = read_i32(4);
    if (version != 1)
      bad(str(where, ": llama2.c export version ", version, " is not supported (v1 fp32 only)"));
    p0 = 8;
    header = 256;
    shared = base[8 + 7 * 4] != 0;
    format_ = "llama2.c v1";
  } else {
    format_ = "llama2.c legacy";
  }
  ModelConfig& c = config_;
  c.dim = read_i32(p0);
  c.hidden = read_i32(p0 + 4);
  c.n_layers = read_i32(p0 + 8);
  c.n_heads = read_i32(p0 + 12);
  c.n_kv_heads = read_i32(p0 + 16);
  int32_t vocab = read_i32(p0 + 20);
  c.context = read_i32(p0 + 24);
  if (format_ == "llama2.c legacy") {
    shared = vocab > 0;
    vocab = std::abs(vocab);
  }
  c.vocab = vocab;
  const bool sane = c.dim > 0 && c.hidden > 0 && c.n_layers > 0 && c.n_heads > 0 &&
                    c.n_kv_heads > 0 && c.vocab > 0 && c.context > 0 && c.dim % c.n_heads == 0 &&
                    c.n_heads % c.n_kv_heads == 0 && c.dim <= 65536 && c.hidden <= 1 << 20 &&
                    c.n_layers <= 1024 && c.vocab <= 1 << 22 && c.context <= 1 << 24;
  if (!sane)
    bad(where + " is neither a GGUF file nor a llama2.c checkpoint with a sane header (dim " +
        std::to_string(c.dim) + ", layers " + std::to_string(c.n_layers) + ", heads " +
        std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv_heads) + ")");
  c.head_dim = c.dim / c.n_heads;
  c.rope_dims = c.head_dim;
  c.name = file_stem(path);
  c.tied_output = shared;
  const int64_t D = c.dim, Hd = c.hidden, L = c.n_layers,
                kv_dim = int64_t(c.n_kv_heads) * c.head_dim;
  // Total floats the layout needs, checked before any pointer is formed.
  const int64_t per_layer = D + D * D + 2 * D * kv_dim + D * D + D + 3 * D * Hd;
  int64_t need = int64_t(c.vocab) * D + L * per_layer + D;
  if (format_ == "llama2.c legacy") need += int64_t(c.context) * c.head_dim;  // freq_cis_real/imag
  if (!shared) need += int64_t(c.vocab) * D;
  // Exactly: a header field changed (hidden_dim 1, 3 layers instead of 5) would otherwise read
  // a prefix of the weights as a smaller model.
  if (int64_t(map_size_) != int64_t(header) + need * 4)
    bad(str(where, ": llama2.c checkpoint is ", map_size_, " bytes where its header implies ",
            int64_t(header) + need * 4,
            int64_t(map_size_) < int64_t(header) + need * 4
                ? " (truncated)"
                : " (a header field is wrong, or bytes follow)"));
  const float* f = reinterpret_cast<const float*>(base + header);
  auto take = [&](int64_t rows, int64_t cols) {
    Weight w{GgmlType::F32, reinterpret_cast<const uint8_t*>(f), rows, cols};
    f += rows * cols;
    return w;
  };
  layers_.resize(size_t(L));
  auto each = [&](Weight LayerWeights::*member, int64_t rows, int64_t cols) {
    for (auto& lw : layers_) lw.*member = take(rows, cols);
  };
  if (format_ == "llama2.c legacy") {
    token_embd_ = take(c.vocab, D);
    each(&LayerWeights::attn_norm, 1, D);
    each(&LayerWeights::wq, D, D);
    each(&LayerWeights::wk, kv_dim, D);
    each(&LayerWeights::wv, kv_dim, D);
    each(&LayerWeights::wo, D, D);
    each(&LayerWeights::ffn_norm, 1, D);
    each(&LayerWeights::w_gate, Hd, D);
    each(&LayerWeights::w_down, D, Hd);
    each(&LayerWeights::w_up, Hd, D);
    output_norm_ = take(1, D);
    f += int64_t(c.context) * c.head_dim;  // freq_cis_real and freq_cis_imag: RoPE is computed
  } else {
    each(&LayerWeights::attn_norm, 1, D);
    each(&LayerWeights::ffn_norm, 1, D);
    output_norm_ = take(1, D);
    token_embd_ = take(c.vocab, D);
    each(&LayerWeights::wq, D, D);
    each(&LayerWeights::wk, kv_dim, D);
    each(&LayerWeights::wv, kv_dim, D);
    each(&LayerWeights::wo, D, D);
    each(&LayerWeights::w_gate, Hd, D);
    each(&LayerWeights::w_down, D, Hd);
    each(&LayerWeights::w_up, Hd, D);
  }
  output_ = shared ? token_embd_ : take(c.vocab, D);
  sha256_ = sha256_hex(map_, map_size_);
  if (!tokenizer_path.empty())
    tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_llama2c(tokenizer_path, c.vocab));
}

void Model::check_shapes() const {
  const ModelConfig& c = config_;
  if (c.rope_dims <= 0 || c.rope_dims > c.head_dim || c.rope_dims % 2)
    bad(str("'", c.name, "': rope dimension count ", c.rope_dims,
            " must be even and at most head_dim ", c.head_dim));
  if (tokenizer_ && tokenizer_->vocab_size() != c.vocab)
    bad(str("tokenizer has ", tokenizer_->vocab_size(), " tokens but the model's vocabulary is ",
            c.vocab));
}

// ---------------------------------------------------------------------------------------------
// Forward pass

namespace {

void rmsnorm(const float* x, const Weight& w, float eps, int64_t n, float* out) {
  const float* g = reinterpret_cast<const float*>(w.data);  // norms are f32 in every format we load
  std::vector<float> tmp;
  if (w.type != GgmlType::F32) {
    tmp.resize(size_t(n));
    w.rows_f32(0, 1, tmp.data());
    g = tmp.data();
  }
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float scale = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * g[i];
}

}  // namespace

Session::Session(const Model& model, int64_t capacity)
    : model_(model), c_(model.config()), capacity_(capacity) {
  if (capacity <= 0) throw Error(Exit::usage, "session capacity must be positive");
  const size_t per_layer = size_t(c_.n_kv_heads) * size_t(capacity) * size_t(c_.head_dim);
  k_.assign(size_t(c_.n_layers), std::vector<float>(per_layer));
  v_.assign(size_t(c_.n_layers), std::vector<float>(per_layer));
  queries.resize(size_t(c_.n_layers));
  attn_acc.assign(size_t(c_.n_layers), {});
  attn_last.assign(size_t(c_.n_layers), {});
  attn_outputs.assign(size_t(c_.n_layers), {});
  rope_ = std::make_unique<RopeTable>(c_.rope_dims, c_.rope_theta, capacity);
}

void Session::load(const Header& header, const std::vector<Layer>& layers) {
  const ModelInfo& m = header.model;
  if (m.n_layers != c_.n_layers || m.n_q_heads != c_.n_heads || m.n_kv_heads != c_.n_kv_heads ||
      m.head_dim != c_.head_dim || int64_t(layers.size()) != c_.n_layers)
    throw Error(Exit::data,
                str("the snapshot's model shape (", m.n_layers, " layers, ", m.n_q_heads, "/",
                    m.n_kv_heads, " heads, head_dim ", m.head_dim, ") is not this model's"));
  const int64_t T = header.n_tokens, D = c_.head_dim;
  if (T > capacity_)
    throw Error(Exit::usage,
                str("the snapshot's ", T, " tokens exceed the session's capacity ", capacity_));
  // Entries go to the slots of their positions. A position a head no longer holds is masked out
  // and a merged entry's logit gets + log(mass), through a per-slot bias that stays empty (no
  // cost) for full, unmerged caches.
  bias_.assign(size_t(c_.n_layers), {});
  for (int l = 0; l < c_.n_layers; ++l) {
    const Layer& layer = layers[size_t(l)];
    validate_layer(header, l, layer, false);
    const std::vector<float> k = layer.k.to_f32(), v = layer.v.to_f32();
    bool full = layer.mass.empty();
    for (int h = 0; full && h < c_.n_kv_heads; ++h) full = layer.head_entries(h) == T;
    if (!full) bias_[size_t(l)].assign(size_t(c_.n_kv_heads * capacity_), 0.0f);
    for (int h = 0; h < c_.n_kv_heads; ++h) {
      float* bias = full ? nullptr : &bias_[size_t(l)][size_t(h * capacity_)];
      if (bias) std::fill(bias, bias + T, -INFINITY);
      for (int64_t i = layer.head_offsets[size_t(h)]; i < layer.head_offsets[size_t(h) + 1]; ++i) {
        const int64_t pos = layer.positions[size_t(i)];
        if (pos < 0 || pos >= T)
          throw Error(Exit::data, str("layer ", l, " head ", h, ": position ", pos,
                                      " is outside [0, ", T, ")"));
        std::copy_n(&k[size_t(i * D)], D, &k_[size_t(l)][size_t((h * capacity_ + pos) * D)]);
        std::copy_n(&v[size_t(i * D)], D, &v_[size_t(l)][size_t((h * capacity_ + pos) * D)]);
        if (bias) bias[pos] = layer.mass.empty() ? 0.0f : std::log(layer.mass[size_t(i)]);
      }
    }
  }
  n_past_ = T;
}

const float* Session::key(int l, int h, int64_t pos) const {
  return &k_[size_t(l)][(size_t(h) * size_t(capacity_) + size_t(pos)) * size_t(c_.head_dim)];
}
const float* Session::value(int l, int h, int64_t pos) const {
  return &v_[size_t(l)][(size_t(h) * size_t(capacity_) + size_t(pos)) * size_t(c_.head_dim)];
}

void Session::forward(const int32_t* tokens, int64_t n, std::vector<float>& logits,
                      bool all_logits) {
  if (n_past_ + n > capacity_)
    throw Error(Exit::usage, str("sequence of ", n_past_ + n,
                                 " tokens exceeds the session's capacity ", capacity_));
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= c_.vocab)
      throw Error(Exit::data,
                  str("token id ", tokens[i], " is outside the vocabulary [0, ", c_.vocab, ")"));
  const int64_t D = c_.dim, Hd = c_.head_dim, Hq = c_.n_heads, Hkv = c_.n_kv_heads, G = Hq / Hkv;
  const int64_t kv_dim = Hkv * Hd, hidden = c_.hidden, V = c_.vocab;
  const float inv_sqrt = float(1.0 / std::sqrt(double(Hd)));
  const RopeTable& rope = *rope_;
  if (capture.attn_stats)
    for (int l = 0; l < c_.n_layers; ++l) {
      attn_acc[size_t(l)].resize(size_t(Hq * capacity_), 0.0f);
      attn_last[size_t(l)].resize(size_t(Hq * capacity_), 0.0f);
    }

  const int64_t batch = 64;
  logits.assign(size_t(all_logits ? n * V : V), 0.0f);
  std::vector<float> x, xb, q, k, v, att, hb, hb2, tmp;
  for (int64_t b0 = 0; b0 < n; b0 += batch) {
    const int64_t B = std::min(batch, n - b0), p0 = n_past_;
    x.resize(size_t(B * D));
    xb.resize(size_t(B * D));
    q.resize(size_t(B * D));
    k.resize(size_t(B * kv_dim));
    v.resize(size_t(B * kv_dim));
    att.resize(size_t(B * D));
    hb.resize(size_t(B * hidden));
    hb2.resize(size_t(B * hidden));
    for (int64_t t = 0; t < B; ++t)
      model_.token_embd().rows_f32(tokens[b0 + t], 1, &x[size_t(t * D)]);

    for (int l = 0; l < c_.n_layers; ++l) {
      const LayerWeights& w = model_.layer(l);
      for (int64_t t = 0; t < B; ++t)
        rmsnorm(&x[size_t(t * D)], w.attn_norm, c_.norm_eps, D, &xb[size_t(t * D)]);
      linear(xb.data(), B, w.wq, q.data());
      linear(xb.data(), B, w.wk, k.data());
      linear(xb.data(), B, w.wv, v.data());
      float* kc = k_[size_t(l)].data();
      float* vc = v_[size_t(l)].data();
      for (int64_t t = 0; t < B; ++t) {
        const int64_t pos = p0 + t;
        for (int64_t h = 0; h < Hq; ++h) rope.apply(&q[size_t(t * D + h * Hd)], pos, true);
        for (int64_t h = 0; h < Hkv; ++h) {
          float* kr = &k[size_t(t * kv_dim + h * Hd)];
          rope.apply(kr, pos, true);
          std::memcpy(&kc[size_t((h * capacity_ + pos) * Hd)], kr, size_t(Hd) * 4);
          std::memcpy(&vc[size_t((h * capacity_ + pos) * Hd)], &v[size_t(t * kv_dim + h * Hd)],
                      size_t(Hd) * 4);
        }
        if (pos >= capture.queries_from) {
          auto& rec = queries[size_t(l)];
          rec.insert(rec.end(), &q[size_t(t * D)], &q[size_t(t * D + D)]);
          if (l == 0) query_positions.push_back(int32_t(pos));
        }
      }
      // Causal attention; one thread per query head, so per-head statistics need no locks.
      float* acc = capture.attn_stats ? attn_acc[size_t(l)].data() : nullptr;
      float* last = capture.attn_stats ? attn_last[size_t(l)].data() : nullptr;
      const float* bias =
          bias_.empty() || bias_[size_t(l)].empty() ? nullptr : bias_[size_t(l)].data();
      const bool threaded = double(B) * double(p0 + B) * double(Hq * Hd) > double(1 << 20);
#pragma omp parallel for schedule(static) if (threaded)
      for (int64_t h = 0; h < Hq; ++h) {
        std::vector<float> score(size_t(p0 + B));
        const int64_t kvh = h / G;
        for (int64_t t = 0; t < B; ++t) {
          const int64_t pos = p0 + t;
          const float* qr = &q[size_t(t * D + h * Hd)];
          float mx = -INFINITY;
          for (int64_t j = 0; j <= pos; ++j) {
            const float* kr = &kc[size_t((kvh * capacity_ + j) * Hd)];
            float s = 0;
            for (int64_t d = 0; d < Hd; ++d) s += qr[d] * kr[d];
            score[size_t(j)] = s * inv_sqrt + (bias ? bias[kvh * capacity_ + j] : 0.0f);
            mx = std::max(mx, score[size_t(j)]);
          }
          double z = 0;
          for (int64_t j = 0; j <= pos; ++j)
            z += (score[size_t(j)] = std::exp(score[size_t(j)] - mx));
          const float inv_z = float(1.0 / z);
          float* out = &att[size_t(t * D + h * Hd)];
          std::fill(out, out + Hd, 0.0f);
          for (int64_t j = 0; j <= pos; ++j) {
            const float a = score[size_t(j)] * inv_z;
            const float* vr = &vc[size_t((kvh * capacity_ + j) * Hd)];
            for (int64_t d = 0; d < Hd; ++d) out[d] += a * vr[d];
            if (acc) acc[size_t(h * capacity_ + j)] += a;
          }
          if (last && t == B - 1) {
            float* row = &last[size_t(h * capacity_)];
            std::fill(row, row + capacity_, 0.0f);
            for (int64_t j = 0; j <= pos; ++j) row[j] = score[size_t(j)] * inv_z;
          }
        }
      }
      for (int64_t t = 0; t < B; ++t)
        if (p0 + t >= capture.queries_from)
          attn_outputs[size_t(l)].insert(attn_outputs[size_t(l)].end(), &att[size_t(t * D)],
                                         &att[size_t(t * D + D)]);
      tmp.resize(size_t(B * D));
      linear(att.data(), B, w.wo, tmp.data());
      for (size_t i = 0; i < tmp.size(); ++i) x[i] += tmp[i];
      for (int64_t t = 0; t < B; ++t)
        rmsnorm(&x[size_t(t * D)], w.ffn_norm, c_.norm_eps, D, &xb[size_t(t * D)]);
      linear(xb.data(), B, w.w_gate, hb.data());
      linear(xb.data(), B, w.w_up, hb2.data());
      for (size_t i = 0; i < hb.size(); ++i) {
        const float g = hb[i];
        hb[i] = g / (1.0f + std::exp(-g)) * hb2[i];  // SwiGLU: silu(gate) * up
      }
      linear(hb.data(), B, w.w_down, tmp.data());
      for (size_t i = 0; i < tmp.size(); ++i) x[i] += tmp[i];
    }
    n_past_ += B;
    if (on_progress) on_progress(b0 + B, n);
    // Logits: every row, or only the last token of the last batch.
    const int64_t first = all_logits ? 0 : B - 1;
    if (!all_logits && b0 + B < n) continue;
    for (int64_t t = first; t < B; ++t)
      rmsnorm(&x[size_t(t * D)], model_.output_norm(), c_.norm_eps, D, &xb[size_t(t * D)]);
    float* out = all_logits ? &logits[size_t(b0 * V)] : logits.data();
    linear(&xb[size_t(first * D)], B - first, model_.output(), out);
  }
}

}  // namespace kv
