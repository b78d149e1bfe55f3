// Rotary position embedding, the one implementation in libkv (synthetic caches, the runtime,
// pre-RoPE key schemes all rotate through it).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kv {

class RopeTable {
 public:
  // Angles theta^(-2i/rope_dims) * pos for i < rope_dims/2 and pos < n_positions.
  RopeTable(int rope_dims, double theta, int64_t n_positions);
  // Rotates the first rope_dims values of x by the angles of `pos` (sign -1 undoes it).
  // "pairs" rotates (x[2i], x[2i+1]); "halves" rotates (x[i], x[i + rope_dims/2]).
  void apply(float* x, int64_t pos, bool pairs, int sign = 1) const;
  int64_t n_positions() const { return n_positions_; }

 private:
  int half_;
  int64_t n_positions_;
  std::vector<float> cos_, sin_;  // [n_positions][half]
};

}  // namespace kv
