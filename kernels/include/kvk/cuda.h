// Device-resident CUDA entry points (built with CUDA only): for code that keeps data on the GPU,
// such as benchmarks. The host-pointer forms of every op are in the Ops table (kvk/ops.h).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvk/ops.h"

namespace kvk::cuda {

// Whether attend_heads handles this head_dim and group size (d in 32/64/128/256, G in 1/2/4/8).
bool attend_supported(int d, int G);
// Workspace attend_heads needs, in bytes (device memory).
size_t attend_workspace_bytes(int H, int64_t n, int d, int G);
// Decode attention of H KV heads at once, all pointers on the device: K and V [H][n][d] of
// `type`, q and out [H][G][d] f32, bias [H][n] or null. Asynchronous on `stream` (a
// cudaStream_t, null for the default stream).
void attend_heads(DType type, const void* k, const void* v, int H, int64_t n, int d, const float* q,
                  int G, float scale, const float* bias, float* out, float* workspace,
                  void* stream);
// Host pointers in and out (copies): the Ops table's attend_head for this backend.
void attend_head_host(DType type, const void* k, const void* v, int64_t n, int d, const float* q,
                      int G, float scale, const float* bias, float* out);

// One layer of a cache on the host, for timing: K and V [H][n][d] of one type (heads padded to
// a common n), bias [H][n] (-inf on padding, log(mass) on merged entries) or null.
struct HostLayer {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t n = 0;
  const float* bias = nullptr;
};

// Uploads the layers, then times decode steps (per layer one attend_heads over its H heads, the
// layers in sequence, as a runtime runs them), the step captured once as a CUDA graph and
// replayed; CUDA events, the best of `reps`, in ms.
// `q` is [layers][H * G][d] f32 on the host.
double decode_step_ms(DType type, const std::vector<HostLayer>& layers, int H, int d, int G,
                      float scale, const float* q, int reps);

// The device's read bandwidth in GB/s: a streaming read of `bytes`, best of 10.
double read_gbps(size_t bytes);

}  // namespace kvk::cuda
