// Device-resident CUDA entry points (built with CUDA only): for code that keeps data on the GPU,
// such as benchmarks. The host-pointer forms of every op are in the Ops table (kvk/ops.h).
#pragma once
#include <cstddef>
#include <cstdint>

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

}  // namespace kvk::cuda
