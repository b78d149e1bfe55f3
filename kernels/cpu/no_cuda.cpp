// Linked instead of kernels/cuda when kvtk is built without CUDA.
#include "kvk/ops.h"

namespace kvk {
const Ops* cuda_ops(std::string* why) {
  if (why) *why = "kvtk was built without CUDA (configure with nvcc available and -DKV_CUDA=ON)";
  return nullptr;
}
}  // namespace kvk
