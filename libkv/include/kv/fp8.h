// FP8 codecs on plain float arrays, the two OCP 8-bit formats (OCP 8-bit Floating Point
// Specification, OFP8) that KV caches are stored in:
//  - e4m3 ("E4M3FN"): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits. No infinities: the
//    exponent field 1111 holds normal values except S.1111.111, the only NaN. Max finite 448
//    (0x7E), smallest normal 2^-6, smallest subnormal 2^-9 (0x01).
//  - e5m2: 1 sign, 5 exponent bits (bias 15), 2 mantissa bits, laid out like IEEE half with the
//    low byte cut off: inf = S.11111.00, NaN = S.11111.xx with xx nonzero. Max finite 57344
//    (0x7B), smallest normal 2^-14, smallest subnormal 2^-16 (0x01).
// A code is the byte S.E.M, sign in bit 7. There is one scale per array, supplied by the caller;
// choosing it (per tensor, per head, ...) is a layout decision and is made elsewhere.
//
// Rounding: to nearest, ties to the even code (lowest mantissa bit 0), as in IEEE 754. Magnitudes
// beyond max_finite, infinities included, saturate to +-max_finite instead of becoming inf or
// NaN, the convention of KV-cache (and most training) FP8 casts. -0 keeps its sign (code 0x80).
// NaN encodes to the format's NaN with its sign, 0x7F / 0xFF in both formats; callers that store
// caches reject NaN before they get here.
//
// Errors: impossible sizes or scales throw kv::Error(Exit::usage). encode() and decode() never
// throw. Everything runs on the calling thread. encode_array is also compiled for AVX-512 and
// AVX2 (the CPU's widest is used), decode_array has an AVX-512 path (used at
// kv::quant::simd_level() avx512, so tests can compare the two); their results are encode()'s
// and decode()'s, bit for bit.
#pragma once
#include <cstdint>
#include <string>

namespace kv::fp8 {

enum class Format { e4m3, e5m2 };

// "e4m3" or "e5m2"; anything else throws Exit::usage.
Format parse_format(const std::string& name);
const char* format_name(Format f);

// 448 for e4m3, 57344 for e5m2.
float max_finite(Format f);

// One value. encode() is exact (the nearest code, ties to even, as above) for every float input.
uint8_t encode(float x, Format f);
float decode(uint8_t code, Format f);

// Arrays with one scale: x is stored as encode(x / scale), computed as out[i] = encode(x[i] *
// inv_scale) with inv_scale = 1.0f / scale rounded to float once, so a scale that is not a power
// of two may give a different code than an exact division would on values close to a rounding
// boundary. decode_array gives out[i] = decode(codes[i]) * scale, one float multiplication. With
// a power-of-two scale both products are exact (barring float overflow or underflow), so the
// round trip gives exactly scale times the code nearest x / scale.
// scale must be positive and finite, for encode_array with 1.0f / scale finite too (scale above
// about 2.9e-39: an infinite inv_scale would turn 0 into NaN), and n >= 0, else Exit::usage.
// Input and output must not overlap.
void encode_array(const float* x, int64_t n, float scale, Format f, uint8_t* out);
void decode_array(const uint8_t* codes, int64_t n, float scale, Format f, float* out);

}  // namespace kv::fp8
