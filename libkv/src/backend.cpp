#include "kv/backend.h"

#include "kv/error.h"

namespace kv {

const kvk::Ops& select_backend(const std::string& device) {
  if (device == "cpu") return kvk::cpu_ops();
  if (device != "cuda" && device != "auto")
    throw Error(Exit::usage, "unknown device '" + device + "' (expected cpu, cuda or auto)");
  std::string why;
  const kvk::Ops* cuda = kvk::cuda_ops(&why);
  if (cuda) return *cuda;
  if (device == "auto") return kvk::cpu_ops();
  throw Error(Exit::unavailable, "--device cuda: " + why);
}

}  // namespace kv
