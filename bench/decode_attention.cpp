// bench-decode-attention: one decode step of attention over a whole 8B-shaped cache (llama3-8b:
// 32 layers, 32 query heads, 8 KV heads, head_dim 128) held dense in f16, at 8k and 32k tokens,
// on the CPU with OpenMP over KV heads. A decode step must read every byte of K and V once, so
// its limit is bytes / memory bandwidth: the figure is the achieved GB/s as a fraction of a
// STREAM-like read measured in the same run (target >= 0.7, kv-eval issue). Then the same step
// over the same cache quantized to q4_0 and to KIVI-2, each on its codes (kvk::attend_head_q4_0,
// kvk::attend_head_kivi2), as a speedup over dense f16 (target >= 2.5x at 32k), with its error
// against attention over the decoded values.
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "kv/attention.h"
#include "kv/encoding.h"
#include "kv/quant.h"
#include "kv/snapshot.h"
#include "kvk/ops.h"

namespace {

constexpr int kLayers = 32, kQHeads = 32, kKvHeads = 8, kDim = 128, kGroup = kQHeads / kKvHeads;

// Cheap deterministic f16 values in about [-2, 2): what matters here is the bytes, not them.
void fill_f16(std::vector<uint16_t>& a, uint64_t seed) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < a.size(); ++i) {
    uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ seed;
    x ^= x >> 29;
    a[i] = kvk::f32_to_f16(float(int64_t(x % 4096) - 2048) / 1024.0f);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> token_counts = {8192, 32768};
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc)
      token_counts = {std::atoll(argv[++i])};
    else if (a == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench-decode-attention [--tokens T] [--reps N]\n");
      return 64;
    }
  }
  const int threads = omp_get_max_threads();
  std::printf(
      "bench-decode-attention: llama3-8b shape (32 layers, 32/8 heads, head_dim 128), f16 "
      "K and V, %d threads\n  read bandwidth: STREAM-like sum over 1 GiB, sampled before each "
      "timed step of the row, best\n",
      threads);
  std::printf("  %8s %10s %10s %10s %10s %8s\n", "tokens", "KV bytes", "step ms", "GB/s", "bw GB/s",
              "of bw");
  for (int64_t T : token_counts) {
    const size_t per_head = size_t(T) * kDim;
    // Every layer and head in its own allocation, as a cache would be, and all of it larger
    // than the caches, so each step streams from memory.
    std::vector<std::vector<uint16_t>> K(kLayers * kKvHeads), V(kLayers * kKvHeads);
    for (size_t i = 0; i < K.size(); ++i) {
      K[i].resize(per_head);
      V[i].resize(per_head);
      fill_f16(K[i], 2 * i + 1);
      fill_f16(V[i], 2 * i + 2);
    }
    std::vector<float> q(size_t(kLayers) * kQHeads * kDim), out(q.size());
    for (size_t i = 0; i < q.size(); ++i) q[i] = float(int(i % 17) - 8) / 8.0f;
    const float scale = 1.0f / std::sqrt(float(kDim));
    // The best of `reps` decode steps (after a warm-up): per layer, one attend(head, qrow) per KV
    // head, OpenMP over them.
    // The machine's read bandwidth moves by a third over minutes on this shared VM, so it is
    // sampled next to each timed step and the best sample is the row's reference.
    double bw = 0;
    auto time_step = [&](auto attend) {
      double best = 1e30;
      bw = 0;
      for (int r = 0; r <= reps; ++r) {
        if (r > 0) bw = std::max(bw, kvbench::stream_read_gbps(size_t(1) << 30, threads, 1));
        const double t0 = kvbench::now();
        for (int l = 0; l < kLayers; ++l) {
#pragma omp parallel for schedule(static)
          for (int h = 0; h < kKvHeads; ++h)
            attend(size_t(l) * kKvHeads + size_t(h),
                   (size_t(l) * kQHeads + size_t(h) * kGroup) * kDim);
        }
        if (r > 0) best = std::min(best, kvbench::now() - t0);
      }
      return best;
    };
    const double best = time_step([&](size_t head, size_t qrow) {
      kvk::attend_head(kvk::DType::f16, K[head].data(), V[head].data(), T, kDim, &q[qrow], kGroup,
                       scale, nullptr, &out[qrow]);
    });
    const double bytes = 2.0 * double(kLayers) * kKvHeads * double(per_head) * 2;
    double check = 0;
    for (float x : out) check += std::abs(x);
    std::printf("  %8lld %8.2f GiB %10.1f %10.1f %10.1f %7.0f%%   (checksum %.3f)\n", (long long)T,
                bytes / double(1 << 30), best * 1e3, bytes / best / 1e9, bw,
                100.0 * bytes / best / 1e9 / bw, check);
    // The same cache as q4_0 blocks and as KIVI-2 (libkv's kivi encoding: 2 bits, groups of
    // 32, the last 128 rows dense), the dense copy freed layer by layer (all three would not fit
    // everywhere).
    std::vector<std::vector<uint8_t>> Kq(K.size()), Vq(V.size());
    kv::ModelInfo model;
    model.n_layers = kLayers;
    model.n_q_heads = kQHeads;
    model.n_kv_heads = kKvHeads;
    model.head_dim = model.rope_dims = kDim;
    std::vector<int64_t> offsets;
    for (int h = 0; h <= kKvHeads; ++h) offsets.push_back(h * T);
    const std::vector<int32_t> positions(size_t(kKvHeads) * size_t(T), 0);
    const kv::RowLayout rows{model, offsets, positions};
    std::vector<kv::Encoded> kivi_k(kLayers), kivi_v(kLayers);
    std::vector<std::vector<kvk::Kivi2Head>> kivi(kLayers);
    {
      std::vector<float> layer_k(size_t(kKvHeads) * per_head), layer_v(layer_k.size());
      for (int l = 0; l < kLayers; ++l) {
        for (int h = 0; h < kKvHeads; ++h) {
          const size_t i = size_t(l) * kKvHeads + size_t(h);
          for (auto [from, to, f32] : {std::tuple{&K[i], &Kq[i], &layer_k[size_t(h) * per_head]},
                                       std::tuple{&V[i], &Vq[i], &layer_v[size_t(h) * per_head]}}) {
            kvk::cpu_ops().to_f32(kvk::DType::f16, from->data(), f32, per_head);
            to->resize(kv::quant::q4_0_bytes(int64_t(per_head)));
            kv::quant::encode_q4_0(f32, int64_t(per_head), to->data());
            std::vector<uint16_t>().swap(*from);
          }
        }
        kivi_k[size_t(l)] = kv::encode(kv::default_encoding("kivi", 'k'), layer_k.data(), rows);
        kivi_v[size_t(l)] = kv::encode(kv::default_encoding("kivi", 'v'), layer_v.data(), rows);
        kivi[size_t(l)] = kv::kivi2_heads(kivi_k[size_t(l)], kivi_v[size_t(l)], rows);
      }
    }
    // One step on codes: its time, its speedup over dense f16, and its error on layer 0 against
    // attention over the decoded values (what the codes hold), mean relative L2 over the rows.
    auto on_codes = [&](const char* name, double stored_bytes, auto attend, auto reference) {
      std::vector<float> got(q.size());
      const double t = time_step([&](size_t head, size_t qrow) { attend(head, qrow, &got[qrow]); });
      std::vector<float> want(size_t(kKvHeads) * kGroup * kDim);
#pragma omp parallel for schedule(static)
      for (int h = 0; h < kKvHeads; ++h) {
        const size_t qrow = size_t(h) * kGroup * kDim;
        reference(size_t(h), qrow, &want[qrow]);
      }
      const double err = kv::mean_relative_error(got.data(), want.data(), kKvHeads * kGroup, kDim);
      std::printf(
          "  %8lld %8.2f GiB %10.1f %10.1f %10.1f %7.0f%%   %s on its codes: %.2fx dense f16; "
          "error vs decoded %.1e\n",
          (long long)T, stored_bytes / double(1 << 30), t * 1e3, stored_bytes / t / 1e9, bw,
          100.0 * stored_bytes / t / 1e9 / bw, name, best / t, err);
    };
    on_codes(
        "q4_0", 2.0 * double(kLayers) * kKvHeads * double(Kq[0].size()),
        [&](size_t head, size_t qrow, float* o) {
          kvk::attend_head_q4_0(Kq[head].data(), Vq[head].data(), T, kDim, &q[qrow], kGroup, scale,
                                nullptr, o);
        },
        [&](size_t h, size_t qrow, float* o) {
          kvk::attend_head_q4_0_reference(Kq[h].data(), Vq[h].data(), T, kDim, &q[qrow], kGroup,
                                          scale, nullptr, o);
        });
    std::vector<std::vector<uint8_t>>().swap(Kq);
    std::vector<std::vector<uint8_t>>().swap(Vq);
    double kivi_bytes = 0;
    for (int l = 0; l < kLayers; ++l)
      kivi_bytes += double(kivi_k[size_t(l)].bytes() + kivi_v[size_t(l)].bytes());
    on_codes(
        "KIVI-2", kivi_bytes,
        [&](size_t head, size_t qrow, float* o) {
          kvk::attend_head_kivi2(kivi[head / kKvHeads][head % kKvHeads], kDim, &q[qrow], kGroup,
                                 scale, nullptr, o);
        },
        [&](size_t h, size_t qrow, float* o) {
          kvk::attend_head_kivi2_reference(kivi[0][h], kDim, &q[qrow], kGroup, scale, nullptr, o);
        });
  }
  return 0;
}
