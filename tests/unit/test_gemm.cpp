// The GEMM micro-kernel against a double-precision reference, over shapes that hit every
// remainder path (B % 6, N % 16, K of 1 and odd sizes), and kv::linear over every weight type
// path (f32 pointer, dequantized f16 blocks) with and without threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "kv/model.h"
#include "kvk/ops.h"

namespace {
void reference(const std::vector<float>& X, int64_t B, int64_t K, const std::vector<float>& W, int64_t N,
               std::vector<double>& Y) {
  Y.assign(size_t(B * N), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) Y[size_t(b * N + n)] += double(X[size_t(b * K + k)]) * W[size_t(n * K + k)];
}
}  // namespace

TEST(Gemm, MatchesReferenceOnAllRemainders) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int64_t B : {1, 5, 6, 7, 13}) {
    for (int64_t N : {1, 15, 16, 17, 40}) {
      for (int64_t K : {1, 8, 67}) {
        std::vector<float> X(size_t(B * K)), W(size_t(N * K)), Y(size_t(B * N), -7.0f);
        for (auto& x : X) x = u(rng);
        for (auto& w : W) w = u(rng);
        std::vector<double> want;
        reference(X, B, K, W, N, want);
        kvk::gemm_nt(X.data(), B, K, W.data(), N, Y.data(), N);
        for (size_t i = 0; i < Y.size(); ++i)
          ASSERT_NEAR(Y[i], want[i], 1e-4 * double(K)) << "B " << B << " N " << N << " K " << K << " i " << i;
      }
    }
  }
}

TEST(Gemm, LinearOverF32AndF16WeightsThreadedOrNot) {
  std::mt19937 rng(12);
  std::normal_distribution<float> g(0, 1);
  // B * K * N above and below the threading threshold.
  for (int64_t B : {3, 64}) {
    const int64_t K = 256, N = 700;
    std::vector<float> X(size_t(B * K)), W(size_t(N * K)), Y(size_t(B * N));
    for (auto& x : X) x = g(rng);
    for (auto& w : W) w = kvk::f16_to_f32(kvk::f32_to_f16(g(rng)));  // exact in f16 too
    std::vector<uint16_t> W16(W.size());
    for (size_t i = 0; i < W.size(); ++i) W16[i] = kvk::f32_to_f16(W[i]);
    std::vector<double> want;
    reference(X, B, K, W, N, want);
    kv::Weight w32{kv::GgmlType::F32, reinterpret_cast<const uint8_t*>(W.data()), N, K};
    kv::Weight w16{kv::GgmlType::F16, reinterpret_cast<const uint8_t*>(W16.data()), N, K};
    for (const kv::Weight* w : {&w32, &w16}) {
      kv::linear(X.data(), B, *w, Y.data());
      for (size_t i = 0; i < Y.size(); ++i) ASSERT_NEAR(Y[i], want[i], 1e-3) << i;
    }
  }
}

TEST(Softmax, RowAgainstDoubleReferenceOverEveryTailLength) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> logit(-30.0f, 30.0f), b(-3.0f, 1.0f);
  for (int64_t n = 1; n <= 41; ++n)
    for (bool with_bias : {false, true}) {
      std::vector<float> x(static_cast<size_t>(n)), bias(static_cast<size_t>(n));
      for (auto& v : x) v = logit(rng);
      for (auto& v : bias) v = b(rng);
      const float scale = 0.35f;
      std::vector<double> ref(static_cast<size_t>(n));
      double mx = -1e300, z = 0;
      for (int64_t j = 0; j < n; ++j) {
        ref[size_t(j)] = double(x[size_t(j)]) * scale + (with_bias ? bias[size_t(j)] : 0.0);
        mx = std::max(mx, ref[size_t(j)]);
      }
      std::vector<double> arg(ref);
      for (double& r : ref) z += (r = std::exp(r - mx));
      kvk::softmax_row(x.data(), n, scale, with_bias ? bias.data() : nullptr);
      double sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        sum += x[size_t(j)];
        // Relative error: the polynomial's ~2e-7 and the sum's rounding, plus the f32 rounding of the logit, which exp
        // turns into a relative error proportional to its distance below the maximum.
        const double tol = 1e-6 * (1 + std::abs(arg[size_t(j)] - mx)) * (ref[size_t(j)] / z);
        ASSERT_NEAR(x[size_t(j)], ref[size_t(j)] / z, tol)
            << "n " << n << " j " << j;
      }
      EXPECT_NEAR(sum, 1.0, 1e-6);
    }
}

TEST(Softmax, FarBelowTheMaximumIsZeroAndEqualLogitsAreUniform) {
  std::vector<float> x = {0.0f, -200.0f, 5.0f, -1e30f, 5.0f, 5.0f, 5.0f, 5.0f, 5.0f, 5.0f};
  kvk::softmax_row(x.data(), int64_t(x.size()), 1.0f, nullptr);
  EXPECT_EQ(x[1], 0.0f);
  EXPECT_EQ(x[3], 0.0f);
  EXPECT_NEAR(x[0], std::exp(-5.0) / (7 + std::exp(-5.0)), 1e-7);
  for (int j : {2, 4, 5, 6, 7, 8, 9}) EXPECT_NEAR(x[size_t(j)], 1.0 / (7 + std::exp(-5.0)), 1e-7);
}

// d picks the kernel: multiples of 8 the AVX2 one (24, 48: a final 8-channel step in the value
// pass, which walks 16 channels at a time), the rest the scalar reference.
TEST(DecodeAttention, MatchesTheDoubleReferenceForEveryTypeAndShape) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  for (kvk::DType type : {kvk::DType::f32, kvk::DType::f16, kvk::DType::bf16})
    for (int d : {8, 24, 48, 64, 128, 12})
      for (int64_t n : {1, 7, 64, 65, 300})
        for (int G : {1, 4, 9})
          for (bool with_bias : {false, true}) {
            const size_t kvn = size_t(n) * size_t(d);
            std::vector<float> k32(kvn), v32(kvn), q(size_t(G) * size_t(d)), bias(static_cast<size_t>(n));
            for (auto& x : k32) x = 2 * nd(rng);
            for (auto& x : v32) x = nd(rng);
            for (auto& x : q) x = nd(rng);
            for (auto& x : bias) x = with_bias ? std::log(1.0f + float(rng() % 3)) : 0.0f;
            std::vector<uint16_t> k16(kvn), v16(kvn);
            for (size_t i = 0; i < kvn; ++i) {
              k16[i] = type == kvk::DType::f16 ? kvk::f32_to_f16(k32[i]) : kvk::f32_to_bf16(k32[i]);
              v16[i] = type == kvk::DType::f16 ? kvk::f32_to_f16(v32[i]) : kvk::f32_to_bf16(v32[i]);
            }
            const void* k = type == kvk::DType::f32 ? static_cast<const void*>(k32.data()) : k16.data();
            const void* v = type == kvk::DType::f32 ? static_cast<const void*>(v32.data()) : v16.data();
            const float scale = 1.0f / std::sqrt(float(d));
            std::vector<float> got(q.size()), want(q.size());
            const float* b = with_bias ? bias.data() : nullptr;
            kvk::attend_head(type, k, v, n, d, q.data(), G, scale, b, got.data());
            kvk::attend_head_reference(type, k, v, n, d, q.data(), G, scale, b, want.data());
            for (size_t i = 0; i < got.size(); ++i)
              ASSERT_NEAR(got[i], want[i], 2e-5 * (1 + std::abs(want[i])))
                  << kvk::dtype_name(type) << " d " << d << " n " << n << " G " << G << " i " << i;
          }
}

TEST(DecodeAttention, ReferenceByHand) {
  // Two keys (1, 0), (0, 1); values (2, 0), (0, 4); q = (ln 3, 0) with scale 1: weights 3/4, 1/4,
  // so o = (1.5, 1). A bias of ln 3 on key 1 makes them equal: o = (1, 2).
  const float k[] = {1, 0, 0, 1}, v[] = {2, 0, 0, 4}, q[] = {float(std::log(3.0)), 0};
  float o[2];
  kvk::attend_head_reference(kvk::DType::f32, k, v, 2, 2, q, 1, 1.0f, nullptr, o);
  EXPECT_NEAR(o[0], 1.5, 1e-6);
  EXPECT_NEAR(o[1], 1.0, 1e-6);
  const float bias[] = {0, float(std::log(3.0))};
  kvk::attend_head_reference(kvk::DType::f32, k, v, 2, 2, q, 1, 1.0f, bias, o);
  EXPECT_NEAR(o[0], 1.0, 1e-6);
  EXPECT_NEAR(o[1], 2.0, 1e-6);
}
