// Backend parity in the style of llama.cpp's test-backend-ops: every op of the CUDA table
// against the CPU reference on the same inputs. Skips without a usable GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

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
