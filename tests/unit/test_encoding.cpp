// kv-compress's encodings (kv/encoding.h): hand-checked layouts, error bounds, round trips through
// kvsnap files, stored bytes against each scheme's bits per value, and the error ordering on a
// real stories260K cache.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "helpers.h"
#include "kv/encoding.h"
#include "kv/error.h"
#include "kv/fp8.h"
#include "kv/quant.h"
#include "kv/rope.h"
#include "kv/snapshot_io.h"
#include "kvk/ops.h"

namespace {

using kv::Encoding;

// A layer layout of `heads` KV heads with the given row counts, positions 0.. per head.
struct Layout {
  kv::ModelInfo model;
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> positions;
  Layout(int D, std::vector<int64_t> rows_per_head) {
    model.n_layers = 1;
    model.n_kv_heads = int(rows_per_head.size());
    model.n_q_heads = model.n_kv_heads;
    model.head_dim = model.rope_dims = D;
    for (int64_t n : rows_per_head) {
      offsets.push_back(offsets.back() + n);
      for (int64_t p = 0; p < n; ++p) positions.push_back(int32_t(3 * p + 1));
    }
  }
  kv::RowLayout rows() const { return {model, offsets, positions}; }
  int64_t values() const { return offsets.back() * model.head_dim; }
};

std::vector<float> gaussian(int64_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = dist(rng);
  return x;
}

std::vector<float> round_trip(const Encoding& e, const std::vector<float>& x, const Layout& l) {
  std::vector<float> y(x.size());
  kv::decode(kv::encode(e, x.data(), l.rows()), l.rows(), y.data());
  return y;
}

const kv::CodeArray& array(const kv::Encoded& enc, const std::string& name) {
  for (const auto& a : enc.arrays)
    if (a.name == name) return a;
  throw std::runtime_error("no array " + name);
}

Encoding scheme(const std::string& name, char role = 'k') {
  return kv::default_encoding(name, role);
}

TEST(Encoding, HadamardIsOrthogonalAndItsOwnInverse) {
  float x[2] = {1, 0};
  kv::hadamard_rotate(x, 2);
  EXPECT_FLOAT_EQ(x[0], std::sqrt(0.5f));
  EXPECT_FLOAT_EQ(x[1], std::sqrt(0.5f));
  float y[4] = {1, 2, 3, 4};  // H4 [1 2 3 4] / 2 = [10 -2 -4 0] / 2
  kv::hadamard_rotate(y, 4);
  EXPECT_FLOAT_EQ(y[0], 5);
  EXPECT_FLOAT_EQ(y[1], -1);
  EXPECT_FLOAT_EQ(y[2], -2);
  EXPECT_FLOAT_EQ(y[3], 0);
  std::vector<float> z = gaussian(128, 1), w = z;
  kv::hadamard_rotate(w.data(), 128);
  kv::hadamard_rotate(w.data(), 128);
  for (size_t i = 0; i < z.size(); ++i) EXPECT_NEAR(w[i], z[i], 1e-5f);
}

TEST(Encoding, UniformAlongTokensIsQuantOnEachHeadsRows) {
  // Axis token with group >= D: one group per row; the codes are quant::encode_uniform's on the
  // head's values in row order.
  Layout l(8, {5, 3});
  const auto x = gaussian(l.values(), 2);
  Encoding e = scheme("uniform");
  e.bits = 3;
  const kv::Encoded enc = kv::encode(e, x.data(), l.rows());
  kv::quant::UniformParams p{3, 8, false};
  std::vector<uint8_t> codes(kv::quant::uniform_code_bytes(5 * 8, 3));
  std::vector<uint16_t> scales(5), zeros(5);
  kv::quant::encode_uniform(x.data(), 40, p, codes.data(), scales.data(), zeros.data());
  const auto& c = array(enc, "codes");
  ASSERT_EQ(c.bytes.size(), codes.size() + kv::quant::uniform_code_bytes(3 * 8, 3));
  EXPECT_EQ(0, std::memcmp(c.bytes.data(), codes.data(), codes.size()));
  EXPECT_EQ(0, std::memcmp(array(enc, "scales").bytes.data(), scales.data(), 10));
  EXPECT_EQ(array(enc, "scales").count(), 8);  // 5 + 3 rows, one group each
  EXPECT_EQ(array(enc, "residual").count(), 0);
}

TEST(Encoding, UniformErrorIsAtMostHalfAStepPerGroup) {
  Layout l(16, {40, 0, 23});
  const auto x = gaussian(l.values(), 3, 2.0f);
  for (const char* axis : {"token", "channel"})
    for (int bits : {2, 3, 4, 8}) {
      Encoding e = scheme("uniform");
      e.bits = bits;
      e.group = 8;
      e.axis = axis;
      const kv::Encoded enc = kv::encode(e, x.data(), l.rows());
      std::vector<float> y(x.size());
      kv::decode(enc, l.rows(), y.data());
      // The largest stored scale bounds every group's error: |x^ - x| <= S/2 (+ f16 zero
      // rounding, below 2^-11 relative here).
      float smax = 0;
      const auto& s = array(enc, "scales");
      for (int64_t i = 0; i < s.count(); ++i)
        smax =
            std::max(smax, kvk::f16_to_f32(reinterpret_cast<const uint16_t*>(s.bytes.data())[i]));
      for (size_t i = 0; i < x.size(); ++i)
        ASSERT_LE(std::fabs(y[i] - x[i]), smax / 2 + 4e-3f) << axis << " " << bits << " " << i;
      // Stable under a second encode.
      EXPECT_EQ(round_trip(e, y, l), y) << axis << " " << bits;
    }
}

TEST(Encoding, KiviKeepsTheRecentRowsAndGroupsKeysPerChannel) {
  Layout l(4, {10, 2});
  const auto x = gaussian(l.values(), 4);
  Encoding e = scheme("kivi", 'k');
  e.residual = 3;
  e.group = 4;
  EXPECT_EQ(e.axis, "channel");
  EXPECT_EQ(scheme("kivi", 'v').axis, "token");
  const kv::Encoded enc = kv::encode(e, x.data(), l.rows());
  // Head 0: 7 quantized rows -> per channel ceil(7/4) = 2 groups, 4 channels; head 1: all residual.
  EXPECT_EQ(array(enc, "scales").count(), 8);
  EXPECT_EQ(array(enc, "residual").count(), (3 + 2) * 4);
  EXPECT_EQ(array(enc, "codes").count(), 7);  // 7 rows x 4 channels of 2 bits
  const auto y = round_trip(e, x, l);
  for (int64_t r : {7, 8, 9, 10, 11})
    for (int d = 0; d < 4; ++d) {
      const float v = x[size_t(r * 4 + d)];
      EXPECT_EQ(y[size_t(r * 4 + d)], kvk::f16_to_f32(kvk::f32_to_f16(v)));
    }
  // Group-major layout: group 0 (rows 0-3) holds channel 0's four codes, then channel 1's
  // (codes 4..7 of the stream: byte 1), ...; its scales are [group][channel].
  float col[4];
  for (int r = 0; r < 4; ++r) col[r] = x[size_t(r * 4 + 1)];
  uint8_t q[4], packed = 0;
  uint16_t sc = 0, zp = 0;
  kv::quant::quantize_group(col, 4, {2, 4, false}, &sc, &zp, q);
  kv::quant::pack_codes(q, 4, 2, &packed);
  EXPECT_EQ(array(enc, "codes").bytes[1], packed);
  EXPECT_EQ(reinterpret_cast<const uint16_t*>(array(enc, "scales").bytes.data())[1], sc);
  EXPECT_EQ(reinterpret_cast<const uint16_t*>(array(enc, "zeros").bytes.data())[1], zp);
}

TEST(Encoding, BlocksAreLlamaCppRowsWhenHeadDimIsAMultipleOf32) {
  Layout l(64, {3, 5});
  const auto x = gaussian(l.values(), 5);
  for (const char* name : {"q8_0", "q4_0"}) {
    const kv::Encoded enc = kv::encode(scheme(name), x.data(), l.rows());
    const bool q8 = std::string(name) == "q8_0";
    std::vector<uint8_t> ref(q8 ? kv::quant::q8_0_bytes(x.size())
                                : kv::quant::q4_0_bytes(x.size()));
    if (q8)
      kv::quant::encode_q8_0(x.data(), int64_t(x.size()), ref.data());
    else
      kv::quant::encode_q4_0(x.data(), int64_t(x.size()), ref.data());
    EXPECT_EQ(array(enc, "blocks").bytes, ref) << name;
    const auto y = round_trip(scheme(name), x, l);
    EXPECT_EQ(round_trip(scheme(name), y, l), y) << name;
  }
  // A head of 3 rows of 8 values is padded to one block of 32.
  Layout small(8, {3});
  const auto z = gaussian(small.values(), 6);
  EXPECT_EQ(array(kv::encode(scheme("q8_0"), z.data(), small.rows()), "blocks").count(), 34);
}

TEST(Encoding, Fp8CodesAreTheFormatsOfTheScaledValues) {
  Layout l(8, {6, 4});
  auto x = gaussian(l.values(), 7);
  x[3] = -10.0f;  // head 0's largest magnitude lands on -max_finite
  Encoding e = scheme("fp8");
  const kv::Encoded enc = kv::encode(e, x.data(), l.rows());
  const float* scales = reinterpret_cast<const float*>(array(enc, "scales").bytes.data());
  EXPECT_FLOAT_EQ(scales[0], 10.0f / 448.0f);
  EXPECT_EQ(array(enc, "codes").bytes[3], 0xFE);  // -448 in e4m3
  for (int64_t i = 0; i < l.values(); ++i) {
    const float s = scales[i < 48 ? 0 : 1];
    EXPECT_EQ(array(enc, "codes").bytes[size_t(i)],
              kv::fp8::encode(x[size_t(i)] * (1.0f / s), kv::fp8::Format::e4m3));
  }
  e.scale_scope = "tensor";
  e.fp8_format = "e5m2";
  EXPECT_EQ(array(kv::encode(e, x.data(), l.rows()), "scales").count(), 1);
  const auto y = round_trip(e, x, l);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], std::fabs(x[i]) * 0.125f + 1e-6f);
}

// f16 layers are coded straight from their bits when no rotation comes first (the vector
// kernels take f16): the arrays must be those of an f32 layer holding the same values, at every
// SIMD level, and NaN/Inf must give the same error. Heads of 300 rows (KIVI keys end on a
// partial group of rows, left to the float path), 37 and 64.
TEST(Encoding, F16LayersCodeLikeTheirFloatValues) {
  const Layout l(128, {300, 37, 64});
  const int64_t rows = l.offsets.back();
  std::vector<float> x = gaussian(l.values(), 11);
  for (int64_t i = 0; i < 128; ++i) {
    x[size_t(128 * 7 + i)] = i % 3 ? 0.0f : -0.0f;                       // a row of zeros
    x[size_t(128 * 40 + i)] = 5.0f + 0.001f * float(i % 7);              // offset values
    x[size_t(128 * 41 + i)] = std::ldexp(x[size_t(128 * 41 + i)], -18);  // f16 subnormals
  }
  x[128 * 50 + 3] = 60000.0f;  // near f16's max
  std::vector<Encoding> encodings;
  for (const char* name : {"kivi", "uniform"})
    for (char role : {'k', 'v'})
      for (int bits : {2, 4})
        for (bool symmetric : {false, true}) {
          Encoding e = scheme(name, role);
          e.bits = bits;
          e.symmetric = symmetric;
          encodings.push_back(e);
        }
  for (const char* name : {"q8_0", "q4_0", "fp8"}) encodings.push_back(scheme(name));
  encodings.push_back(scheme("fp8"));
  encodings.back().fp8_format = "e5m2";
  encodings.push_back(scheme("q4_0"));
  encodings.back().hadamard = true;  // rotated first: the float path for both
  const kv::quant::Simd widest = kv::quant::simd_supported();
  for (kv::quant::Simd level : {kv::quant::Simd::scalar, widest}) {
    kv::quant::set_simd_level(level);
    for (const Encoding& e : encodings) {
      SCOPED_TRACE(testing::Message()
                   << e.scheme << " " << e.bits << " bits, axis " << e.axis
                   << (e.symmetric ? ", symmetric" : "") << ", level " << int(level));
      const kv::Tensor half = kv::Tensor::from_f32(kv::DType::f16, rows, 128, x.data());
      const std::vector<float> values = half.to_f32();
      const kv::Tensor full = kv::Tensor::from_f32(kv::DType::f32, rows, 128, values.data());
      const kv::Encoded from_half = kv::encode(e, half, l.rows());
      const kv::Encoded from_full = kv::encode(e, full, l.rows());
      ASSERT_EQ(from_half.arrays.size(), from_full.arrays.size());
      for (size_t a = 0; a < from_half.arrays.size(); ++a) {
        EXPECT_EQ(from_half.arrays[a].name, from_full.arrays[a].name);
        EXPECT_TRUE(from_half.arrays[a].bytes == from_full.arrays[a].bytes)
            << from_half.arrays[a].name;
      }
      // NaN or Inf in the first head's coded rows: the same message (entry and channel named).
      for (float bad : {NAN, INFINITY}) {
        std::vector<float> y = values;
        y[size_t(20 * 128 + 77)] = bad;
        const kv::Tensor bad_half = kv::Tensor::from_f32(kv::DType::f16, rows, 128, y.data());
        const kv::Tensor bad_full = kv::Tensor::from_f32(kv::DType::f32, rows, 128, y.data());
        std::string half_error, full_error;
        try {
          kv::encode(e, bad_half, l.rows());
        } catch (const kv::Error& err) {
          half_error = err.what();
        }
        try {
          kv::encode(e, bad_full, l.rows());
        } catch (const kv::Error& err) {
          full_error = err.what();
        }
        EXPECT_NE(half_error, "");
        EXPECT_EQ(half_error, full_error);
      }
    }
  }
  kv::quant::set_simd_level(widest);
}

TEST(Encoding, FullRankSvdReconstructsAndRankTruncates) {
  Layout l(16, {50, 7});
  const auto x = gaussian(l.values(), 8);
  Encoding e = scheme("svd");
  e.rank = 16;
  e.factors = "f32";
  auto y = round_trip(e, x, l);
  EXPECT_LT(kv::quant::relative_error(y.data(), x.data(), l.values()), 1e-5);
  // Pre-RoPE keys: un-rotated, factorized, re-rotated.
  e.pre_rope = true;
  y = round_trip(e, x, l);
  EXPECT_LT(kv::quant::relative_error(y.data(), x.data(), l.values()), 1e-5);
  // Rank 2 on data of rank 2 (head 1 has 7 rows of two directions): exact to float tolerance.
  std::vector<float> low(static_cast<size_t>(l.values()));
  for (int64_t r = 0; r < l.offsets.back(); ++r)
    for (int d = 0; d < 16; ++d)
      low[size_t(r * 16 + d)] = float(r % 5) * std::sin(float(d)) + float(r % 3) * float(d % 4);
  e = scheme("svd");
  e.rank = 2;
  e.factors = "f32";
  const kv::Encoded enc = kv::encode(e, low.data(), l.rows());
  EXPECT_EQ(array(enc, "coeffs").count(), (50 + 7) * 2);
  EXPECT_EQ(array(enc, "basis").count(), 2 * 16 * 2);
  y = round_trip(e, low, l);
  EXPECT_LT(kv::quant::relative_error(y.data(), low.data(), l.values()), 1e-5);
  // Energy picks the rank: 2 directions carry everything, so any energy < 1 keeps 2 or fewer.
  e.rank = 0;
  e.energy = 0.999;
  const kv::Encoded by_energy = kv::encode(e, low.data(), l.rows());
  const int32_t* ranks = reinterpret_cast<const int32_t*>(array(by_energy, "ranks").bytes.data());
  EXPECT_LE(ranks[0], 2);
  EXPECT_GE(ranks[0], 1);
}

TEST(Encoding, KvquantFitsLevelsKeepsOutliersExactAndIsStable) {
  // Keys per channel: a channel with at most 2^bits distinct values is stored exactly; the
  // round(1% * n / 2) = 1 values at each end of a 100-row channel are outliers, kept exact.
  Layout l(4, {100});
  std::vector<float> x(static_cast<size_t>(l.values()));
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t r = 0; r < 100; ++r) {
    x[size_t(r * 4 + 0)] = float(r % 3) - 1.0f;  // three levels: -1, 0, 1
    x[size_t(r * 4 + 1)] = dist(rng);
    x[size_t(r * 4 + 2)] = dist(rng);
    x[size_t(r * 4 + 3)] = 0.5f;
  }
  x[size_t(7 * 4 + 1)] = 40.0f;  // an outlier far above channel 1's other values
  Encoding e = scheme("kvquant", 'k');
  e.pre_rope = false;
  EXPECT_EQ(e.axis, "channel");
  EXPECT_EQ(e.bits, 3);
  const kv::Encoded enc = kv::encode(e, x.data(), l.rows());
  const auto* counts = reinterpret_cast<const int32_t*>(array(enc, "outlier_counts").bytes.data());
  EXPECT_EQ(counts[0], 2 * 2);  // channels 1 and 2; 0 and 3 end in ties, none strictly beyond
  const auto y = round_trip(e, x, l);
  for (int64_t r = 0; r < 100; ++r) {
    EXPECT_EQ(y[size_t(r * 4 + 0)], x[size_t(r * 4 + 0)]);
    EXPECT_EQ(y[size_t(r * 4 + 3)], 0.5f);
  }
  EXPECT_EQ(y[size_t(7 * 4 + 1)], 40.0f);
  // Levels are fitted: Lloyd-Max's optimum for 3 bits on a Gaussian is a relative MSE of 0.0345
  // (0.19 relative error); k-means levels, with the two tail values kept exact, stay below 0.2.
  double num = 0, den = 0;
  for (int64_t r = 0; r < 100; ++r) {
    const double d = y[size_t(r * 4 + 2)] - x[size_t(r * 4 + 2)];
    num += d * d;
    den += double(x[size_t(r * 4 + 2)]) * x[size_t(r * 4 + 2)];
  }
  EXPECT_LT(std::sqrt(num / den), 0.2);
  // A second encode of the decoded values changes nothing: each channel now has <= 8 distinct
  // inliers, which become the levels.
  EXPECT_EQ(round_trip(e, y, l), y);
  // Values per token, and keys before RoPE, round trip within the same error scale.
  Layout big(16, {200, 50});
  const auto z = gaussian(big.values(), 12);
  for (char role : {'k', 'v'}) {
    Encoding ev = scheme("kvquant", role);
    ev.bits = 4;
    const auto w = round_trip(ev, z, big);
    EXPECT_LT(kv::quant::relative_error(w.data(), z.data(), big.values()), 0.15) << role;
  }
}

TEST(Encoding, MikvKeepsTheMostAttendedRowsAtHighBits) {
  Layout l(8, {10, 6});
  const auto x = gaussian(l.values(), 13);
  std::vector<float> importance(16);
  for (int i = 0; i < 16; ++i) importance[size_t(i)] = float((i * 7) % 16);  // a permutation
  kv::RowLayout rows = l.rows();
  rows.importance = importance.data();
  Encoding e = scheme("mikv");
  e.high_share = 0.3;  // round(3.0) = 3 rows of head 0, round(1.8) = 2 of head 1
  std::vector<float> y(x.size());
  kv::decode(kv::encode(e, x.data(), rows), rows, y.data());
  // Each row decodes as uniform along tokens at 8 bits if it is among its head's most
  // attended, else at 2 bits.
  auto uniform_row = [&](int64_t r, int bits) {
    Layout one(8, {1});
    Encoding u = scheme("uniform");
    u.bits = bits;
    std::vector<float> row(x.begin() + r * 8, x.begin() + (r + 1) * 8);
    return round_trip(u, row, one);
  };
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t h0 = r < 10 ? 0 : 10, n = r < 10 ? 10 : 6, keep = r < 10 ? 3 : 2;
    int64_t rank = 0;  // rows of the head with more attention
    for (int64_t i = h0; i < h0 + n; ++i) rank += importance[size_t(i)] > importance[size_t(r)];
    const std::vector<float> want = uniform_row(r, rank < keep ? 8 : 2);
    EXPECT_EQ(std::vector<float>(y.begin() + r * 8, y.begin() + (r + 1) * 8), want) << r;
  }
  // Share 0 is uniform 2-bit, share 1 uniform 8-bit, value for value.
  Encoding u = scheme("uniform");
  for (double share : {0.0, 1.0}) {
    e.high_share = share;
    u.bits = share == 0.0 ? 2 : 8;
    kv::decode(kv::encode(e, x.data(), rows), rows, y.data());
    EXPECT_EQ(y, round_trip(u, x, l)) << share;
  }
  // Without importance the encoder refuses (the writer computes it from attn_acc).
  kv::RowLayout bare = l.rows();
  EXPECT_THROW(kv::encode(e, x.data(), bare), kv::Error);
}

TEST(Encoding, StoredBytesMatchEachSchemesBitsPerValue) {
  // 8B-like heads (D = 128), 1000 rows each: bits per value from the formulas of kv-compress(1).
  Layout l(128, {1000, 1000});
  const auto x = gaussian(l.values(), 9);
  const double n = double(l.values());
  struct Case {
    Encoding e;
    double bits;
  };
  auto with = [](Encoding e, int bits, int group, bool sym) {
    e.bits = bits;
    e.group = group;
    e.symmetric = sym;
    return e;
  };
  std::vector<Case> cases = {
      {with(scheme("uniform"), 4, 32, false), 4 + 32.0 / 32},
      {with(scheme("uniform"), 2, 64, true), 2 + 16.0 / 64},
      {with(scheme("uniform"), 3, 128, false), 3 + 32.0 / 128},
      {with(scheme("kivi", 'k'), 2, 32, false), (872 * (2 + 1.0) + 128 * 16) / 1000.0},
      {with(scheme("kivi", 'v'), 4, 32, false), (872 * (4 + 1.0) + 128 * 16) / 1000.0},
      {scheme("q8_0"), 8.5},
      {scheme("q4_0"), 4.5},
      {scheme("fp8"), 8},
  };
  Encoding svd = scheme("svd");
  svd.rank = 32;
  cases.push_back({svd, 16.0 * (1000 * 32 + 128 * 32) / (1000.0 * 128)});
  // kvquant keys: 3-bit codes, 8 f16 levels per channel of 1000 rows, 1% outliers (5 at each
  // end of each channel) at 32 + 32 bits; values: an f16 scale per 128-value row and 1 outlier
  // at each end of each row.
  cases.push_back({scheme("kvquant", 'k'), 3 + 16.0 * 8 / 1000 + 0.01 * 64});
  cases.push_back({scheme("kvquant", 'v'), 3 + 16.0 / 128 + 2.0 / 128 * 64});
  // mikv: a fifth of the rows at 8 bits + 32/32, the rest at 2 + 32/32, one mask bit per row.
  cases.push_back({scheme("mikv"), 0.2 * 9 + 0.8 * 3 + 1.0 / 128});
  std::vector<float> importance(2000);
  for (size_t i = 0; i < importance.size(); ++i) importance[i] = float((i * 7919) % 2000);
  kv::RowLayout rows = l.rows();
  rows.importance = importance.data();
  for (const Case& c : cases) {
    const double bits = 8.0 * double(kv::encode(c.e, x.data(), rows).bytes()) / n;
    EXPECT_NEAR(bits, c.bits, 0.05 * c.bits) << c.e.describe();
  }
}

TEST(Encoding, BadParametersAndValues) {
  Layout l(8, {4});
  auto x = gaussian(l.values(), 10);
  EXPECT_EQ(kvtest::exit_code_of([] { kv::default_encoding("kivii", 'k'); }), 64);
  Encoding e = scheme("uniform");
  e.bits = 5;
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::check_encoding(e, l.model, 'k'); }), 64);
  e = scheme("uniform");
  e.group = 3;  // does not divide 8
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::check_encoding(e, l.model, 'k'); }), 64);
  e = scheme("svd");
  e.rank = 9;
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::check_encoding(e, l.model, 'k'); }), 64);
  e = scheme("svd");
  e.pre_rope = true;
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::check_encoding(e, l.model, 'v'); }), 64);
  x[5] = NAN;
  const std::vector<float> importance(4, 1.0f);
  kv::RowLayout rows = l.rows();
  rows.importance = importance.data();  // for mikv
  for (const auto& name : kv::scheme_names()) {
    if (name == "dense") continue;
    EXPECT_EQ(kvtest::exit_code_of([&] { kv::encode(scheme(name), x.data(), rows); }), 65) << name;
  }
  // A truncated array is a data error naming it.
  x[5] = 1;
  kv::Encoded enc = kv::encode(scheme("uniform"), x.data(), l.rows());
  enc.arrays[0].bytes.pop_back();
  std::vector<float> y(x.size());
  EXPECT_EQ(kvtest::exit_code_of([&] { kv::decode(enc, l.rows(), y.data()); }), 65);
}

TEST(Encoding, SnapshotsKeepTheirEncodingThroughFiles) {
  kv::Snapshot s = kvtest::tiny_snapshot(kv::DType::f16, true, true);
  // head_dim 4: uniform along tokens, kivi keys, fp8 values.
  for (auto& layer : s.layers) {
    layer.k_encoding = scheme("kivi", 'k');
    layer.k_encoding.residual = 1;
    layer.v_encoding = scheme("fp8", 'v');
  }
  const std::string path = kvtest::temp_dir() + "/enc.kv.h5";
  kv::write_snapshot(path, s);
  const kv::Snapshot r = kv::read_snapshot(path);
  ASSERT_EQ(r.header.format_minor, 1);
  for (size_t li = 0; li < s.layers.size(); ++li) {
    const kv::Layer& in = s.layers[li];
    const kv::Layer& out = r.layers[li];
    EXPECT_EQ(out.k_encoding, in.k_encoding);
    EXPECT_EQ(out.v_encoding, in.v_encoding);
    EXPECT_EQ(out.k.dtype(), kv::DType::f32);
    const kv::RowLayout rows{s.header.model, in.head_offsets, in.positions};
    const auto k = in.k.to_f32();
    std::vector<float> want(k.size());
    kv::decode(kv::encode(in.k_encoding, k.data(), rows), rows, want.data());
    EXPECT_EQ(out.k.to_f32(), want);
  }
  // Read -> write -> read gives the same values (the encoding is stable).
  const std::string again = kvtest::temp_dir() + "/again.kv.h5";
  kv::write_snapshot(again, r);
  const kv::Snapshot r2 = kv::read_snapshot(again);
  for (size_t li = 0; li < r.layers.size(); ++li) {
    EXPECT_EQ(r2.layers[li].k.to_f32(), r.layers[li].k.to_f32());
    EXPECT_EQ(r2.layers[li].v.to_f32(), r.layers[li].v.to_f32());
  }
  kv::SnapshotReader reader(path);
  const kv::LayerStorage st = reader.layer_storage(1);
  EXPECT_EQ(st.k_encoding.scheme, "kivi");
  EXPECT_EQ(st.v_encoding.scheme, "fp8");
  // fp8 values: one byte per value plus 2 scales of 4 bytes.
  EXPECT_GT(st.kv_bytes_logical, st.entries * 4 + 8);
}

// ---- real caches ----------------------------------------------------------------------------

double key_error(const kv::Snapshot& s, const Encoding& e, bool keys) {
  double num = 0, den = 0;
  for (const kv::Layer& layer : s.layers) {
    kv::RowLayout rows{s.header.model, layer.head_offsets, layer.positions};
    const std::vector<float> importance =
        kv::entry_importance(s.header.model, layer.head_offsets, layer.positions, layer.attn_acc);
    rows.importance = importance.data();  // for mikv
    const auto x = (keys ? layer.k : layer.v).to_f32();
    std::vector<float> y(x.size());
    kv::decode(kv::encode(e, x.data(), rows), rows, y.data());
    for (size_t i = 0; i < x.size(); ++i) {
      num += double(y[i] - x[i]) * (y[i] - x[i]);
      den += double(x[i]) * x[i];
    }
  }
  return std::sqrt(num / den);
}

TEST(EncodingReal, ErrorOrderingOnStories260K) {
  const kv::Snapshot* real = kvtest::stories_capture();
  if (!real) GTEST_SKIP() << "stories260K or TinyStories not available";
  auto uniform = [](int bits, const char* axis) {
    Encoding e = kv::default_encoding("uniform", 'k');
    e.bits = bits;
    e.axis = axis;
    return e;
  };
  const double e8 = key_error(*real, uniform(8, "token"), true);
  const double e4 = key_error(*real, uniform(4, "token"), true);
  const double e2 = key_error(*real, uniform(2, "token"), true);
  EXPECT_LT(e8, e4);
  EXPECT_LT(e4, e2);
  Encoding kivi = kv::default_encoding("kivi", 'k');
  const double kivi2 = key_error(*real, kivi, true);
  kivi.residual = 0;  // the layout alone, without the dense recent rows
  const double kivi2_layout = key_error(*real, kivi, true);
  EXPECT_LT(kivi2, e2);
  EXPECT_LT(kivi2_layout, e2);
  const double q8 = key_error(*real, kv::default_encoding("q8_0", 'k'), true);
  const double q4 = key_error(*real, kv::default_encoding("q4_0", 'k'), true);
  EXPECT_LT(q8, q4);
  Encoding kvq = kv::default_encoding("kvquant", 'k');
  const double kvq3 = key_error(*real, kvq, true);
  kvq.bits = 2;
  const double kvq2 = key_error(*real, kvq, true);
  kvq.pre_rope = false;
  const double kvq2_post = key_error(*real, kvq, true);
  EXPECT_LT(kvq3, kvq2);
  EXPECT_LT(kvq2, kvq2_post);  // KVQuant's point: keys are easier to quantize before RoPE
  std::printf(
      "stories260K key rel. error: uniform8 %.4f uniform4 %.4f uniform2 %.4f kivi2 %.4f "
      "kivi2(no residual) %.4f q8_0 %.4f q4_0 %.4f kvquant3 %.4f kvquant2 %.4f "
      "kvquant2(post-RoPE) %.4f\n",
      e8, e4, e2, kivi2, kivi2_layout, q8, q4, kvq3, kvq2, kvq2_post);
  // Every scheme with its defaults, keys and values (reported; the ordering above is asserted).
  for (const std::string& name : kv::scheme_names()) {
    if (name == "dense") continue;
    std::printf("  %-8s k %.4f v %.4f\n", name.c_str(),
                key_error(*real, kv::default_encoding(name, 'k'), true),
                key_error(*real, kv::default_encoding(name, 'v'), false));
  }
}

}  // namespace
