// Random-weight Llama-shaped models written as GGUF by kvtk itself: benchmarks and tests need
// realistic shapes (e.g. dim 2048, 16 layers) that no bundled model has.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "kv/model.h"

namespace kv {

struct RandomModelSpec {
  ModelConfig config;               // arch, dims, heads, vocab, context, rope, eps
  GgmlType type = GgmlType::F16;    // matrices: F32 or F16 (norms are always F32)
  uint64_t seed = 1;
  float scale = 0.02f;              // standard deviation of the matrix weights
  // Tests of bad input: tensors whose ggml dims are replaced, and tensors to leave out.
  std::map<std::string, std::vector<int64_t>> dims_override;
  std::vector<std::string> omit;
};

// Writes the model (with a byte-level tokenizer of `config.vocab` >= 259 pieces) to `path`.
void write_random_gguf(const std::string& path, const RandomModelSpec& spec);

}  // namespace kv
