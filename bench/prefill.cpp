// Prefill benchmark: tokens/s of the model runtime on stories260K and on a random-weight model
// of a realistic shape (written as GGUF by kvtk), GFLOP/s of the matrix products against a plain
// OpenMP SIMD GEMM measured in the same run, and the peak RSS of capturing 2k tokens with
// kv-capture (a child process reporting its own VmHWM).
//
//   bench-prefill [--models DIR] [--dir TMPDIR] [--tokens N] [--big-tokens N] [--rss-tokens N]
//                 [--skip-big]
#include <omp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "kv/model.h"
#include "kv/model_synth.h"
#include "kvk/ops.h"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The reference "plain" GEMM: Y = X W^T with an OpenMP loop over rows and an omp-simd dot.
void plain_gemm(const float* X, int64_t B, int64_t K, const float* W, int64_t N, float* Y) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < B; ++b) {
      float s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += X[b * K + k] * W[n * K + k];
      Y[b * N + n] = s;
    }
}

template <class F>
double best_of(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    f();
    best = std::min(best, seconds_since(t0));
  }
  return best;
}

double prefill_tokens_per_s(const kv::Model& m, int64_t n, int reps, double* secs) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[size_t(i)] = int32_t(i == 0 ? 1 : 3 + (i * 7919) % (m.config().vocab - 3));
  std::vector<float> logits;
  double t = best_of(reps, [&] {
    kv::Session s(m, n);
    s.forward(ids.data(), n, logits, false);
  });
  if (secs) *secs = t;
  return double(n) / t;
}

// FLOPs of the matrix products of a prefill of n tokens (2 per multiply-add; attention apart).
double linear_flops(const kv::ModelConfig& c, int64_t n) {
  const double kv_dim = double(c.n_kv_heads) * c.head_dim;
  const double per_layer = double(c.dim) * (2.0 * c.dim + 2.0 * kv_dim) + 3.0 * c.dim * c.hidden;
  return 2.0 * double(n) * (per_layer * c.n_layers + double(c.dim) * c.vocab / double(n));
}

}  // namespace

int main(int argc, char** argv) {
  std::string models = "../shared/models", dir = std::filesystem::temp_directory_path();
  int64_t tokens = 512, big_tokens = 256, rss_tokens = 2048;
  bool skip_big = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--models") models = next();
    else if (a == "--dir") dir = next();
    else if (a == "--tokens") tokens = std::stoll(next());
    else if (a == "--big-tokens") big_tokens = std::stoll(next());
    else if (a == "--rss-tokens") rss_tokens = std::stoll(next());
    else if (a == "--skip-big") skip_big = true;
    else {
      std::fprintf(stderr, "usage: bench-prefill [--models DIR] [--dir TMPDIR] [--tokens N] [--big-tokens N] [--rss-tokens N] [--skip-big]\n");
      return 64;
    }
  }
  std::printf("threads %d\n", omp_get_max_threads());

  // 1. GEMM: ours (kv::linear, f32 and f16 weights) vs the plain OpenMP SIMD GEMM.
  const int64_t B = 64, K = 2048, N = 8192;
  std::vector<float> X(size_t(B * K)), W(size_t(N * K)), Y(size_t(B * N));
  for (size_t i = 0; i < X.size(); ++i) X[i] = float(i % 13) * 0.01f - 0.05f;
  for (size_t i = 0; i < W.size(); ++i) W[i] = float(i % 7) * 0.01f - 0.03f;
  std::vector<uint16_t> W16(W.size());
  kvk::cpu_ops().from_f32(kvk::DType::f16, W.data(), W16.data(), W.size());
  const double flops = 2.0 * double(B) * double(K) * double(N);
  const double t_plain = best_of(3, [&] { plain_gemm(X.data(), B, K, W.data(), N, Y.data()); });
  kv::Weight w32{kv::GgmlType::F32, reinterpret_cast<const uint8_t*>(W.data()), N, K};
  kv::Weight w16{kv::GgmlType::F16, reinterpret_cast<const uint8_t*>(W16.data()), N, K};
  const double t32 = best_of(3, [&] { kv::linear(X.data(), B, w32, Y.data()); });
  const double t16 = best_of(3, [&] { kv::linear(X.data(), B, w16, Y.data()); });
  std::printf("\nmatrix products, X[%lld x %lld] W^T[%lld x %lld]:\n", (long long)B, (long long)K, (long long)K, (long long)N);
  std::printf("  plain OpenMP SIMD GEMM (f32)   %7.1f GFLOP/s\n", flops / t_plain / 1e9);
  std::printf("  kv::linear, f32 weights        %7.1f GFLOP/s  (%.2fx plain)\n", flops / t32 / 1e9, t_plain / t32);
  std::printf("  kv::linear, f16 weights        %7.1f GFLOP/s  (%.2fx plain)\n", flops / t16 / 1e9, t_plain / t16);

  // 2. stories260K.
  const std::string small = models + "/stories260K.gguf";
  if (std::ifstream(small)) {
    auto m = kv::Model::load(small);
    double secs = 0;
    const int64_t n = std::min<int64_t>(tokens, m->config().context);
    double tps = prefill_tokens_per_s(*m, n, 5, &secs);
    std::printf("\nstories260K prefill of %lld tokens: %.0f tokens/s (%.3f s), matrix products %.2f GFLOP/s\n",
                (long long)n, tps, secs, linear_flops(m->config(), n) / secs / 1e9);
  } else {
    std::printf("\nstories260K: %s not found (--models DIR)\n", small.c_str());
  }
  if (skip_big) return 0;

  // 3. A realistic shape, random f16 weights, written as GGUF by kvtk.
  kv::RandomModelSpec spec;
  kv::ModelConfig& c = spec.config;
  c.name = "random-2048x16";
  c.dim = 2048, c.hidden = 8192, c.n_layers = 16, c.n_heads = 32, c.n_kv_heads = 8;
  c.head_dim = 64, c.vocab = 32000, c.context = 4096, c.rope_dims = 64, c.rope_theta = 10000;
  const std::string path = dir + "/kvtk-bench-random-2048.gguf";
  auto t0 = Clock::now();
  kv::write_random_gguf(path, spec);
  std::printf("\nrandom model dim 2048, 16 layers, 32 heads / 8 KV, hidden 8192, vocab 32000, f16: "
              "%.2f GB written in %.1f s\n", double(std::filesystem::file_size(path)) / 1e9, seconds_since(t0));
  {
    auto m = kv::Model::load(path);
    double secs = 0;
    double tps = prefill_tokens_per_s(*m, big_tokens, 1, &secs);
    const double gflops = linear_flops(m->config(), big_tokens) / secs / 1e9;
    std::printf("  prefill of %lld tokens: %.1f tokens/s (%.2f s); matrix products %.1f GFLOP/s over the whole "
                "prefill = %.2fx the plain GEMM\n",
                (long long)big_tokens, tps, secs, gflops, gflops / (flops / t_plain / 1e9));
  }

  // 4. Peak RSS of `kv-capture` over rss_tokens tokens of that model, in a child process.
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").parent_path();
  const std::string ids_path = dir + "/kvtk-bench-ids.txt";
  {
    std::ofstream ids(ids_path);
    for (int64_t i = 0; i < rss_tokens; ++i) ids << (i == 0 ? 1 : 3 + (i * 7919) % 31990) << ' ';
  }
  const std::string cmd = "KV_REPORT_PEAK_RSS=1 " + self + "/kv-capture -q -m " + path + " --tokens " + ids_path +
                          " -o /dev/null 2>&1";
  t0 = Clock::now();
  FILE* p = popen(cmd.c_str(), "r");
  char line[512];
  long long rss = -1;
  while (p && std::fgets(line, sizeof line, p))
    if (const char* at = std::strstr(line, "peak_rss_bytes ")) rss = std::atoll(at + 15);
    else std::fputs(line, stdout);
  int status = p ? pclose(p) : -1;
  const double secs = seconds_since(t0);
  const double weights = double(std::filesystem::file_size(path));
  const double kv_bytes = 2.0 * 16 * 8 * 64 * 4 * double(rss_tokens);  // f32 cache in the runtime
  std::printf("  kv-capture of %lld tokens: exit %d, %.1f s, peak RSS %.2f GB (weights file %.2f GB, f32 KV "
              "cache %.2f GB)\n",
              (long long)rss_tokens, WEXITSTATUS(status), secs, double(rss) / 1e9, weights / 1e9, kv_bytes / 1e9);
  std::filesystem::remove(path);
  std::filesystem::remove(ids_path);
  return 0;
}
