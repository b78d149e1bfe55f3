// CUDA decode attention (flash-decoding): the sequence is split across blocks, each block's four
// warps walk its slice with an online softmax, and a second kernel merges the slices. A warp
// reads one K or V row per step, each lane a contiguous run of d/32 channels, so loads are
// coalesced; the group's G queries share every row read. Checked against the CPU kernel by
// tests/unit/test_backend_parity, timed by bench-decode-attention-cuda.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kvk/cuda.h"
#include "kvk/ops.h"

namespace kvk::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kUnroll = 4;  // rows a warp loads per step
// Keys per block: 512, or fewer (down to 64) until there are about 1024 blocks, so one layer's
// few heads still fill the GPU's 132 SMs several times over.
int64_t slice_size(int H, int64_t n) {
  int64_t slice = 512;
  while (slice > 64 && int64_t(H) * ((n + slice - 1) / slice) < 1024) slice /= 2;
  return slice;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

template <class T>
__device__ inline float to_float(T x);
template <>
__device__ inline float to_float<float>(float x) {
  return x;
}
template <>
__device__ inline float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Partial results of one (head, slice): m[G], l[G], acc[G][d], in the workspace.
template <class T, int CPL, int G>
__global__ void attend_slices(const T* __restrict__ k, const T* __restrict__ v, int64_t n,
                              int64_t slice, int d, const float* __restrict__ q, float scale,
                              const float* __restrict__ bias, float* __restrict__ work) {
  const int h = blockIdx.x, s = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j0 = s * slice, j1 = min(n, j0 + slice);
  const T* K = k + int64_t(h) * n * d;
  const T* V = v + int64_t(h) * n * d;
  const int c0 = lane * CPL;
  float qr[G][CPL], acc[G][CPL], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      qr[g][c] = q[(int64_t(h) * G + g) * d + c0 + c];
      acc[g][c] = 0;
    }
  }
  // kUnroll rows per warp step, all loaded before any is used: more loads in flight.
  for (int64_t j = j0 + warp; j < j1; j += kWarps * kUnroll) {
    float kr[kUnroll][CPL], vr[kUnroll][CPL], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t ju = j + int64_t(u) * kWarps;
      const bool in = ju < j1;
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        kr[u][c] = in ? to_float(K[ju * d + c0 + c]) : 0.0f;
        vr[u][c] = in ? to_float(V[ju * d + c0 + c]) : 0.0f;
      }
      b[u] = !in ? -INFINITY : bias ? bias[int64_t(h) * n + ju] : 0.0f;
    }
    // All kUnroll x G dot products first: their shuffle reductions are independent chains
    // the scheduler can overlap; then the online-softmax updates in order.
    float dots[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0;
#pragma unroll
        for (int c = 0; c < CPL; ++c) dot += qr[g][c] * kr[u][c];
        dots[u][g] = dot;
      }
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int g = 0; g < G; ++g) dots[u][g] += __shfl_xor_sync(0xffffffffu, dots[u][g], off);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float sc = dots[u][g] * scale + b[u];
        const float m_new = fmaxf(m[g], sc);
        // Masked entries (bias -inf, or past the slice) and the first entry (m = -inf) must
        // not make NaN.
        const float alpha = m[g] == -INFINITY ? 0.0f : __expf(m[g] - m_new);
        const float p = sc == -INFINITY ? 0.0f : __expf(sc - m_new);
        l[g] = l[g] * alpha + p;
#pragma unroll
        for (int c = 0; c < CPL; ++c) acc[g][c] = acc[g][c] * alpha + p * vr[u][c];
        m[g] = m_new;
      }
    }
  }
  // Merge the four warps through shared memory.
  extern __shared__ float smem[];  // [kWarps][G][2 + d]
  const int stride = 2 + d;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float* row = smem + (warp * G + g) * stride;
    if (lane == 0) row[0] = m[g], row[1] = l[g];
#pragma unroll
    for (int c = 0; c < CPL; ++c) row[2 + c0 + c] = acc[g][c];
  }
  __syncthreads();
  float* out = work + (int64_t(h) * gridDim.y + s) * G * stride;
  for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
    const int g = i / d, c = i % d;
    float M = -INFINITY;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, smem[(w * G + g) * stride]);
    float L = 0, A = 0;
    for (int w = 0; w < kWarps; ++w) {
      const float* row = smem + (w * G + g) * stride;
      const float e = row[0] == -INFINITY ? 0.0f : __expf(row[0] - M);
      L += row[1] * e;
      A += row[2 + c] * e;
    }
    if (c == 0) out[g * stride] = M, out[g * stride + 1] = L;
    out[g * stride + 2 + c] = A;
  }
}

// out[h][g][c] from the slices of head h.
__global__ void merge_slices(const float* __restrict__ work, int slices, int G, int d,
                             float* __restrict__ out) {
  const int h = blockIdx.x, stride = 2 + d;
  for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
    const int g = i / d, c = i % d;
    const float* base = work + int64_t(h) * slices * G * stride + g * stride;
    float M = -INFINITY;
    for (int s = 0; s < slices; ++s) M = fmaxf(M, base[int64_t(s) * G * stride]);
    float L = 0, A = 0;
    for (int s = 0; s < slices; ++s) {
      const float* row = base + int64_t(s) * G * stride;
      const float e = row[0] == -INFINITY ? 0.0f : __expf(row[0] - M);
      L += row[1] * e;
      A += row[2 + c] * e;
    }
    out[(int64_t(h) * G + g) * d + c] = L > 0 ? A / L : 0.0f;
  }
}

template <class T, int CPL, int G>
void launch(const void* k, const void* v, int H, int64_t n, int d, const float* q, float scale,
            const float* bias, float* out, float* work, cudaStream_t stream) {
  const int64_t slice = slice_size(H, n);
  const int slices = int((n + slice - 1) / slice);
  const size_t shared = size_t(kWarps) * G * (2 + d) * sizeof(float);
  attend_slices<T, CPL, G><<<dim3(H, slices), kWarps * 32, shared, stream>>>(
      static_cast<const T*>(k), static_cast<const T*>(v), n, slice, d, q, scale, bias, work);
  merge_slices<<<H, 256, 0, stream>>>(work, slices, G, d, out);
}

template <class T, int CPL>
void launch_group(int G, const void* k, const void* v, int H, int64_t n, int d, const float* q,
                  float scale, const float* bias, float* out, float* work, cudaStream_t stream) {
  switch (G) {
    case 1:
      return launch<T, CPL, 1>(k, v, H, n, d, q, scale, bias, out, work, stream);
    case 2:
      return launch<T, CPL, 2>(k, v, H, n, d, q, scale, bias, out, work, stream);
    case 4:
      return launch<T, CPL, 4>(k, v, H, n, d, q, scale, bias, out, work, stream);
    case 8:
      return launch<T, CPL, 8>(k, v, H, n, d, q, scale, bias, out, work, stream);
  }
  throw std::invalid_argument("CUDA attention: group size must be 1, 2, 4 or 8");
}

template <class T>
void launch_dim(int G, const void* k, const void* v, int H, int64_t n, int d, const float* q,
                float scale, const float* bias, float* out, float* work, cudaStream_t stream) {
  switch (d) {
    case 32:
      return launch_group<T, 1>(G, k, v, H, n, d, q, scale, bias, out, work, stream);
    case 64:
      return launch_group<T, 2>(G, k, v, H, n, d, q, scale, bias, out, work, stream);
    case 128:
      return launch_group<T, 4>(G, k, v, H, n, d, q, scale, bias, out, work, stream);
    case 256:
      return launch_group<T, 8>(G, k, v, H, n, d, q, scale, bias, out, work, stream);
  }
  throw std::invalid_argument("CUDA attention: head_dim must be 32, 64, 128 or 256");
}

}  // namespace

bool attend_supported(int d, int G) {
  return (d == 32 || d == 64 || d == 128 || d == 256) && (G == 1 || G == 2 || G == 4 || G == 8);
}

size_t attend_workspace_bytes(int H, int64_t n, int d, int G) {
  const int64_t slice = slice_size(H, n), slices = (n + slice - 1) / slice;
  return size_t(H) * size_t(std::max<int64_t>(slices, 1)) * size_t(G) * size_t(2 + d) *
         sizeof(float);
}

void attend_heads(DType type, const void* k, const void* v, int H, int64_t n, int d, const float* q,
                  int G, float scale, const float* bias, float* out, float* workspace,
                  void* stream) {
  if (n == 0) {
    check(cudaMemsetAsync(out, 0, size_t(H) * G * d * sizeof(float), cudaStream_t(stream)),
          "cudaMemset");
    return;
  }
  auto s = cudaStream_t(stream);
  switch (type) {
    case DType::f32:
      launch_dim<float>(G, k, v, H, n, d, q, scale, bias, out, workspace, s);
      break;
    case DType::f16:
      launch_dim<__half>(G, k, v, H, n, d, q, scale, bias, out, workspace, s);
      break;
    case DType::bf16:
      launch_dim<__nv_bfloat16>(G, k, v, H, n, d, q, scale, bias, out, workspace, s);
      break;
  }
  check(cudaGetLastError(), "attention kernel");
}

// Host-pointer form for the Ops table (parity tests): copy in, run, copy out.
void attend_head_host(DType type, const void* k, const void* v, int64_t n, int d, const float* q,
                      int G, float scale, const float* bias, float* out) {
  if (!attend_supported(d, G)) return kvk::attend_head(type, k, v, n, d, q, G, scale, bias, out);
  const size_t kv_bytes = size_t(n) * d * dtype_size(type);
  void *dk = nullptr, *dv = nullptr;
  float *dq = nullptr, *db = nullptr, *dout = nullptr, *work = nullptr;
  check(cudaMalloc(&dk, kv_bytes + 1), "cudaMalloc");
  check(cudaMalloc(&dv, kv_bytes + 1), "cudaMalloc");
  check(cudaMalloc(&dq, size_t(G) * d * 4), "cudaMalloc");
  check(cudaMalloc(&dout, size_t(G) * d * 4), "cudaMalloc");
  check(cudaMalloc(&work, attend_workspace_bytes(1, n, d, G)), "cudaMalloc");
  if (bias) check(cudaMalloc(&db, size_t(n) * 4 + 4), "cudaMalloc");
  check(cudaMemcpy(dk, k, kv_bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(dv, v, kv_bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(dq, q, size_t(G) * d * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  if (bias) check(cudaMemcpy(db, bias, size_t(n) * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  attend_heads(type, dk, dv, 1, n, d, dq, G, scale, db, dout, work, nullptr);
  check(cudaMemcpy(out, dout, size_t(G) * d * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
  for (void* p : {dk, dv, static_cast<void*>(dq), static_cast<void*>(db), static_cast<void*>(dout),
                  static_cast<void*>(work)})
    cudaFree(p);
}

namespace {

__global__ void read_all(const uint4* a, size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = a[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads
}

// Best time in ms of `f` over `reps` runs after one warm-up, by CUDA events.
template <class F>
float best_ms(F&& f, int reps, cudaStream_t stream = nullptr) {
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  f();
  float best = 1e30f;
  for (int r = 0; r < std::max(reps, 1); ++r) {
    cudaEventRecord(a, stream);
    f();
    cudaEventRecord(b, stream);
    check(cudaEventSynchronize(b), "kernel");
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    best = std::min(best, ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  check(cudaGetLastError(), "kernel");
  return best;
}

}  // namespace

double read_gbps(size_t bytes) {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  uint4* buf = nullptr;
  unsigned* sink = nullptr;
  check(cudaMalloc(&buf, bytes), "cudaMalloc");
  check(cudaMalloc(&sink, 4), "cudaMalloc");
  check(cudaMemset(buf, 1, bytes), "cudaMemset");
  const float ms =
      best_ms([&] { read_all<<<prop.multiProcessorCount * 8, 512>>>(buf, bytes / 16, sink); }, 10);
  cudaFree(buf);
  cudaFree(sink);
  return double(bytes) / (double(ms) * 1e-3) / 1e9;
}

double decode_step_ms(DType type, const std::vector<HostLayer>& layers, int H, int d, int G,
                      float scale, const float* q, int reps) {
  struct DeviceLayer {
    void *k = nullptr, *v = nullptr;
    float* bias = nullptr;
    int64_t n = 0;
  };
  std::vector<DeviceLayer> dev(layers.size());
  size_t work_bytes = 4;
  const size_t qn = layers.size() * size_t(H) * size_t(G) * size_t(d);
  float *dq = nullptr, *dout = nullptr, *work = nullptr;
  try {
    for (size_t l = 0; l < layers.size(); ++l) {
      const size_t bytes = size_t(H) * size_t(layers[l].n) * size_t(d) * dtype_size(type);
      dev[l].n = layers[l].n;
      check(cudaMalloc(&dev[l].k, bytes + 16), "cudaMalloc");
      check(cudaMalloc(&dev[l].v, bytes + 16), "cudaMalloc");
      check(cudaMemcpy(dev[l].k, layers[l].k, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
      check(cudaMemcpy(dev[l].v, layers[l].v, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
      if (layers[l].bias) {
        check(cudaMalloc(&dev[l].bias, size_t(H) * size_t(layers[l].n) * 4 + 4), "cudaMalloc");
        check(cudaMemcpy(dev[l].bias, layers[l].bias, size_t(H) * size_t(layers[l].n) * 4,
                         cudaMemcpyHostToDevice),
              "cudaMemcpy");
      }
      work_bytes = std::max(work_bytes, attend_workspace_bytes(H, layers[l].n, d, G));
    }
    check(cudaMalloc(&dq, qn * 4), "cudaMalloc");
    check(cudaMalloc(&dout, qn * 4), "cudaMalloc");
    check(cudaMalloc(&work, work_bytes), "cudaMalloc");
    check(cudaMemcpy(dq, q, qn * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
    const size_t per_layer = size_t(H) * size_t(G) * size_t(d);
    // The step's launches (two per layer) are captured once in a CUDA graph and replayed, as
    // decode loops do: launched one by one, their overhead exceeds the work of a small layer.
    cudaStream_t stream = nullptr;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
    for (size_t l = 0; l < dev.size(); ++l)
      attend_heads(type, dev[l].k, dev[l].v, H, dev[l].n, d, dq + l * per_layer, G, scale,
                   dev[l].bias, dout + l * per_layer, work, stream);
    check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    const float ms = best_ms([&] { cudaGraphLaunch(exec, stream); }, reps, stream);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
    for (auto& x : dev) cudaFree(x.k), cudaFree(x.v), cudaFree(x.bias);
    cudaFree(dq), cudaFree(dout), cudaFree(work);
    return ms;
  } catch (...) {
    for (auto& x : dev) cudaFree(x.k), cudaFree(x.v), cudaFree(x.bias);
    cudaFree(dq), cudaFree(dout), cudaFree(work);
    throw;
  }
}

}  // namespace kvk::cuda
