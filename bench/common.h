// Pieces every benchmark shares: a monotonic clock and the machine's memory read bandwidth,
// measured in the same run so figures can be given as a fraction of it (DESIGN.md section 7).
#pragma once
#include <chrono>

#include "kvk/ops.h"

namespace kvbench {

inline double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The memory read bandwidth (kvk::stream_read_gbps, shared with kv-eval --speed).
using kvk::stream_read_gbps;

}  // namespace kvbench
