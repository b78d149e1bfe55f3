#include "kv/model_synth.h"

#include <algorithm>
#include <cstring>

#include "kv/error.h"
#include "kv/str.h"
#include "kvk/ops.h"

namespace kv {

namespace {
uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

void write_random_gguf(const std::string& path, const RandomModelSpec& spec) {
  const ModelConfig& c = spec.config;
  if (spec.type != GgmlType::F32 && spec.type != GgmlType::F16)
    throw Error(Exit::usage, "random models are written as f32 or f16");
  if (c.vocab < 259) throw Error(Exit::usage, "random models need a vocabulary of at least 259");
  GgufWriter w;
  w.set_string("general.architecture", c.arch);
  w.set_string("general.name", c.name.empty() ? "random" : c.name);
  const std::string a = c.arch + ".";
  w.set_uint32(a + "block_count", uint32_t(c.n_layers));
  w.set_uint32(a + "embedding_length", uint32_t(c.dim));
  w.set_uint32(a + "feed_forward_length", uint32_t(c.hidden));
  w.set_uint32(a + "attention.head_count", uint32_t(c.n_heads));
  w.set_uint32(a + "attention.head_count_kv", uint32_t(c.n_kv_heads));
  w.set_uint32(a + "context_length", uint32_t(c.context));
  w.set_uint32(a + "rope.dimension_count", uint32_t(c.rope_dims ? c.rope_dims : c.dim / c.n_heads));
  w.set_float32(a + "rope.freq_base", float(c.rope_theta));
  w.set_float32(a + "attention.layer_norm_rms_epsilon", c.norm_eps);
  // Tokenizer: <unk>, <s>, </s>, the 256 byte tokens, then filler pieces.
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types = {2, 3, 3};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    pieces.push_back(buf);
    types.push_back(6);
  }
  while (int(pieces.size()) < c.vocab) {
    pieces.push_back("tok" + std::to_string(pieces.size()));
    types.push_back(1);
  }
  w.set_string("tokenizer.ggml.model", "llama");
  w.set_strings("tokenizer.ggml.tokens", pieces);
  w.set_float32s("tokenizer.ggml.scores", std::vector<float>(pieces.size(), 0.0f));
  w.set_int32s("tokenizer.ggml.token_type", types);
  w.set_uint32("tokenizer.ggml.bos_token_id", 1);
  w.set_uint32("tokenizer.ggml.eos_token_id", 2);

  uint64_t tensor_index = 0;
  auto add = [&](const std::string& name, int64_t cols, int64_t rows, bool norm) {
    ++tensor_index;
    if (std::find(spec.omit.begin(), spec.omit.end(), name) != spec.omit.end()) return;
    std::vector<int64_t> dims = rows > 1 || !norm ? std::vector<int64_t>{cols, rows} : std::vector<int64_t>{cols};
    if (auto it = spec.dims_override.find(name); it != spec.dims_override.end()) dims = it->second;
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    const GgmlType type = norm ? GgmlType::F32 : spec.type;
    std::vector<float> v(static_cast<size_t>(n));
    uint64_t s = mix(spec.seed ^ (tensor_index * 0x9e3779b97f4a7c15ull));
    for (int64_t i = 0; i < n; ++i) {
      if (norm) {
        v[size_t(i)] = 1.0f;
        continue;
      }
      uint64_t r = mix(s + uint64_t(i));
      // Sum of four uniforms: close enough to normal for weights.
      float u = float(r & 0xffff) + float((r >> 16) & 0xffff) + float((r >> 32) & 0xffff) + float(r >> 48);
      v[size_t(i)] = (u * (1.0f / 65536.0f) - 2.0f) * 1.7320508f * spec.scale;
    }
    if (type == GgmlType::F32) {
      w.add_tensor(name, dims, type, v.data(), v.size() * 4);
    } else {
      std::vector<uint16_t> h(v.size());
      kvk::cpu_ops().from_f32(kvk::DType::f16, v.data(), h.data(), v.size());
      w.add_tensor(name, dims, type, h.data(), h.size() * 2);
    }
  };
  const int64_t D = c.dim, kv_dim = int64_t(c.n_kv_heads) * (c.dim / c.n_heads);
  add("token_embd.weight", D, c.vocab, false);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    add(p + "attn_norm.weight", D, 1, true);
    add(p + "attn_q.weight", D, D, false);
    add(p + "attn_k.weight", D, kv_dim, false);
    add(p + "attn_v.weight", D, kv_dim, false);
    add(p + "attn_output.weight", D, D, false);
    add(p + "ffn_norm.weight", D, 1, true);
    add(p + "ffn_gate.weight", D, c.hidden, false);
    add(p + "ffn_down.weight", c.hidden, D, false);
    add(p + "ffn_up.weight", D, c.hidden, false);
  }
  add("output_norm.weight", D, 1, true);
  w.write(path);
}

}  // namespace kv
