// Decode attention on KIVI-2 codes (kvk::attend_head_kivi2) over caches that libkv's own encoder
// wrote (kv::encode, kv::kivi2_heads): the reference against kv::decode, the kernel against the
// reference within its roundings and against a plain-loop emulation of those roundings.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <random>

#include "helpers.h"
#include "kv/encoding.h"
#include "kv/snapshot.h"
#include "kvk/ops.h"
#include "simd512.h"  // kernels/cpu: the exp under test (this file is built as the kernels are)

namespace {

// A layer of KV heads with the given row counts, its keys and values drawn from N(0, 1) (keys
// with a few larger channels, as real keys have), encoded by libkv as kivi.
struct Kivi2Layer {
  kv::ModelInfo model;
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> positions;
  std::vector<float> k, v;
  kv::Encoded ke, ve;
  Kivi2Layer(int D, const std::vector<int64_t>& rows_per_head, int residual, bool symmetric,
             unsigned seed) {
    model.n_layers = 1;
    model.n_kv_heads = model.n_q_heads = int(rows_per_head.size());
    model.head_dim = model.rope_dims = D;
    for (int64_t n : rows_per_head) {
      offsets.push_back(offsets.back() + n);
      for (int64_t p = 0; p < n; ++p) positions.push_back(int32_t(p));
    }
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    k.resize(size_t(offsets.back()) * size_t(D));
    v.resize(k.size());
    for (size_t i = 0; i < k.size(); ++i) k[i] = nd(rng) * (i % size_t(D) % 7 == 3 ? 4.0f : 1.0f);
    for (float& x : v) x = nd(rng);
    kv::Encoding kenc = kv::default_encoding("kivi", 'k'), venc = kv::default_encoding("kivi", 'v');
    for (kv::Encoding* e : {&kenc, &venc}) {
      e->residual = residual;
      e->symmetric = symmetric;
    }
    ke = kv::encode(kenc, k.data(), rows());
    ve = kv::encode(venc, v.data(), rows());
  }
  kv::RowLayout rows() const { return {model, offsets, positions}; }
};

int code_at(const uint8_t* codes, int64_t i) {
  return (codes[i / 4] >> (2 * (i % 4))) & 3;
}

double row_error(const float* got, const float* want, int d) {
  double diff = 0, norm = 0;
  for (int i = 0; i < d; ++i) {
    diff += double(got[i] - want[i]) * double(got[i] - want[i]);
    norm += double(want[i]) * double(want[i]);
  }
  return std::sqrt(diff / std::max(norm, 1e-30));
}

// The kernel's arithmetic in plain loops, double where the kernel has no rounding of its own:
// per key group of 32 rows and query, a = q S (f32) to s8 against max |a|, 1.5 times the sum of
// the rounding residuals added back; per whole chunk of 64 rows, query and value block, p S to u8
// against max p * max |S|, times the centred codes 2c - 3; the rest in f32 from the decoded rows. A
// slip in the kernel's lanes or permutes shows as a large difference.
std::vector<float> emulation(const kvk::Kivi2Head& h, int d, const float* q, int G, float scale,
                             const float* bias) {
  const int nb = d / 32;
  const int64_t n = h.n_quant + h.n_residual, whole = h.n_quant / 64 * 64;
  auto f16 = [](uint16_t x) { return kvk::f16_to_f32(x); };
  auto k_zero = [&](int64_t grp, int c) {
    return h.k_zeros ? f16(h.k_zeros[grp * d + c]) : -2 * f16(h.k_scales[grp * d + c]);
  };
  auto v_scale = [&](int64_t t, int blk) { return f16(h.v_scales[t * nb + blk]); };
  auto v_zero = [&](int64_t t, int blk) {
    return h.v_zeros ? f16(h.v_zeros[t * nb + blk]) : -2 * v_scale(t, blk);
  };
  // Rows past `whole`, decoded as the reference decodes them.
  std::vector<float> kt(size_t(n) * size_t(d)), vt(kt.size());
  for (int64_t t = whole; t < n; ++t)
    for (int c = 0; c < d; ++c) {
      float kv_[2];
      if (t >= h.n_quant) {
        kv_[0] = f16(h.k_residual[(t - h.n_quant) * d + c]);
        kv_[1] = f16(h.v_residual[(t - h.n_quant) * d + c]);
      } else {
        const int64_t grp = t / 32, len = std::min<int64_t>(32, h.n_quant - grp * 32);
        const float s = f16(h.k_scales[grp * d + c]);
        const int kc = code_at(h.k_codes, grp * 32 * d + c * len + t % 32);
        kv_[0] = h.k_zeros ? float(kc) * s + k_zero(grp, c) : float(kc - 2) * s;
        const int vc = code_at(h.v_codes, t * d + c);
        kv_[1] = h.v_zeros ? float(vc) * v_scale(t, c / 32) + v_zero(t, c / 32)
                           : float(vc - 2) * v_scale(t, c / 32);
      }
      kt[size_t(t * d + c)] = kv_[0];
      vt[size_t(t * d + c)] = kv_[1];
    }
  std::vector<float> out(size_t(G) * size_t(d));
  for (int g = 0; g < G; ++g) {
    const float* qg = q + g * d;
    double m = -INFINITY, l = 0;
    std::vector<double> o(static_cast<size_t>(d), 0.0);
    for (int64_t c0 = 0; c0 < n; c0 += 64) {
      const int64_t C = std::min<int64_t>(64, n - c0);
      const bool on_codes = c0 < whole;
      std::vector<double> sc(static_cast<size_t>(C));
      for (int64_t j = 0; j < C; ++j) {
        const int64_t t = c0 + j;
        double dot = 0;
        if (on_codes) {
          const int64_t grp = t / 32;
          float mx = 0;
          for (int c = 0; c < d; ++c)
            mx = std::max(mx, std::fabs(qg[c] * f16(h.k_scales[grp * d + c])));
          const float inv = mx > 0 ? 127 / mx : 0;
          long sum = 0;
          double residual = 0;
          for (int c = 0; c < d; ++c) {
            const float a = qg[c] * f16(h.k_scales[grp * d + c]);
            const long a8 = long(std::nearbyint(a * inv));
            sum += a8 * code_at(h.k_codes, grp * 32 * d + c * 32 + t % 32);
            residual += double(a) - double(a8) * (mx / 127);
            dot += double(qg[c]) * k_zero(grp, c);
          }
          dot += double(sum) * (mx / 127) + 1.5 * residual;
        } else {
          for (int c = 0; c < d; ++c) dot += double(qg[c]) * kt[size_t(t * d + c)];
        }
        sc[size_t(j)] = dot * scale + (bias ? bias[t] : 0.0);
      }
      const std::vector<double> p = online_softmax_step(sc, m, l, o);
      if (!on_codes) {
        for (int64_t j = 0; j < C; ++j)
          for (int c = 0; c < d; ++c) o[size_t(c)] += p[size_t(j)] * vt[size_t((c0 + j) * d + c)];
        continue;
      }
      float pmax = 0;
      for (double x : p) pmax = std::max(pmax, float(x));
      for (int blk = 0; blk < nb; ++blk) {
        float smax = 0;
        for (int64_t j = 0; j < C; ++j) smax = std::max(smax, std::fabs(v_scale(c0 + j, blk)));
        const float bound = pmax * smax, inv = bound > 0 ? 255 / bound : 0;
        for (int64_t j = 0; j < C; ++j) {
          const int64_t t = c0 + j;
          const double w =
              (bound / 510) * std::nearbyint(float(p[size_t(j)]) * v_scale(t, blk) * inv);
          const double zero = v_zero(t, blk) + 1.5 * v_scale(t, blk);
          for (int c = blk * 32; c < blk * 32 + 32; ++c)
            o[size_t(c)] += w * (2 * code_at(h.v_codes, t * d + c) - 3) + p[size_t(j)] * zero;
        }
      }
    }
    for (int c = 0; c < d; ++c) out[size_t(g * d + c)] = l > 0 ? float(o[size_t(c)] / l) : 0.0f;
  }
  return out;
}

// Vectors where kvk::exp16 and the generic 8-lane exp_lanes differ, over [-100, 0].
__attribute__((target(KVK_AVX512))) long exp_mismatches() {
  long differ = 0;
  for (float x0 = -100.0f; x0 <= 0.0f; x0 += 1.6e-4f) {
    alignas(64) float in[16];
    for (int i = 0; i < 16; ++i) in[i] = x0 - float(i) * 1e-5f;
    kvk::v16 a;
    kvk::v8 b[2];
    std::memcpy(&a, in, sizeof a);
    std::memcpy(b, in, sizeof b);
    kvk::exp16(a);
    kvk::exp_lanes<kvk::v8, kvk::vi8>(b[0]);
    kvk::exp_lanes<kvk::v8, kvk::vi8>(b[1]);
    differ += std::memcmp(&a, b, sizeof a) != 0;
  }
  return differ;
}

__attribute__((target(KVK_AVX512))) std::array<float, 16> exp16(const float* x) {
  kvk::v16 a;
  std::memcpy(&a, x, sizeof a);
  kvk::exp16(a);
  std::array<float, 16> out;
  std::memcpy(out.data(), &a, sizeof a);
  return out;
}

}  // namespace

// The views point at the right bytes: attention over them in the reference equals attention
// over kv::decode's rows, head by head, for head lengths around the group, chunk and residual.
TEST(DecodeAttentionKivi2, ReferenceReadsTheViewsAsLibkvDecodes) {
  for (bool symmetric : {false, true}) {
    const int D = 64, G = 3;
    Kivi2Layer layer(D, {1, 31, 33, 64, 129, 200, 300}, 128, symmetric, 5);
    const auto heads = kv::kivi2_heads(layer.ke, layer.ve, layer.rows());
    ASSERT_EQ(heads.size(), 7u);
    std::vector<float> kd(layer.k.size()), vd(layer.v.size());
    kv::decode(layer.ke, layer.rows(), kd.data());
    kv::decode(layer.ve, layer.rows(), vd.data());
    std::mt19937 rng(9);
    std::normal_distribution<float> nd;
    std::vector<float> q(size_t(G) * D);
    for (float& x : q) x = nd(rng);
    for (size_t h = 0; h < heads.size(); ++h) {
      const int64_t begin = layer.offsets[h], n = layer.offsets[h + 1] - begin;
      EXPECT_EQ(heads[h].n_quant + heads[h].n_residual, n);
      EXPECT_EQ(heads[h].n_residual, std::min<int64_t>(n, 128));
      std::vector<float> got(q.size()), want(q.size());
      kvk::attend_head_kivi2_reference(heads[h], D, q.data(), G, 0.125f, nullptr, got.data());
      kvk::attend_head_reference(kvk::DType::f32, kd.data() + begin * D, vd.data() + begin * D, n,
                                 D, q.data(), G, 0.125f, nullptr, want.data());
      EXPECT_EQ(got, want) << "head " << h << " symmetric " << symmetric;
    }
  }
}

// Only KIVI-2's layout gets views: other bits, groups, axes, a rotation or different residuals
// do not.
TEST(DecodeAttentionKivi2, ViewsOnlyForKivi2Layouts) {
  Kivi2Layer layer(64, {100}, 16, false, 1);
  EXPECT_EQ(kv::kivi2_heads(layer.ke, layer.ve, layer.rows()).size(), 1u);
  auto changed = [&](auto change_k, auto change_v) {
    kv::Encoding k = layer.ke.encoding, v = layer.ve.encoding;
    change_k(k);
    change_v(v);
    return kv::kivi2_heads(kv::encode(k, layer.k.data(), layer.rows()),
                           kv::encode(v, layer.v.data(), layer.rows()), layer.rows())
        .size();
  };
  auto same = [](kv::Encoding&) {};
  EXPECT_EQ(changed([](kv::Encoding& e) { e.bits = 4; }, same), 0u);
  EXPECT_EQ(changed(same, [](kv::Encoding& e) { e.group = 64; }), 0u);
  EXPECT_EQ(changed([](kv::Encoding& e) { e.axis = "token"; }, same), 0u);
  EXPECT_EQ(changed([](kv::Encoding& e) { e.hadamard = true; }, same), 0u);
  EXPECT_EQ(changed(same, [](kv::Encoding& e) { e.residual = 0; }), 0u);
  EXPECT_EQ(changed([](kv::Encoding& e) { e.scheme = "uniform"; },
                    [](kv::Encoding& e) { e.scheme = "uniform"; }),
            1u);
}

// On the codes, the kernel differs from the reference only by its roundings: every output row
// within 3% (relative L2), and within 5e-3 of the emulation of those roundings (a weight at a
// rounding boundary can round the other way: the kernel's exp is not std::exp), over shapes
// that take every path (whole chunks, a last short group, residual rows, G passes, bias, zeros
// or symmetric codes, every supported d).
TEST(DecodeAttentionKivi2, MatchesTheReferenceWithinItsRoundings) {
  if (!kvk::kivi2_codes_supported(128)) GTEST_SKIP() << "no AVX-512 VNNI/VBMI here";
  std::mt19937 rng(12);
  std::normal_distribution<float> nd;
  double worst = 0, worst_slip = 0;
  bool any_difference = false;
  for (int d : {32, 64, 96, 128})
    for (int residual : {0, 128})
      for (bool symmetric : {false, true}) {
        Kivi2Layer layer(d, {1, 63, 64, 65, 150, 1000}, residual, symmetric,
                         unsigned(d + residual + symmetric));
        const auto heads = kv::kivi2_heads(layer.ke, layer.ve, layer.rows());
        ASSERT_EQ(heads.size(), 6u);
        for (size_t h = 0; h < heads.size(); ++h)
          for (int G : {1, 4, 5, 8})
            for (bool with_bias : {false, true}) {
              const int64_t n = heads[h].n_quant + heads[h].n_residual;
              std::vector<float> q(size_t(G) * size_t(d)), bias(static_cast<size_t>(n));
              for (float& x : q) x = nd(rng) / 4;
              for (float& x : bias) x = std::log(1.0f + float(rng() % 3));
              const float scale = 1.0f / std::sqrt(float(d));
              const float* b = with_bias ? bias.data() : nullptr;
              std::vector<float> got(q.size()), want(q.size());
              kvk::attend_head_kivi2(heads[h], d, q.data(), G, scale, b, got.data());
              kvk::attend_head_kivi2_reference(heads[h], d, q.data(), G, scale, b, want.data());
              const auto emulated = emulation(heads[h], d, q.data(), G, scale, b);
              for (int g = 0; g < G; ++g) {
                const double e = row_error(&got[size_t(g * d)], &want[size_t(g * d)], d);
                const double slip = row_error(&got[size_t(g * d)], &emulated[size_t(g * d)], d);
                worst = std::max(worst, e);
                worst_slip = std::max(worst_slip, slip);
                any_difference |= e > 0;
                EXPECT_LT(e, 3e-2) << "d " << d << " n " << n << " G " << G << " g " << g;
                EXPECT_LT(slip, 5e-3) << "d " << d << " n " << n << " G " << G << " g " << g;
              }
            }
      }
  EXPECT_TRUE(any_difference);  // the codes path ran (the reference would give 0)
  std::printf("worst row error vs reference %.2e, vs emulation %.2e\n", worst, worst_slip);
}

// A query with NaN gives NaN, as the reference does, rather than int8 codes of a NaN.
TEST(DecodeAttentionKivi2, NanQueryGivesNan) {
  Kivi2Layer layer(64, {300}, 0, false, 3);
  const auto heads = kv::kivi2_heads(layer.ke, layer.ve, layer.rows());
  std::vector<float> q(64 * 4, 0.5f), out(q.size());
  q[70] = NAN;
  kvk::attend_head_kivi2(heads[0], 64, q.data(), 4, 0.125f, nullptr, out.data());
  for (float x : out) EXPECT_TRUE(std::isnan(x));
}

// The AVX-512 exp (vrndscaleps, vscalefps) gives the generic exp_lanes' results bit for bit, over
// every float in [-100, 0] at a step of about 1e-5, and keeps NaN, -inf -> 0 and the -87 cutoff.
TEST(Exp16, EqualsTheGenericExpBitForBit) {
  if (!kvk::have_avx512()) GTEST_SKIP() << "no AVX-512 here";
  EXPECT_EQ(exp_mismatches(), 0);
  alignas(64) float special[16] = {NAN,   -INFINITY, 0.0f,   -0.0f, -87.0f, -87.01f, -1e-30f, -20,
                                   -30.5, -40,       -50.25, -60,   -70,    -80,     -86.5f,  -1};
  const auto got = exp16(special);
  EXPECT_TRUE(std::isnan(got[0]));
  EXPECT_EQ(got[1], 0.0f);
  EXPECT_EQ(got[2], 1.0f);
  EXPECT_EQ(got[3], 1.0f);
  EXPECT_GT(got[4], 0.0f);
  EXPECT_EQ(got[5], 0.0f);
  for (int i = 6; i < 16; ++i)
    EXPECT_NEAR(got[i], std::exp(special[i]), 2e-7 * std::exp(special[i]));
}
