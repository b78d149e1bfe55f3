// Chooses the kernel table for --device cpu|cuda|auto.
#pragma once
#include <string>

#include "kvk/ops.h"

namespace kv {

// "cpu": the CPU table. "cuda": the CUDA table, or Error(Exit::unavailable) saying why not.
// "auto": CUDA when usable, else CPU. Anything else: Error(Exit::usage).
const kvk::Ops& select_backend(const std::string& device);

}  // namespace kv
