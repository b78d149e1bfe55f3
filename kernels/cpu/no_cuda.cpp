// Linked instead of kernels/cuda when kvtk is built without CUDA.
#include <stdexcept>

#include "kvk/cuda.h"
#include "kvk/ops.h"

namespace kvk {
const Ops* cuda_ops(std::string* why) {
  if (why) *why = "kvtk was built without CUDA (configure with nvcc available and -DKV_CUDA=ON)";
  return nullptr;
}
}  // namespace kvk

// Unreachable in a build without CUDA: callers select the backend first (cuda_ops is null).
namespace kvk::cuda {
double decode_step_ms(DType, const std::vector<HostLayer>&, int, int, int, float, const float*,
                      int) {
  throw std::runtime_error("kvtk was built without CUDA");
}
bool attend_supported(int, int) { return false; }
double read_gbps(size_t) { throw std::runtime_error("kvtk was built without CUDA"); }
}  // namespace kvk::cuda
