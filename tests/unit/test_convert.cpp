// dtype conversions: exhaustive over all 65536 half/bfloat16 bit patterns against the scalar
// reference, and rounding of f32 to nearest even checked on hand-picked values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "kvk/ops.h"

using kvk::DType;

static uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

TEST(Convert, F16KnownValues) {
  EXPECT_EQ(kvk::f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(kvk::f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(kvk::f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(kvk::f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::isinf(kvk::f16_to_f32(0x7c00)));
  EXPECT_TRUE(std::isnan(kvk::f16_to_f32(0x7e00)));
  EXPECT_EQ(kvk::f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(kvk::f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(kvk::f32_to_f16(65520.0f), 0x7c00);  // halfway to the next binade rounds to Inf
  EXPECT_EQ(kvk::f32_to_f16(65519.0f), 0x7bff);
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1.0).
  EXPECT_EQ(kvk::f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 (odd) and 1 + 2^-9 (even).
  EXPECT_EQ(kvk::f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(kvk::f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);           // tie to even zero
  EXPECT_EQ(kvk::f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);           // tie to even 2
  EXPECT_EQ(kvk::f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(kvk::f32_to_f16(NAN) & 0x7c00, 0x7c00);
}

TEST(Convert, Bf16KnownValues) {
  EXPECT_EQ(kvk::f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(kvk::bf16_to_f32(0x3f80), 1.0f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even.
  EXPECT_EQ(kvk::f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(kvk::f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(kvk::bf16_to_f32(kvk::f32_to_bf16(NAN))));
}

TEST(Convert, HalfRoundTripIsExactForAllPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = kvk::f16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(kvk::f32_to_f16(f), h) << std::hex << h;
    float b = kvk::bf16_to_f32(uint16_t(h));
    if (!std::isnan(b)) {
      ASSERT_EQ(kvk::f32_to_bf16(b), h) << std::hex << h;
    }
  }
}

TEST(Convert, F32ToF16IsNearest) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-70000.0f, 70000.0f);
  for (int i = 0; i < 200000; ++i) {
    float x = i % 2 ? u(rng) : u(rng) * 1e-6f;
    uint16_t h = kvk::f32_to_f16(x);
    double err = std::fabs(double(kvk::f16_to_f32(h)) - x);
    if (std::isinf(kvk::f16_to_f32(h))) {
      ASSERT_GE(std::fabs(x), 65520.0f);
      continue;
    }
    // No neighbouring half is closer.
    for (int d : {-1, 1}) {
      uint16_t n = uint16_t(h + d);
      float fn = kvk::f16_to_f32(n);
      if (std::isnan(fn) || std::isinf(fn) || ((n ^ h) & 0x8000)) continue;
      ASSERT_LE(err, std::fabs(double(fn) - x)) << x;
    }
  }
}

TEST(Convert, VectorPathsMatchScalarReference) {
  // Sizes straddle the SIMD width and the OpenMP block size.
  for (size_t n : {size_t(1), size_t(7), size_t(8), size_t(33), size_t(1) << 18}) {
    std::vector<float> src(n);
    std::mt19937 rng{unsigned(n)};
    std::normal_distribution<float> g(0.0f, 30.0f);
    for (auto& x : src) x = g(rng);
    for (DType t : {DType::f16, DType::bf16, DType::f32}) {
      std::vector<uint8_t> packed(n * kvk::dtype_size(t));
      kvk::cpu_ops().from_f32(t, src.data(), packed.data(), n);
      std::vector<float> back(n);
      kvk::cpu_ops().to_f32(t, packed.data(), back.data(), n);
      for (size_t i = 0; i < n; ++i) {
        float want = t == DType::f16   ? kvk::f16_to_f32(kvk::f32_to_f16(src[i]))
                     : t == DType::bf16 ? kvk::bf16_to_f32(kvk::f32_to_bf16(src[i]))
                                        : src[i];
        ASSERT_EQ(bits(back[i]), bits(want)) << kvk::dtype_name(t) << " n=" << n << " i=" << i;
      }
    }
  }
}

TEST(Convert, CountNonfinite) {
  std::vector<uint16_t> h(1000, 0x3c00);
  EXPECT_EQ(kvk::count_nonfinite(DType::f16, h.data(), h.size()), 0u);
  h[0] = 0x7c00;
  h[500] = 0xfe00;
  h[999] = 0x7e01;
  EXPECT_EQ(kvk::count_nonfinite(DType::f16, h.data(), h.size()), 3u);
  std::vector<uint16_t> b(40, 0x3f80);
  b[39] = 0x7f80;
  EXPECT_EQ(kvk::count_nonfinite(DType::bf16, b.data(), b.size()), 1u);
  std::vector<float> f(10, 1.0f);
  f[2] = NAN;
  EXPECT_EQ(kvk::count_nonfinite(DType::f32, f.data(), f.size()), 1u);
}
