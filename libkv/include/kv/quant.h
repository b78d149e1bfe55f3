// Quantization codecs on plain float arrays, the building blocks of kv-compress (formulas in
// METHODS.md, section Quantization):
//  - llama.cpp's q8_0 and q4_0 blocks, bit-identical to ggml's reference quantizers
//    (quantize_row_q8_0_ref / quantize_row_q4_0_ref) so the bytes can be handed to ggml as they
//    are and compared against gguf-py;
//  - uniform b-bit quantization in groups (asymmetric with a zero point, or symmetric), the
//    scheme KIVI-style caches are built from, with its f16 scale and zero chosen so that the
//    error bound below holds for the values actually stored.
// No layout decisions here: callers choose which values form a run (per token, per channel).
//
// Errors: impossible sizes or parameters throw kv::Error(Exit::usage); input the stored format
// cannot represent (NaN, Inf, or a uniform group beyond f16's range) throws Exit::data. After a
// throw the output buffers hold unspecified bytes. Long inputs are encoded with OpenMP threads.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kv::quant {

// ---- llama.cpp blocks ------------------------------------------------------------------------
// Both work on blocks of 32 consecutive values, so n must be a multiple of 32. The block scale is
// an f16 stored little endian at the start of each block, as in ggml's block_q8_0 / block_q4_0.

constexpr int64_t block_values = 32;

// q8_0: d = max|x| / 127, q = roundf(x / d) (ties away from zero; ggml multiplies by
// id = d ? 1/d : 0, and so do we, which is what makes the codes bit-identical), stored as f16 d and
// 32 int8: 34 bytes per block. Decoded x^ = q * f16(d).
size_t q8_0_bytes(int64_t n);
void encode_q8_0(const float* x, int64_t n, uint8_t* out);
void decode_q8_0(const uint8_t* in, int64_t n, float* out);

// q4_0: m = the value of largest magnitude with its sign (the first one on ties), d = m / -8,
// q = min(15, trunc(x * id + 8.5)) with id = d ? 1/d : 0, so m itself gets q = 0 and x^ = (q - 8)
// * f16(d). Byte j (0..15) holds the q of value j in its low nibble and of value j + 16 in its
// high nibble: 18 bytes per block. A block of zeros gets d = -0 (ggml starts its search from +0).
size_t q4_0_bytes(int64_t n);
void encode_q4_0(const float* x, int64_t n, uint8_t* out);
void decode_q4_0(const uint8_t* in, int64_t n, float* out);

// Where the two differ from ggml: on finite input, nowhere. ggml does not check for NaN/Inf
// (its result is undefined behaviour in C); we throw Exit::data. A scale that overflows f16
// (max|x| >= 65520 * 127, about 8.3e6, for q8_0; |m| >= 65520 * 8, about 5.2e5, for q4_0) is
// stored as Inf, as ggml does, and decodes to Inf/NaN. A block whose 1/d overflows f32 (max|x|
// below about 3.7e-37 for q8_0, |m| below about 2.4e-38 for q4_0) gets codes 0, as x86 builds of
// ggml and gguf-py do; its f16 d is 0 then, so the codes do not matter.
// gguf-py itself differs from ggml on one input: a q4_0 block of zeros whose first value is -0
// gets d = +0 from gguf-py (it takes m = x[0]) and d = -0 from ggml and from us.

// ---- uniform b-bit groups --------------------------------------------------------------------

struct UniformParams {
  int bits = 4;            // 2, 3, 4 or 8
  int group = 32;          // values per group, >= 1; the last group may be shorter
  bool symmetric = false;  // no zero point: codes are symmetric around 0
};

// Throws Exit::usage unless bits is 2, 3, 4 or 8 and group >= 1.
void check_params(const UniformParams& p);

// Bytes of the code stream for n values: codes are bit-packed LSB-first, code i occupying bits
// i*bits .. i*bits + bits - 1 of the stream (bit k in byte k / 8, bit k % 8), so 3-bit codes cross
// byte boundaries. Unused bits of the last byte are 0.
size_t uniform_code_bytes(int64_t n, int bits);

// One group of encode_uniform, its codes one per byte (what encode_uniform packs): for callers
// that lay groups out themselves. Throws like encode_uniform; zero may be null if symmetric.
void quantize_group(const float* x, int64_t len, const UniformParams& p, uint16_t* scale,
                    uint16_t* zero, uint8_t* codes);
// The inverse for one group of codes (one per byte); p.group is not used.
void dequantize_group(const uint8_t* codes, int64_t len, const UniformParams& p, uint16_t scale,
                      uint16_t zero, float* out);

// A batch of whole groups, for callers that lay groups out themselves (kv-compress's tiles):
// value i of group g is x[g * group_stride + i * value_stride] (group_stride 1 and value_stride D
// reads groups down the channels of row-major rows), the codes of all groups form one packed
// stream, group after group (as pack_codes lays them out), and group g's scale and zero go to
// scales[g] and zeros[g]. Exactly quantize_group on each group in turn, followed by pack_codes:
// the same bytes, the same first error. Asymmetric and symmetric 2- and 4-bit groups of 32 run
// in vector kernels (16 groups at a time); other parameters take the scalar path.
void quantize_groups(const float* x, int64_t groups, int64_t group_stride, int64_t value_stride,
                     const UniformParams& p, uint16_t* scales, uint16_t* zeros, uint8_t* codes);
// The inverse: dequantize_group on each group of the stream, written with the same strides.
void dequantize_groups(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros,
                       int64_t groups, int64_t group_stride, int64_t value_stride,
                       const UniformParams& p, float* out);

// Packs n codes (each < 2^bits) into uniform_code_bytes(n, bits) bytes in that layout, and back;
// for schemes that choose their codes themselves (non-uniform levels).
void pack_codes(const uint8_t* codes, int64_t n, int bits, uint8_t* out);
void unpack_codes(const uint8_t* in, int64_t n, int bits, uint8_t* codes);

// Number of groups for n values: ceil(n / group); each has one f16 scale (and zero).
int64_t uniform_groups(int64_t n, int group);

// Asymmetric (per group, L = 2^bits - 1), METHODS.md's z = min, s = (max - min) / L with both
// stored as f16 and the codes computed from the stored values. With min m and max M:
//   Z = f16(m) (nearest, ties to even),
//   S = the smallest f16 >= 0 with f32(L * S + Z) >= M (the decoder's top level reaches M),
//   q = round((x - Z) / S) (ties away from zero) clamped to [0, L], except that the values equal
//       to m get q = 0 and those equal to M get q = L,
//   x^ = f32(q * S + Z).
// A group of equal values (or one that f16 rounding puts entirely at or below Z) stores S = 0
// and decodes to Z: exactly its value whenever that value is an f16.
// Symmetric (Q = 2^(bits-1) - 1): S = the smallest f16 with Q * S >= max|x|, q = round(x / S)
// clamped to [-Q, Q] with +-max|x| pinned to +-Q, stored as the offset-binary code
// q + 2^(bits-1) (code 0 is never produced); x^ = q * S. No zero point. A group of zeros stores
// S = 0 and decodes to zeros; other constant groups are exact only if |c| = Q * S happens to hold.
//
// Pinning the extremes makes requantization stable: decode(encode(y)) == y for y =
// decode(encode(x)), because y's min is Z and its max is the top level, from which the encoder
// derives the same Z and S (S being the smallest that reaches that max) and then the same codes.
// (The argument has one gap, an f32 rounding tie, possible only when S is below the f32 spacing
// of the group's values, i.e. for a range of a few hundred f32 ulps; not seen in testing.)
// Without the pins, offset groups (say values 10 +- 0.01 at 8 bits, where S is finer than f16's
// spacing at 10) re-encode to a shifted grid.
//
// Guaranteed error, per value x of a group with stored S and Z (as floats):
//   asymmetric: |x^ - x| <= max(S/2, |m - Z|, L * 2^-24) + 2^-23 * max(|Z|, |Z + L*S|)
//   symmetric:  |x^ - x| <= max(S/2, Q * 2^-24) + 2^-52 * Q * S
// S/2 is the rounding to the nearest level. |m - Z| is the f16 rounding of the zero (at most half
// an f16 ulp of m), paid by m itself and by values between m and Z. L * 2^-24 (Q * 2^-24) only
// exceeds S/2 when S is an f16 subnormal (< 2^-14): the pinned max can then sit up to L f16 ulps
// above M. The last terms are the f32 rounding of x^ and the double-precision division. As for
// the ideal s: S is the f16 at or just above about (M - Z) / L = s + (m - Z) / L, i.e. within
// 2^-10 relative (or 2^-24 absolute) of it.
//
// codes: uniform_code_bytes(n, bits) bytes; scales (and zeros, for asymmetric; may be null for
// symmetric): uniform_groups(n, group) f16 values. Throws Exit::data for NaN/Inf and for a group
// f16 cannot describe (min rounding to -Inf, or S beyond 65504).
void encode_uniform(const float* x, int64_t n, const UniformParams& p, uint8_t* codes,
                    uint16_t* scales, uint16_t* zeros);
void decode_uniform(const uint8_t* codes, const uint16_t* scales, const uint16_t* zeros, int64_t n,
                    const UniformParams& p, float* out);

// ---- vector paths -------------------------------------------------------------------------------
// q8_0/q4_0 encode and decode and quantize_groups/dequantize_groups have AVX-512 kernels (F, BW,
// DQ, VL), used when the CPU has them (and the compiler is GCC); their output is the scalar code's,
// bit for bit. The scalar code stays the reference, and the path everywhere else: tests force each
// level to compare them.
enum class Simd { scalar, avx512 };
// The widest level this CPU supports.
Simd simd_supported();
// The level in use: simd_supported() unless set_simd_level chose a narrower one.
Simd simd_level();
// Uses `level`, or the widest supported level below it; returns the level now in use. Not
// thread-safe against running encoders: for tests and benchmarks.
Simd set_simd_level(Simd level);

// f16 input (IEEE binary16 bits) straight into the vector kernels, with no float copy: for
// callers that hold f16 values (kv-compress's layers). True when done, with exactly the bytes
// encode_q8_0, encode_q4_0 or quantize_groups give for the same values as floats; false, the
// output then unspecified, when there is no vector kernel for these parameters at the level in
// use, or the input holds NaN/Inf: the caller then converts and calls the float function, which
// throws its usual error. Throws Exit::usage like the float functions.
bool encode_q8_0_f16(const uint16_t* x, int64_t n, uint8_t* out);
bool encode_q4_0_f16(const uint16_t* x, int64_t n, uint8_t* out);
bool quantize_groups_f16(const uint16_t* x, int64_t groups, int64_t group_stride,
                         int64_t value_stride, const UniformParams& p, uint16_t* scales,
                         uint16_t* zeros, uint8_t* codes);

// ---- evaluation --------------------------------------------------------------------------------

// ||a - ref||_2 / ||ref||_2, accumulated in double; 0 when both are all zero, +Inf when only ref
// is.
double relative_error(const float* a, const float* ref, int64_t n);

}  // namespace kv::quant
