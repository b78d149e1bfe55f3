// Backend parity in the style of llama.cpp's test-backend-ops: every op of the CUDA table
// against the CPU reference on the same inputs. Skips without a usable GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "kv/backend.h"
#include "kv/error.h"

using kvk::DType;

TEST(Backend, CpuAlwaysAvailable) { EXPECT_STREQ(kv::select_backend("cpu").name, "cpu"); }

TEST(Backend, UnknownDeviceIsUsageError) {
  try {
    kv::select_backend("tpu");
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::usage);
  }
}

TEST(Backend, CudaWithoutGpuIs69AndAutoFallsBack) {
  std::string why;
  if (kvk::cuda_ops(&why)) GTEST_SKIP() << "a GPU is present";
  try {
    kv::select_backend("cuda");
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), kv::Exit::unavailable);
    EXPECT_NE(std::string(e.what()).find("--device cuda:"), std::string::npos) << e.what();
  }
  EXPECT_STREQ(kv::select_backend("auto").name, "cpu");
}

TEST(BackendParity, ConvertMatchesCpu) {
  std::string why;
  const kvk::Ops* cuda = kvk::cuda_ops(&why);
  if (!cuda) GTEST_SKIP() << why;
  const size_t n = (size_t(1) << 20) + 13;
  std::vector<float> src(n);
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 100.0f);
  for (auto& x : src) x = g(rng);
  for (DType t : {DType::f16, DType::bf16, DType::f32}) {
    SCOPED_TRACE(kvk::dtype_name(t));
    std::vector<uint8_t> a(n * kvk::dtype_size(t)), b(a.size());
    kvk::cpu_ops().from_f32(t, src.data(), a.data(), n);
    cuda->from_f32(t, src.data(), b.data(), n);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size()), 0) << "rounding differs";
    std::vector<float> fa(n), fb(n);
    kvk::cpu_ops().to_f32(t, a.data(), fa.data(), n);
    cuda->to_f32(t, a.data(), fb.data(), n);
    EXPECT_EQ(std::memcmp(fa.data(), fb.data(), n * 4), 0);
  }
}

TEST(BackendParity, DecodeAttentionMatchesTheCpuReference) {
  std::string why;
  const kvk::Ops* cuda = kvk::cuda_ops(&why);
  if (!cuda) GTEST_SKIP() << why;
  std::mt19937 rng(9);
  std::normal_distribution<float> nd;
  for (DType t : {DType::f16, DType::bf16, DType::f32})
    for (int d : {64, 128})
      for (int G : {1, 4})
        for (int64_t n : {1, 100, 3000})
          for (bool masked : {false, true}) {
            SCOPED_TRACE(std::string(kvk::dtype_name(t)) + " d " + std::to_string(d) + " G " +
                         std::to_string(G) + " n " + std::to_string(n) + (masked ? " masked" : ""));
            const size_t kvn = size_t(n) * size_t(d);
            std::vector<float> k32(kvn), v32(kvn), q(size_t(G) * size_t(d)), bias(static_cast<size_t>(n));
            for (auto& x : k32) x = 2 * nd(rng);
            for (auto& x : v32) x = nd(rng);
            for (auto& x : q) x = nd(rng);
            // Masked: every third entry dropped (bias -inf), others with a merged mass.
            for (int64_t j = 0; j < n; ++j)
              bias[size_t(j)] = j % 3 == 1 && n > 1 ? -INFINITY : std::log(1.0f + float(j % 2));
            std::vector<uint8_t> k(kvn * kvk::dtype_size(t)), v(k.size());
            kvk::cpu_ops().from_f32(t, k32.data(), k.data(), kvn);
            kvk::cpu_ops().from_f32(t, v32.data(), v.data(), kvn);
            std::vector<float> got(q.size()), want(q.size());
            const float* b = masked ? bias.data() : nullptr;
            const float scale = 1.0f / std::sqrt(float(d));
            cuda->attend_head(t, k.data(), v.data(), n, d, q.data(), G, scale, b, got.data());
            kvk::attend_head_reference(t, k.data(), v.data(), n, d, q.data(), G, scale, b, want.data());
            for (size_t i = 0; i < got.size(); ++i)
              ASSERT_NEAR(got[i], want[i], 1e-4 * (1 + std::abs(want[i]))) << "i " << i;
          }
}
