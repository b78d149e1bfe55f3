// bench-decode-attention: one decode step of attention over a whole 8B-shaped cache (llama3-8b:
// 32 layers, 32 query heads, 8 KV heads, head_dim 128) held dense in f16, at 8k and 32k tokens,
// on the CPU with OpenMP over KV heads. A decode step must read every byte of K and V once, so
// its limit is bytes / memory bandwidth: the figure is the achieved GB/s as a fraction of a
// STREAM-like read measured in the same run (target >= 0.7, kv-eval issue).
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "kvk/ops.h"

namespace {

constexpr int kLayers = 32, kQHeads = 32, kKvHeads = 8, kDim = 128, kGroup = kQHeads / kKvHeads;

// Cheap deterministic f16 values in about [-2, 2): what matters here is the bytes, not them.
void fill_f16(std::vector<uint16_t>& a, uint64_t seed) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < a.size(); ++i) {
    uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
    x ^= x >> 29;
    a[i] = kvk::f32_to_f16(float(int64_t(x % 4096) - 2048) / 1024.0f);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> token_counts = {8192, 32768};
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc)
      token_counts = {std::atoll(argv[++i])};
    else if (a == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench-decode-attention [--tokens T] [--reps N]\n");
      return 64;
    }
  }
  const int threads = omp_get_max_threads();
  const double bw = kvbench::stream_read_gbps(size_t(1) << 30, threads, 5);
  std::printf(
      "bench-decode-attention: llama3-8b shape (32 layers, 32/8 heads, head_dim 128), f16 "
      "K and V, %d threads\n  memory read bandwidth (STREAM-like sum, 1 GiB): %.1f GB/s\n",
      threads, bw);
  std::printf("  %8s %10s %10s %10s %8s\n", "tokens", "KV bytes", "step ms", "GB/s", "of bw");
  for (int64_t T : token_counts) {
    const size_t per_head = size_t(T) * kDim;
    // Every layer and head in its own allocation, as a cache would be, and all of it larger
    // than the caches, so each step streams from memory.
    std::vector<std::vector<uint16_t>> K(kLayers * kKvHeads), V(kLayers * kKvHeads);
    for (size_t i = 0; i < K.size(); ++i) {
      K[i].resize(per_head);
      V[i].resize(per_head);
      fill_f16(K[i], 2 * i + 1);
      fill_f16(V[i], 2 * i + 2);
    }
    std::vector<float> q(size_t(kLayers) * kQHeads * kDim), out(q.size());
    for (size_t i = 0; i < q.size(); ++i) q[i] = float(int(i % 17) - 8) / 8.0f;
    const float scale = 1.0f / std::sqrt(float(kDim));
    double best = 1e30;
    for (int r = 0; r <= reps; ++r) {  // the first step is a warm-up
      const double t0 = kvbench::now();
      for (int l = 0; l < kLayers; ++l) {
#pragma omp parallel for schedule(static)
        for (int h = 0; h < kKvHeads; ++h) {
          const size_t head = size_t(l) * kKvHeads + size_t(h);
          const size_t qrow = (size_t(l) * kQHeads + size_t(h) * kGroup) * kDim;
          kvk::attend_head(kvk::DType::f16, K[head].data(), V[head].data(), T, kDim, &q[qrow],
                           kGroup, scale, nullptr, &out[qrow]);
        }
      }
      if (r > 0) best = std::min(best, kvbench::now() - t0);
    }
    const double bytes = 2.0 * double(kLayers) * kKvHeads * double(per_head) * 2;
    double check = 0;
    for (float x : out) check += std::abs(x);
    std::printf("  %8lld %8.2f GiB %10.1f %10.1f %7.0f%%   (checksum %.3f)\n", (long long)T,
                bytes / double(1 << 30), best * 1e3, bytes / best / 1e9,
                100.0 * bytes / best / 1e9 / bw, check);
  }
  return 0;
}
