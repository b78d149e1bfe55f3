// CUDA backend: the same ops as kernels/cpu, checked against them by tests/unit/test_backend_parity.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "kvk/cuda.h"
#include "kvk/ops.h"

namespace kvk {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

__global__ void to_f32_kernel(DType from, const void* src, float* dst, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    if (from == DType::f16)
      dst[i] = __half2float(static_cast<const __half*>(src)[i]);
    else if (from == DType::bf16)
      dst[i] = __bfloat162float(static_cast<const __nv_bfloat16*>(src)[i]);
    else
      dst[i] = static_cast<const float*>(src)[i];
  }
}

__global__ void from_f32_kernel(DType to, const float* src, void* dst, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    if (to == DType::f16)
      static_cast<__half*>(dst)[i] = __float2half_rn(src[i]);
    else if (to == DType::bf16)
      static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(src[i]);
    else
      static_cast<float*>(dst)[i] = src[i];
  }
}

// Host-pointer entry points: copy in, convert on the device, copy out. Real pipelines keep data
// resident; these exist so every op has a host-callable form the parity tests can compare.
void cuda_to_f32(DType from, const void* src, float* dst, size_t n) {
  if (n == 0) return;
  void* d_src = nullptr;
  float* d_dst = nullptr;
  check(cudaMalloc(&d_src, n * dtype_size(from)), "cudaMalloc");
  check(cudaMalloc(&d_dst, n * 4), "cudaMalloc");
  check(cudaMemcpy(d_src, src, n * dtype_size(from), cudaMemcpyHostToDevice), "cudaMemcpy");
  to_f32_kernel<<<1024, 256>>>(from, d_src, d_dst, n);
  check(cudaGetLastError(), "to_f32 kernel");
  check(cudaMemcpy(dst, d_dst, n * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(d_src);
  cudaFree(d_dst);
}

void cuda_from_f32(DType to, const float* src, void* dst, size_t n) {
  if (n == 0) return;
  float* d_src = nullptr;
  void* d_dst = nullptr;
  check(cudaMalloc(&d_src, n * 4), "cudaMalloc");
  check(cudaMalloc(&d_dst, n * dtype_size(to)), "cudaMalloc");
  check(cudaMemcpy(d_src, src, n * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  from_f32_kernel<<<1024, 256>>>(to, d_src, d_dst, n);
  check(cudaGetLastError(), "from_f32 kernel");
  check(cudaMemcpy(dst, d_dst, n * dtype_size(to), cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(d_src);
  cudaFree(d_dst);
}

}  // namespace

const Ops* cuda_ops(std::string* why) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    // Without a driver this reports "CUDA driver version is insufficient...": say what it means.
    if (why)
      *why = std::string("no usable GPU (") +
             (e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA devices") + ")";
    return nullptr;
  }
  static const Ops ops{"cuda", cuda_to_f32, cuda_from_f32, cuda::attend_head_host};
  return &ops;
}

}  // namespace kvk
