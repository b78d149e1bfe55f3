// bench-decode-attention-cuda: the CUDA decode attention (kvk::cuda::attend_heads) over a whole
// 8B-shaped f16 cache (llama3-8b: 32 layers x 8 KV heads, G = 4, head_dim 128) resident on the
// GPU, at 8k and 32k tokens, as a fraction of the device's read bandwidth measured in the same
// run by a plain streaming-read kernel. Built only with CUDA; run on a machine with a GPU.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kvk/cuda.h"

namespace {

constexpr int kLayers = 32, kKvHeads = 8, kGroup = 4, kDim = 128;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "bench-decode-attention-cuda: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(69);
  }
}

__global__ void fill_f16(__half* a, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    a[i] = __float2half(float(int(x % 4096) - 2048) / 1024.0f);
  }
}

template <class F>
float best_ms(F&& f, int reps) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  f();  // warm-up
  float best = 1e30f;
  for (int r = 0; r < reps; ++r) {
    cudaEventRecord(a);
    f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    best = std::min(best, ms);
  }
  check(cudaGetLastError(), "kernel");
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> tokens = {8192, 32768};
  if (argc == 3 && std::string(argv[1]) == "--tokens") tokens = {std::atoll(argv[2])};
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "no usable GPU");
  const double bw = kvk::cuda::read_gbps(size_t(4) << 30);  // a streaming read of 4 GiB
  std::printf(
      "bench-decode-attention-cuda: %s, llama3-8b shape, f16 K and V resident on the GPU\n"
      "  device read bandwidth (streaming read of 4 GiB): %.0f GB/s\n",
      prop.name, bw);
  std::printf("  %8s %10s %14s %10s %8s %16s\n", "tokens", "KV bytes", "step (1 launch)", "GB/s",
              "of bw", "per-layer launches");
  for (int64_t T : tokens) {
    const int H = kLayers * kKvHeads;
    const size_t elems = size_t(H) * size_t(T) * kDim;
    __half *k = nullptr, *v = nullptr;
    float *q = nullptr, *out = nullptr, *work = nullptr;
    check(cudaMalloc(&k, elems * 2), "cudaMalloc");
    check(cudaMalloc(&v, elems * 2), "cudaMalloc");
    check(cudaMalloc(&q, size_t(H) * kGroup * kDim * 4), "cudaMalloc");
    check(cudaMalloc(&out, size_t(H) * kGroup * kDim * 4), "cudaMalloc");
    check(cudaMalloc(&work, kvk::cuda::attend_workspace_bytes(H, T, kDim, kGroup)), "cudaMalloc");
    fill_f16<<<1024, 256>>>(k, elems, 1);
    fill_f16<<<1024, 256>>>(v, elems, 2);
    check(cudaMemset(q, 0, size_t(H) * kGroup * kDim * 4), "cudaMemset");
    const float scale = 1.0f / std::sqrt(float(kDim));
    // All layers in one launch (heads of all layers are independent for this timing), and the
    // way a runtime would call it: one launch per layer.
    const float one = best_ms(
        [&] {
          kvk::cuda::attend_heads(kvk::DType::f16, k, v, H, T, kDim, q, kGroup, scale, nullptr, out,
                                  work, nullptr);
        },
        20);
    const size_t layer_elems = size_t(kKvHeads) * size_t(T) * kDim;
    const float per_layer = best_ms(
        [&] {
          for (int l = 0; l < kLayers; ++l)
            kvk::cuda::attend_heads(kvk::DType::f16, k + l * layer_elems, v + l * layer_elems,
                                    kKvHeads, T, kDim, q + size_t(l) * kKvHeads * kGroup * kDim,
                                    kGroup, scale, nullptr,
                                    out + size_t(l) * kKvHeads * kGroup * kDim, work, nullptr);
        },
        20);
    const double bytes = 2.0 * double(elems) * 2;
    std::printf("  %8lld %8.2f GiB %11.3f ms %10.0f %7.0f%% %13.3f ms (%.0f%%)\n", (long long)T,
                bytes / double(1 << 30), one, bytes / (one * 1e-3) / 1e9,
                100.0 * bytes / (one * 1e-3) / 1e9 / bw, per_layer,
                100.0 * bytes / (per_layer * 1e-3) / 1e9 / bw);
    for (void* p : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q),
                    static_cast<void*>(out), static_cast<void*>(work)})
      cudaFree(p);
  }
  return 0;
}
