// Numeric kernels shared by every backend. This header is the whole contract between libkv and
// kernels/: plain pointers and sizes, no HDF5, no libkv types.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace kvk {

// Element types a dense tensor can be stored in.
enum class DType : uint8_t { f32 = 0, f16 = 1, bf16 = 2 };

constexpr size_t dtype_size(DType t) {
  return t == DType::f32 ? 4 : 2;
}
const char* dtype_name(DType t);

// One table of function pointers per backend (the ggml idea): an op a backend lacks is null and
// the caller falls back to the CPU table, which is complete and is the reference.
struct Ops {
  const char* name;
  // dst[i] = float(src[i]) for n elements of type `from`.
  void (*to_f32)(DType from, const void* src, float* dst, size_t n);
  // dst[i] = round-to-nearest-even(src[i]) into type `to`.
  void (*from_f32)(DType to, const float* src, void* dst, size_t n);
  // Decode attention of one KV head (see attend_head below); host pointers.
  void (*attend_head)(DType type, const void* k, const void* v, int64_t n, int d, const float* q,
                      int G, float scale, const float* bias, float* out);
};

const Ops& cpu_ops();

// The CUDA table, or null when kvtk was built without CUDA or no usable GPU is present;
// `why` then says which.
const Ops* cuda_ops(std::string* why);

// Count of elements that are NaN or +-Inf (CPU only: it runs fused with file reads).
size_t count_nonfinite(DType t, const void* data, size_t n);

// Scalar conversions, the reference for the vector paths and the parity tests.
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);

}  // namespace kvk

namespace kvk {

// Y[b, n] = sum_k X[b, k] * W[n, k] for b < B, n < N (X row stride K, W row stride K, Y row
// stride ldy): the product of activations with a block of weight rows, the prefill GEMM's core.
// Register-blocked and multiversioned (AVX-512 / AVX2 / baseline); single-threaded: callers
// split N across threads.
void gemm_nt(const float* X, int64_t B, int64_t K, const float* W, int64_t N, float* Y,
             int64_t ldy);

// x[j] <- softmax_j(scale * x[j] + bias[j]) over j < n, in place (bias may be null): the
// attention weights of one query over its visible keys (all 0 when every logit is -inf).
// Multiversioned like gemm_nt.
void softmax_row(float* x, int64_t n, float scale, const float* bias);

// Attention votes, SnapKV's score: votes[g * n + j] = sum over the queries i of group g (rows
// g*group .. g*group + group - 1 of q, [n_q, d] f32) of softmax_j(scale * q_i . k_j + bias[j]),
// where query i sees the keys j < visible[i] (a causal prefix: its weight on the others is 0,
// and a query that sees nothing adds nothing). Keys [n, d] stored as `type`, bias [n] or null,
// votes [n_q / group, n]. AVX-512 when the CPU has it (queries in lanes, keys in L2-sized chunks,
// the [queries x keys] weights written once); otherwise the reference. Single-threaded.
void attention_votes(const float* q, int64_t n_q, const int64_t* visible, int64_t group, DType type,
                     const void* k, int64_t n, int d, float scale, const float* bias, float* votes);
// The reference: gemm_nt, softmax_row on each query's visible keys, and the sums.
void attention_votes_reference(const float* q, int64_t n_q, const int64_t* visible, int64_t group,
                               DType type, const void* k, int64_t n, int d, float scale,
                               const float* bias, float* votes);

// Decode attention of one KV head for the G query heads that share it: out[g] = sum_j
// softmax_j(scale * q[g] . k_j + bias[j]) v_j over n rows of K and V stored as `type`, row-major
// [n, d]; q and out are [G, d] f32, bias [n] or null. One pass over K and V (online softmax).
// Multiversioned: AVX2/F16C when the CPU has them and d % 8 == 0, else the reference.
void attend_head(DType type, const void* k, const void* v, int64_t n, int d, const float* q, int G,
                 float scale, const float* bias, float* out);
// The reference: plain loops in double precision.
void attend_head_reference(DType type, const void* k, const void* v, int64_t n, int d,
                           const float* q, int G, float scale, const float* bias, float* out);

// Decode attention as attend_head, over K and V stored as llama.cpp q4_0 blocks (rows of d/32
// blocks of 18 bytes: an f16 scale, then 32 4-bit codes), computed on the codes:
// queries rounded to q8_0 and attention weights to 8 bits per chunk of keys, then integer dot
// products (AVX-512 VNNI + VBMI and d % 32 == 0; otherwise it is the reference, which reads
// the n*d values as one run of blocks, for any d). Its results differ
// from the reference's by those roundings (relative L2 error of an output row: about 7e-3 on
// average over an 8B-shaped cache, bench-decode-attention; up to 3e-2 in the unit tests).
void attend_head_q4_0(const uint8_t* k, const uint8_t* v, int64_t n, int d, const float* q, int G,
                      float scale, const float* bias, float* out);
// The reference: the rows decoded to f32, then attend_head_reference.
void attend_head_q4_0_reference(const uint8_t* k, const uint8_t* v, int64_t n, int d,
                                const float* q, int G, float scale, const float* bias, float* out);
// Bytes of one q4_0 row of d values (d % 32 == 0).
size_t q4_0_row_bytes(int d);
// Whether attend_head_q4_0 runs on the codes here (the CPU has AVX-512 VNNI and VBMI, and
// d % 32 == 0); otherwise it is the reference, far slower than attend_head on decoded values.
bool q4_0_codes_supported(int d);

// One KV head of a KIVI-2 cache as libkv stores it (formats/kvsnap.md 9.3: 2-bit codes, keys
// grouped along the rows per channel, values along a row's channels, groups of 32 both): the
// first n_quant rows quantized, then n_residual dense f16 rows. Null zeros mean symmetric codes
// (value (c - 2) S).
struct Kivi2Head {
  int64_t n_quant = 0;
  const uint8_t* k_codes = nullptr;     // group-major: group, channel, the group's rows
  const uint16_t* k_scales = nullptr;   // f16 [ceil(n_quant / 32)][d]
  const uint16_t* k_zeros = nullptr;    // as k_scales, or null
  const uint8_t* v_codes = nullptr;     // row-major
  const uint16_t* v_scales = nullptr;   // f16 [n_quant][d / 32]
  const uint16_t* v_zeros = nullptr;    // as v_scales, or null
  int64_t n_residual = 0;
  const uint16_t* k_residual = nullptr;  // f16 [n_residual][d]
  const uint16_t* v_residual = nullptr;  // f16 [n_residual][d]
};

// Decode attention as attend_head over a KIVI-2 head, computed on the codes (AVX-512 VNNI and
// VBMI, 32 <= d <= 128, d % 32 == 0; otherwise it is the reference): q S rounded to s8 per
// key group and query, attention weights times value scales to s8 per chunk of 64 rows, then
// integer dot products. Rows past the last whole 64 and the residual rows are done in f32.
// Its results differ from the reference's by those roundings (bench-decode-attention reports
// the error; tests/unit/test_gemm.cpp bounds it).
void attend_head_kivi2(const Kivi2Head& head, int d, const float* q, int G, float scale,
                       const float* bias, float* out);
// The reference: every row decoded to f32 as kv::encoding decodes it, then attend_head_reference.
void attend_head_kivi2_reference(const Kivi2Head& head, int d, const float* q, int G, float scale,
                                 const float* bias, float* out);
// Whether attend_head_kivi2 runs on the codes here.
bool kivi2_codes_supported(int d);

// Memory read bandwidth in GB/s (1e9 B/s): a STREAM-like sum over `bytes` of uint64 with
// `threads` OpenMP threads, best of `reps`.
double stream_read_gbps(size_t bytes, int threads, int reps);

}  // namespace kvk
