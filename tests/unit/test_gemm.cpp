// The GEMM micro-kernel against a double-precision reference, over shapes that hit every
// remainder path (B % 6, N % 16, K of 0, 1 and odd sizes), and kv::linear over every weight type
// path (f32 pointer, dequantized f16 blocks) with and without threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <random>

#include "helpers.h"
#include "kv/model.h"
#include "kv/quant.h"
#include "kvk/ops.h"

namespace {
void reference(const std::vector<float>& X, int64_t B, int64_t K, const std::vector<float>& W,
               int64_t N, std::vector<double>& Y) {
  Y.assign(size_t(B * N), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        Y[size_t(b * N + n)] += double(X[size_t(b * K + k)]) * W[size_t(n * K + k)];
}
}  // namespace

TEST(Gemm, MatchesReferenceOnAllRemainders) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1, 1);
  for (int64_t B : {1, 5, 6, 7, 13}) {
    for (int64_t N : {1, 15, 16, 17, 40}) {
      for (int64_t K : {0, 1, 8, 67}) {
        std::vector<float> X(size_t(B * K)), W(size_t(N * K)), Y(size_t(B * N), -7.0f);
        for (auto& x : X) x = u(rng);
        for (auto& w : W) w = u(rng);
        std::vector<double> want;
        reference(X, B, K, W, N, want);
        kvk::gemm_nt(X.data(), B, K, W.data(), N, Y.data(), N);
        for (size_t i = 0; i < Y.size(); ++i)
          ASSERT_NEAR(Y[i], want[i], 1e-4 * double(K))
              << "B " << B << " N " << N << " K " << K << " i " << i;
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
        // Relative error: the polynomial's ~2e-7 and the sum's rounding, plus the f32 rounding of
        // the logit, which exp turns into a relative error proportional to its distance below the
        // maximum.
        const double tol = 1e-6 * (1 + std::abs(arg[size_t(j)] - mx)) * (ref[size_t(j)] / z);
        ASSERT_NEAR(x[size_t(j)], ref[size_t(j)] / z, tol) << "n " << n << " j " << j;
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

// Two keys on one channel, k = 0 and ln 3, so a query q = 1 that sees both weighs them 1/4 and
// 3/4; a second query of the group sees only the first key (weight 1), a third sees nothing.
TEST(AttentionVotes, ByHand) {
  const float keys[2] = {0.0f, std::log(3.0f)};
  const float q[3] = {1.0f, 1.0f, 1.0f};
  const int64_t visible[3] = {2, 1, 0};
  for (auto* votes_of : {&kvk::attention_votes, &kvk::attention_votes_reference}) {
    float votes[2] = {-1, -1};
    votes_of(q, 3, visible, 3, kvk::DType::f32, keys, 2, 1, 1.0f, nullptr, votes);
    EXPECT_NEAR(votes[0], 1.25f, 1e-6);
    EXPECT_NEAR(votes[1], 0.75f, 1e-6);
  }
  // A bias of ln 3 on the first key makes the two keys equal for the first query.
  const float bias[2] = {std::log(3.0f), 0.0f};
  float votes[2];
  kvk::attention_votes(q, 3, visible, 3, kvk::DType::f32, keys, 2, 1, 1.0f, bias, votes);
  EXPECT_NEAR(votes[0], 1.5f, 1e-6);
  EXPECT_NEAR(votes[1], 0.5f, 1e-6);
}

// Head dimension 0: every logit is 0, so attention is uniform over the visible keys and the
// output (of no values) is empty; nothing is read or divided by zero.
TEST(AttentionVotes, ZeroDimensionIsUniform) {
  const float k[1] = {0}, q[2] = {0, 0};
  const int64_t visible[2] = {4, 2};
  float votes[4] = {-1, -1, -1, -1};
  kvk::attention_votes(q, 2, visible, 2, kvk::DType::f32, k, 4, 0, 1.0f, nullptr, votes);
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(votes[j], j < 2 ? 0.75f : 0.25f, 1e-6) << j;
  float out[1] = {7};
  kvk::attend_head(kvk::DType::f16, k, k, 3, 0, q, 1, 1.0f, nullptr, out);
  EXPECT_EQ(out[0], 7.0f);  // d = 0: no output values, none written
}

// The AVX-512 path (on CPUs that have it) against the reference over shapes that hit its
// remainders: key tiles of 12 and chunks of 240, query blocks of 32, groups that are and are not
// multiples of 16, every key type, bias, and causal prefixes including none and all. Logits grow
// along the keys so that the running maximum moves from chunk to chunk.
TEST(AttentionVotes, MatchesTheReferenceOnAllRemainders) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int cases = 0;
  for (int64_t n : {1, 12, 13, 239, 240, 241, 1000})
    for (int d : {1, 7, 64})
      for (int64_t group : {1, 5, 16, 32})
        for (int64_t groups : {1, 3}) {
          const int64_t n_q = group * groups;
          const auto type =
              std::array{kvk::DType::f32, kvk::DType::f16, kvk::DType::bf16}[cases % 3];
          const bool with_bias = cases % 2 == 1;
          ++cases;
          std::vector<float> q(static_cast<size_t>(n_q * d)), k32(static_cast<size_t>(n * d)),
              bias(static_cast<size_t>(n));
          for (auto& x : q) x = normal(rng);
          for (int64_t j = 0; j < n; ++j)
            for (int c = 0; c < d; ++c) k32[size_t(j * d + c)] = normal(rng) + 0.004f * float(j);
          for (auto& b : bias) b = -std::abs(normal(rng));
          // Merged-away entries (mass 0) have bias -inf: whole chunks where a query sees only
          // those must add nothing (not 0 * inf) once later chunks set its maximum.
          if (n == 1000)
            for (int64_t j = 0; j < 300; ++j) bias[size_t(j)] = -INFINITY;
          std::vector<uint16_t> k16(k32.size());
          if (type != kvk::DType::f32)
            kvk::cpu_ops().from_f32(type, k32.data(), k16.data(), k32.size());
          const void* k =
              type == kvk::DType::f32 ? static_cast<const void*>(k32.data()) : k16.data();
          std::vector<int64_t> visible(static_cast<size_t>(n_q));
          for (int64_t i = 0; i < n_q; ++i)
            visible[size_t(i)] = i % 7 == 3   ? 0
                                 : i % 7 == 4 ? n + 5
                                              : int64_t(rng() % uint32_t(n + 1));
          std::vector<float> got(size_t(groups * n), -1.0f), want(size_t(groups * n), -2.0f);
          const float scale = 1.0f / std::sqrt(float(d));
          const float* b = with_bias ? bias.data() : nullptr;
          kvk::attention_votes(q.data(), n_q, visible.data(), group, type, k, n, d, scale, b,
                               got.data());
          kvk::attention_votes_reference(q.data(), n_q, visible.data(), group, type, k, n, d, scale,
                                         b, want.data());
          double total = 0;
          for (size_t i = 0; i < got.size(); ++i) {
            ASSERT_NEAR(got[i], want[i], 2e-6 * double(group) + 1e-5 * want[i])
                << "n " << n << " d " << d << " group " << group << " groups " << groups << " i "
                << i;
            total += got[i];
          }
          // Each query that sees a key of finite bias spreads a weight of exactly 1 over the keys.
          int64_t seeing = 0;
          const int64_t first_weighed = with_bias && n == 1000 ? 300 : 0;
          for (int64_t v : visible) seeing += v > first_weighed;
          EXPECT_NEAR(total, double(seeing), 1e-4 * double(seeing) + 1e-6);
        }
}

// d picks the kernel: multiples of 16 the AVX-512 one where the CPU has it (scores in blocks of
// 16 / G keys: G of 1, 2, 4 and 8 + 1 for 9), other multiples of 8 the AVX2 one (24: a final
// 8-channel step in the value pass, which walks 16 channels at a time), the rest the scalar
// reference.
TEST(DecodeAttention, MatchesTheDoubleReferenceForEveryTypeAndShape) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  for (kvk::DType type : {kvk::DType::f32, kvk::DType::f16, kvk::DType::bf16})
    for (int d : {8, 16, 24, 48, 64, 128, 12})
      for (int64_t n : {1, 7, 64, 65, 300})
        for (int G : {1, 2, 4, 9})
          for (bool with_bias : {false, true}) {
            const size_t kvn = size_t(n) * size_t(d);
            std::vector<float> k32(kvn), v32(kvn), q(size_t(G) * size_t(d)),
                bias(static_cast<size_t>(n));
            for (auto& x : k32) x = 2 * nd(rng);
            for (auto& x : v32) x = nd(rng);
            for (auto& x : q) x = nd(rng);
            for (auto& x : bias) x = with_bias ? std::log(1.0f + float(rng() % 3)) : 0.0f;
            std::vector<uint16_t> k16(kvn), v16(kvn);
            for (size_t i = 0; i < kvn; ++i) {
              k16[i] = type == kvk::DType::f16 ? kvk::f32_to_f16(k32[i]) : kvk::f32_to_bf16(k32[i]);
              v16[i] = type == kvk::DType::f16 ? kvk::f32_to_f16(v32[i]) : kvk::f32_to_bf16(v32[i]);
            }
            const void* k =
                type == kvk::DType::f32 ? static_cast<const void*>(k32.data()) : k16.data();
            const void* v =
                type == kvk::DType::f32 ? static_cast<const void*>(v32.data()) : v16.data();
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

namespace {

// q4_0 rows of random values, as kv::quant writes them (llama.cpp's blocks).
// Keys and values [n, d] and G queries [G, d] drawn from N(0, 1) with the given seed.
struct Head {
  std::vector<float> k, v, q;
};
Head normal_head(unsigned seed, int64_t n, int d, int G) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  Head h{std::vector<float>(size_t(n) * size_t(d)), std::vector<float>(size_t(n) * size_t(d)),
         std::vector<float>(size_t(G) * size_t(d))};
  for (auto* a : {&h.k, &h.v, &h.q})
    for (float& x : *a) x = nd(rng);
  return h;
}

std::vector<uint8_t> q4_0_rows(const std::vector<float>& x) {
  std::vector<uint8_t> out(kv::quant::q4_0_bytes(int64_t(x.size())));
  kv::quant::encode_q4_0(x.data(), int64_t(x.size()), out.data());
  return out;
}

double max_row_error(const std::vector<float>& got, const std::vector<float>& want, int d) {
  double worst = 0;
  for (size_t r = 0; r < want.size() / size_t(d); ++r) {
    double diff = 0, norm = 0;
    for (int i = 0; i < d; ++i) {
      const double a = got[r * size_t(d) + size_t(i)], b = want[r * size_t(d) + size_t(i)];
      diff += (a - b) * (a - b);
      norm += b * b;
    }
    worst = std::max(worst, std::sqrt(diff / std::max(norm, 1e-30)));
  }
  return worst;
}

// The kernel's arithmetic in plain double-precision loops: the same roundings (queries to
// q8_0 per block; per chunk of 64 keys, query and block, the weights p d to s8 against the bound
// max p (over the chunk) * max |d| (over its keys in groups of 4); keys past the last group of 16
// and values past the last group of 4 of a chunk in f32), so that a slip in the kernel's lanes or
// transposes shows as a large difference.
std::vector<float> q4_0_emulation(const std::vector<uint8_t>& kq, const std::vector<uint8_t>& vq,
                                  int64_t n, int d, const std::vector<float>& q, int G, float scale,
                                  const float* bias) {
  const int nb = d / 32;
  const size_t rb = kvk::q4_0_row_bytes(d);
  auto code = [&](const std::vector<uint8_t>& rows, int64_t j, int i) {
    const uint8_t byte = rows[size_t(j) * rb + size_t(i / 32) * 18 + 2 + size_t(i % 16)];
    return (i % 32 < 16 ? byte & 15 : byte >> 4);
  };
  auto block_scale = [&](const std::vector<uint8_t>& rows, int64_t j, int b) {
    uint16_t h;
    std::memcpy(&h, &rows[size_t(j) * rb + size_t(b) * 18], 2);
    return double(kvk::f16_to_f32(h));
  };
  std::vector<float> out(size_t(G) * size_t(d));
  for (int g = 0; g < G; ++g) {
    const float* qg = q.data() + g * d;
    std::vector<int> q8(static_cast<size_t>(d));
    std::vector<double> qs(static_cast<size_t>(nb));
    for (int b = 0; b < nb; ++b) {
      float amax = 0;
      for (int t = 0; t < 32; ++t) amax = std::max(amax, std::fabs(qg[b * 32 + t]));
      const float sc = amax / 127, inv = sc > 0 ? 1 / sc : 0;
      qs[size_t(b)] = sc;
      for (int t = 0; t < 32; ++t)
        q8[size_t(b * 32 + t)] = int(std::nearbyint(qg[b * 32 + t] * inv));
    }
    double m = -INFINITY, l = 0;
    std::vector<double> o(static_cast<size_t>(d), 0.0);
    for (int64_t c0 = 0; c0 < n; c0 += 64) {
      const int64_t C = std::min<int64_t>(64, n - c0), C16 = C / 16 * 16, C4 = C / 4 * 4;
      std::vector<double> sc(static_cast<size_t>(C));
      for (int64_t j = 0; j < C; ++j) {
        double dot = 0;
        for (int b = 0; b < nb; ++b) {
          if (j < C16) {
            long sum = 0, qsum = 0;
            for (int t = 0; t < 32; ++t) {
              sum += long(code(kq, c0 + j, b * 32 + t)) * q8[size_t(b * 32 + t)];
              qsum += q8[size_t(b * 32 + t)];
            }
            dot += block_scale(kq, c0 + j, b) * qs[size_t(b)] * double(sum - 8 * qsum);
          } else {
            for (int t = 0; t < 32; ++t)
              dot += double(qg[b * 32 + t]) * block_scale(kq, c0 + j, b) *
                     (code(kq, c0 + j, b * 32 + t) - 8);
          }
        }
        sc[size_t(j)] = dot * scale + (bias ? bias[c0 + j] : 0.0);
      }
      const std::vector<double> p = online_softmax_step(sc, m, l, o);
      float pmax = 0;
      for (int64_t j = 0; j < C; ++j) pmax = std::max(pmax, float(p[size_t(j)]));
      for (int b = 0; b < nb; ++b) {
        float dmax = 0;
        for (int64_t j = 0; j < C4; ++j)
          dmax = std::max(dmax, std::fabs(float(block_scale(vq, c0 + j, b))));
        const float a = pmax * dmax / 127,
                    inv = (dmax > 0 ? 127 / dmax : 0) * (pmax > 0 ? 1 / pmax : 0);
        for (int64_t j = 0; j < C; ++j) {
          const double w = j < C4 ? a * std::nearbyint(float(p[size_t(j)]) *
                                                       float(block_scale(vq, c0 + j, b)) * inv)
                                  : p[size_t(j)] * block_scale(vq, c0 + j, b);
          for (int t = 0; t < 32; ++t)
            o[size_t(b * 32 + t)] += w * (code(vq, c0 + j, b * 32 + t) - 8);
        }
      }
    }
    for (int i = 0; i < d; ++i) out[size_t(g * d + i)] = l > 0 ? float(o[size_t(i)] / l) : 0.0f;
  }
  return out;
}

}  // namespace

// The reference decodes q4_0 rows exactly as kv::quant does: its attention is the f32 one.
TEST(DecodeAttentionQ4_0, ReferenceDecodesLikeLibkv) {
  const int d = 64, G = 4;
  const int64_t n = 37;
  const auto [k, v, q] = normal_head(11, n, d, G);
  const auto kq = q4_0_rows(k), vq = q4_0_rows(v);
  std::vector<float> k32(k.size()), v32(v.size()), got(q.size()), want(q.size());
  kv::quant::decode_q4_0(kq.data(), int64_t(k.size()), k32.data());
  kv::quant::decode_q4_0(vq.data(), int64_t(v.size()), v32.data());
  kvk::attend_head_q4_0_reference(kq.data(), vq.data(), n, d, q.data(), G, 0.125f, nullptr,
                                  got.data());
  kvk::attend_head_reference(kvk::DType::f32, k32.data(), v32.data(), n, d, q.data(), G, 0.125f,
                             nullptr, want.data());
  EXPECT_EQ(got, want);
  EXPECT_EQ(kvk::q4_0_row_bytes(128), 72u);
}

// On the codes, the kernel differs from the reference only by its roundings (queries to q8_0,
// weights to 8 bits per chunk): every output row within 3% (relative L2; about 1.5% at worst
// here, where near-uniform weights over random values make a small output), and close to
// the emulation of those roundings (5e-3: a weight at a rounding boundary can round the other
// way, exp8 against std::exp), over shapes that hit every remainder path (keys past the
// last group of 16 or 4, chunks, G passes, bias).
TEST(DecodeAttentionQ4_0, MatchesTheReferenceWithinItsRoundings) {
  std::mt19937 rng(12);
  std::normal_distribution<float> nd;
  double worst = 0, worst_slip = 0;
  bool any_difference = false;
  for (int d : {32, 64, 128, 160})  // 160: five blocks a row, the scales by gathers
    for (int64_t n : {1, 3, 15, 16, 17, 63, 64, 65, 130, 1000})
      for (int G : {1, 4, 5, 8})
        for (bool with_bias : {false, true}) {
          std::vector<float> k(size_t(n) * size_t(d)), v(k.size()), q(size_t(G) * size_t(d)),
              bias(static_cast<size_t>(n));
          for (float& x : k) x = 2 * nd(rng);
          for (float& x : v) x = nd(rng);
          for (float& x : q) x = nd(rng) / 4;
          for (float& x : bias) x = with_bias ? std::log(1.0f + float(rng() % 3)) : 0.0f;
          const auto kq = q4_0_rows(k), vq = q4_0_rows(v);
          const float scale = 1.0f / std::sqrt(float(d));
          const float* b = with_bias ? bias.data() : nullptr;
          std::vector<float> got(q.size()), want(q.size());
          kvk::attend_head_q4_0(kq.data(), vq.data(), n, d, q.data(), G, scale, b, got.data());
          kvk::attend_head_q4_0_reference(kq.data(), vq.data(), n, d, q.data(), G, scale, b,
                                          want.data());
          const double e = max_row_error(got, want, d);
          EXPECT_LT(e, 3e-2) << "d " << d << " n " << n << " G " << G << " bias " << with_bias;
          if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi")) {
            const double slip = max_row_error(got, q4_0_emulation(kq, vq, n, d, q, G, scale, b), d);
            EXPECT_LT(slip, 5e-3) << "emulation: d " << d << " n " << n << " G " << G;
            worst_slip = std::max(worst_slip, slip);
          }
          worst = std::max(worst, e);
          any_difference = any_difference || got != want;
        }
  std::printf(
      "q4_0 kernel: worst row relative error %.2e vs the reference, %.2e vs the emulation\n", worst,
      worst_slip);
  // Where the CPU has the instructions, the integer path really ran (its roundings show).
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi")) {
    EXPECT_TRUE(any_difference);
  }
}

// With all scores equal and every value block's scale equal, each weight rounds exactly (to 127):
// the value path is then exact, and the output is the mean of the decoded values.
TEST(DecodeAttentionQ4_0, EqualWeightsAreExact) {
  const int d = 32, G = 1;
  const int64_t n = 64;
  std::vector<float> k(size_t(n) * d, 0.5f), v(k.size()), q(d, 0.0f);
  for (int64_t j = 0; j < n; ++j)
    for (int i = 0; i < d; ++i)
      v[size_t(j * d + i)] = float((j + i) % 15 - 7);     // max |v| 7 or 8...
  for (int64_t j = 0; j < n; ++j) v[size_t(j * d)] = -8;  // ...so every block's scale is 1
  const auto kq = q4_0_rows(k), vq = q4_0_rows(v);
  std::vector<float> got(d), want(d, 0.0f);
  kvk::attend_head_q4_0(kq.data(), vq.data(), n, d, q.data(), G, 1.0f, nullptr, got.data());
  for (int64_t j = 0; j < n; ++j)
    for (int i = 0; i < d; ++i) want[size_t(i)] += v[size_t(j * d + i)] / float(n);
  for (int i = 0; i < d; ++i) EXPECT_NEAR(got[size_t(i)], want[size_t(i)], 1e-5) << i;
}

// Keys masked with a bias of -inf, a whole first chunk of them and more: they get no weight, and
// the output is the attention over the others (not NaN), in both kernels.
TEST(DecodeAttention, FullyMaskedChunksAddNothing) {
  const int d = 64, G = 4;
  const int64_t n = 200;
  const auto [k, v, q] = normal_head(13, n, d, G);
  for (int64_t masked : {64, 100, 128}) {
    std::vector<float> bias(static_cast<size_t>(n), 0.0f);
    std::fill(bias.begin(), bias.begin() + masked, -INFINITY);
    std::vector<float> got(q.size()), want(q.size());
    kvk::attend_head(kvk::DType::f32, k.data(), v.data(), n, d, q.data(), G, 0.125f, bias.data(),
                     got.data());
    kvk::attend_head_reference(kvk::DType::f32, k.data(), v.data(), n, d, q.data(), G, 0.125f,
                               bias.data(), want.data());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_NEAR(got[i], want[i], 1e-4) << masked << " " << i;
    const auto kq = q4_0_rows(k), vq = q4_0_rows(v);
    kvk::attend_head_q4_0(kq.data(), vq.data(), n, d, q.data(), G, 0.125f, bias.data(), got.data());
    kvk::attend_head_q4_0_reference(kq.data(), vq.data(), n, d, q.data(), G, 0.125f, bias.data(),
                                    want.data());
    EXPECT_LT(max_row_error(got, want, d), 3e-2) << masked;
  }
}

// The reference reads the n*d values as one run of blocks, so any head_dim works there (here 48:
// blocks straddle rows); a non-finite query gives a non-finite output, as in the reference.
TEST(DecodeAttentionQ4_0, AnyHeadDimAndNonFiniteQueries) {
  const int d = 48, G = 2;
  const int64_t n = 22;  // 1056 values, 33 blocks
  const auto [k, v, q] = normal_head(14, n, d, G);
  const auto kq = q4_0_rows(k), vq = q4_0_rows(v);
  std::vector<float> k32(kq.size() / 18 * 32), v32(k32.size()), got(q.size()), want(q.size());
  kv::quant::decode_q4_0(kq.data(), int64_t(k32.size()), k32.data());
  kv::quant::decode_q4_0(vq.data(), int64_t(v32.size()), v32.data());
  kvk::attend_head_q4_0(kq.data(), vq.data(), n, d, q.data(), G, 0.2f, nullptr, got.data());
  kvk::attend_head_reference(kvk::DType::f32, k32.data(), v32.data(), n, d, q.data(), G, 0.2f,
                             nullptr, want.data());
  EXPECT_EQ(got, want);
  EXPECT_FALSE(kvk::q4_0_codes_supported(48));
  const auto k64 = q4_0_rows(std::vector<float>(size_t(n) * 64, 1.0f));
  std::vector<float> q64(size_t(G) * 64, 0.5f), o64(q64.size());
  q64[5] = INFINITY;
  kvk::attend_head_q4_0(k64.data(), k64.data(), n, 64, q64.data(), G, 0.2f, nullptr, o64.data());
  for (float x : o64) EXPECT_FALSE(std::isfinite(x));
}
