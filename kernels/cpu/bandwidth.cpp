// The machine's memory read bandwidth, measured where it is needed (benchmarks, kv-eval --speed)
// so speeds can be reported as a fraction of it in the same run (DESIGN.md section 7).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <new>

#include "kvk/ops.h"

namespace kvk {

namespace {
volatile uint64_t g_sink;
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

double stream_read_gbps(size_t bytes, int threads, int reps) {
  const size_t n = std::max<size_t>(bytes / 8, 1);
  auto* a = static_cast<uint64_t*>(std::aligned_alloc(64, (n * 8 + 63) / 64 * 64));
  if (!a) throw std::bad_alloc();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (size_t i = 0; i < n; ++i) a[i] = i;
  double best = 1e30;
  for (int r = 0; r < std::max(reps, 1); ++r) {
    uint64_t s = 0;
    const double t0 = now();
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : s)
    for (size_t i = 0; i < n; ++i) s += a[i];
    best = std::min(best, now() - t0);
    g_sink = s;
  }
  std::free(a);
  return double(n * 8) / best / 1e9;
}

}  // namespace kvk
