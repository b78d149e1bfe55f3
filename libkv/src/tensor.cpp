#include "kv/tensor.h"

namespace kv {

std::vector<float> Tensor::to_f32(const kvk::Ops& ops) const {
  std::vector<float> out(size());
  if (!out.empty()) ops.to_f32(dtype_, data_.get(), out.data(), out.size());
  return out;
}

Tensor Tensor::from_f32(DType dtype, int64_t rows, int64_t cols, const float* values) {
  Tensor t(dtype, rows, cols);
  if (t.size()) kvk::cpu_ops().from_f32(dtype, values, t.data(), t.size());
  return t;
}

}  // namespace kv
