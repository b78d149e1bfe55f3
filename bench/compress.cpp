// Encode and decode throughput of kv-compress's schemes on one 8B-shaped layer (8 KV heads x
// 32k tokens x 128 dims, f16 keys and values drawn from a normal distribution), in GB/s of f16
// values, as a fraction of the memory read bandwidth measured in the same run (issue targets:
// >= 5 GB/s encode for KIVI and q8_0/q4_0, >= 10 GB/s decode).
//
//   bench-compress [--tokens N] [--reps R] [--threads T]
//
// Encode is timed from the f16 values to the stored arrays (what the writer does); decode from
// the arrays to f32 values, as readers decode.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "kv/encoding.h"
#include "kv/snapshot.h"
#include "kv/tensor.h"

int main(int argc, char** argv) {
  int64_t tokens = 32768;
  int reps = 10, threads = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--tokens")
      tokens = std::atoll(argv[i + 1]);
    else if (a == "--reps")
      reps = std::atoi(argv[i + 1]);
    else if (a == "--threads")
      threads = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: bench-compress [--tokens N] [--reps R] [--threads T]\n");
      return 64;
    }
  }
  omp_set_num_threads(threads);
  kv::ModelInfo model;
  model.n_layers = 1;
  model.n_q_heads = 32;
  model.n_kv_heads = 8;
  model.head_dim = model.rope_dims = 128;
  const int D = model.head_dim, H = model.n_kv_heads;
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> positions;
  for (int h = 0; h < H; ++h) {
    offsets.push_back(offsets.back() + tokens);
    for (int64_t t = 0; t < tokens; ++t) positions.push_back(int32_t(t));
  }
  const int64_t n = offsets.back() * D;
  std::vector<float> values(static_cast<size_t>(n));
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (float& v : values) v = dist(rng);
  const kv::Tensor dense = kv::Tensor::from_f32(kv::DType::f16, offsets.back(), D, values.data());
  const kv::RowLayout rows{model, offsets, positions};
  const double f16_gb = double(n) * 2 / 1e9;

  const double bandwidth = kvbench::stream_read_gbps(size_t(1) << 30, threads, 5);
  std::printf(
      "bench-compress: %lld tokens x %d KV heads x %d dims (%.0f MiB of f16), %d threads, "
      "best of %d\nmemory read bandwidth %.1f GB/s\n\n",
      (long long)tokens, H, D, f16_gb * 1e9 / (1 << 20), threads, reps, bandwidth);
  std::printf("%-22s %8s %10s %9s %10s %9s %8s\n", "scheme", "bits", "encode", "of bw", "decode",
              "of bw", "rel.err");
  struct Case {
    const char* label;
    const char* scheme;
    char role;
    int bits;
  };
  const Case cases[] = {
      {"kivi-2 (keys)", "kivi", 'k', 2}, {"kivi-2 (values)", "kivi", 'v', 2},
      {"kivi-4 (keys)", "kivi", 'k', 4}, {"kivi-4 (values)", "kivi", 'v', 4},
      {"q8_0", "q8_0", 'k', 0},          {"q4_0", "q4_0", 'k', 0},
      {"fp8 e4m3", "fp8", 'k', 0},
  };
  // Decoded into tensor storage (64-byte aligned), as the snapshot reader decodes, its pages
  // touched once before the runs.
  kv::Tensor decoded_tensor(kv::DType::f32, offsets.back(), D);
  float* const decoded = decoded_tensor.as<float>();
  std::memset(decoded, 0, size_t(n) * sizeof(float));
  for (const Case& c : cases) {
    kv::Encoding e = kv::default_encoding(c.scheme, c.role);
    if (c.bits) e.bits = c.bits;
    double encode_s = 1e30, decode_s = 1e30;
    kv::Encoded enc;
    for (int r = 0; r < reps; ++r) {
      // As in the writer, which hands each layer's arrays back for the next one.
      kv::recycle(std::move(enc));
      double t0 = kvbench::now();
      enc = kv::encode(e, dense, rows);
      encode_s = std::min(encode_s, kvbench::now() - t0);
      t0 = kvbench::now();
      kv::decode(enc, rows, decoded);
      decode_s = std::min(decode_s, kvbench::now() - t0);
    }
    const std::vector<float> x = dense.to_f32();
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; ++i) {
      num += double(decoded[size_t(i)] - x[size_t(i)]) * (decoded[size_t(i)] - x[size_t(i)]);
      den += double(x[size_t(i)]) * x[size_t(i)];
    }
    const double enc_gbps = f16_gb / encode_s, dec_gbps = f16_gb / decode_s;
    std::printf("%-22s %8.3f %7.2f GB/s %8.2f %7.2f GB/s %8.2f %8.4f\n", c.label,
                8.0 * double(enc.bytes()) / double(n), enc_gbps, enc_gbps / bandwidth, dec_gbps,
                dec_gbps / bandwidth, std::sqrt(num / den));
  }
  return 0;
}
