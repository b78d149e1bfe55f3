// kv::fp8 against references written independently of its bit tricks: every code's value computed
// from its bit fields with std::ldexp, hand-checked codes, and a brute-force encoder that searches
// all finite codes for the nearest value (ties to the even code, saturating) on a few hundred
// thousand inputs that include the subnormal range and the exact midpoints between codes.
#include <gtest/gtest.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kv/error.h"
#include "kv/fp8.h"
#include "kv/quant.h"

namespace fp8 = kv::fp8;
using fp8::Format;

namespace {

constexpr Format formats[] = {Format::e4m3, Format::e5m2};
constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float qnan = std::numeric_limits<float>::quiet_NaN();

struct Fields {
  int ebits, mbits, bias;
};

Fields fields(Format f) {
  return f == Format::e4m3 ? Fields{4, 3, 7} : Fields{5, 2, 15};
}

// The value of a code from the OCP definitions, in double.
double ref_decode(uint8_t code, Format f) {
  const Fields fl = fields(f);
  const int s = code >> 7;
  const int e = (code >> fl.mbits) & ((1 << fl.ebits) - 1);
  const int m = code & ((1 << fl.mbits) - 1);
  const int emax = (1 << fl.ebits) - 1;
  double v;
  if (f == Format::e4m3 && e == emax && m == (1 << fl.mbits) - 1)
    v = std::numeric_limits<double>::quiet_NaN();
  else if (f == Format::e5m2 && e == emax)
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0)
    v = std::ldexp(double(m), 1 - fl.bias - fl.mbits);
  else
    v = std::ldexp(double((1 << fl.mbits) + m), e - fl.bias - fl.mbits);
  return s ? -v : v;
}

uint32_t bits(float x) {
  return std::bit_cast<uint32_t>(x);
}

// Brute force: the finite non-negative code nearest |x|, comparing each candidate with the best so
// far through their midpoint (exact in double: fp8 values have at most 4 significant bits), ties
// to the code with lowest bit 0. Nearest among finite codes is saturation for large |x| and inf.
class RefEncoder {
 public:
  explicit RefEncoder(Format f) {
    for (int c = 0; c < 128; ++c) {
      const double v = ref_decode(uint8_t(c), f);
      if (std::isfinite(v)) codes_.push_back({uint8_t(c), v});
    }
  }

  uint8_t operator()(float x) const {
    const uint8_t sign = std::signbit(x) ? 0x80 : 0;
    if (std::isnan(x)) return uint8_t(0x7F | sign);
    const double v = std::fabs(double(x));
    Code best = codes_[0];
    for (const Code& c : codes_) {
      const Code& lo = c.value < best.value ? c : best;
      const Code& hi = c.value < best.value ? best : c;
      const double mid = (lo.value + hi.value) / 2;
      if (v < mid)
        best = lo;
      else if (v > mid)
        best = hi;
      else
        best = (lo.code & 1) == 0 ? lo : hi;
    }
    return uint8_t(best.code | sign);
  }

 private:
  struct Code {
    uint8_t code;
    double value;
  };
  std::vector<Code> codes_;
};

// Inputs for the rounding test: random floats of every magnitude, the subnormal range, and the
// midpoints between adjacent codes with their neighbouring floats.
std::vector<float> rounding_inputs(Format f, std::mt19937& rng) {
  std::vector<float> in;
  std::uniform_int_distribution<uint32_t> u32;
  const auto sign = [&](float v) { return (u32(rng) & 1) ? -v : v; };
  // Any bit pattern but NaN: float subnormals, huge values, infinities.
  for (int i = 0; i < 50000; ++i) {
    float v = std::bit_cast<float>(u32(rng));
    if (!std::isnan(v)) in.push_back(v);
  }
  // Exponents from well below the smallest subnormal to well above max_finite, any mantissa.
  const Fields fl = fields(f);
  const int lo_exp = 1 - fl.bias - fl.mbits - 6, hi_exp = (1 << fl.ebits) - fl.bias + 4;
  std::uniform_int_distribution<int> exp(lo_exp, hi_exp);
  for (int i = 0; i < 100000; ++i) {
    const uint32_t b = (uint32_t(exp(rng) + 127) << 23) | (u32(rng) & 0x7FFFFF);
    in.push_back(sign(std::bit_cast<float>(b)));
  }
  // Uniform over [0, 2 * smallest normal): the subnormals and the first binade of normals.
  std::uniform_real_distribution<float> small(0.0f, std::ldexp(2.0f, 1 - fl.bias));
  for (int i = 0; i < 50000; ++i) in.push_back(sign(small(rng)));
  // Exact midpoints between adjacent finite codes (and above max_finite by half a step), each
  // with the floats a few ulps around it.
  std::vector<double> values;
  for (int c = 0; c < 128; ++c) {
    const double v = ref_decode(uint8_t(c), f);
    if (std::isfinite(v)) values.push_back(v);
  }
  values.push_back(values.back() + (values.back() - values[values.size() - 2]));
  std::vector<float> mids;
  for (size_t i = 0; i + 1 < values.size(); ++i) {
    const double mid = (values[i] + values[i + 1]) / 2;
    EXPECT_EQ(double(float(mid)), mid);
    mids.push_back(float(mid));
  }
  for (float m : mids) {
    float up = m, down = m;
    for (int k = 0; k < 4; ++k) {
      in.push_back(up), in.push_back(-up), in.push_back(down), in.push_back(-down);
      up = std::nextafter(up, inf), down = std::nextafter(down, 0.0f);
    }
  }
  std::uniform_int_distribution<size_t> pick(0, mids.size() - 1);
  std::uniform_int_distribution<int> ulps(-3, 3);
  for (int i = 0; i < 50000; ++i) {
    const float m = mids[pick(rng)];
    in.push_back(sign(std::bit_cast<float>(bits(m) + uint32_t(ulps(rng)))));
  }
  for (float v : {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min()})
    in.push_back(v);
  return in;
}

TEST(Fp8, Names) {
  EXPECT_EQ(fp8::parse_format("e4m3"), Format::e4m3);
  EXPECT_EQ(fp8::parse_format("e5m2"), Format::e5m2);
  EXPECT_STREQ(fp8::format_name(Format::e4m3), "e4m3");
  EXPECT_STREQ(fp8::format_name(Format::e5m2), "e5m2");
  EXPECT_EQ(fp8::max_finite(Format::e4m3), 448.0f);
  EXPECT_EQ(fp8::max_finite(Format::e5m2), 57344.0f);
  for (const char* bad : {"", "E4M3", "e4m3fn", "fp8", "e5m2 "}) {
    try {
      fp8::parse_format(bad);
      ADD_FAILURE() << "no throw for '" << bad << "'";
    } catch (const kv::Error& e) {
      EXPECT_EQ(e.code(), kv::Exit::usage);
      EXPECT_EQ(std::string(e.what()),
                std::string("unknown fp8 format '") + bad + "' (e4m3 or e5m2)");
    }
  }
}

TEST(Fp8, DecodeAllCodesFromBitFields) {
  for (Format f : formats) {
    SCOPED_TRACE(fp8::format_name(f));
    int nans = 0, infs = 0;
    double largest = 0;
    for (int c = 0; c < 256; ++c) {
      const double ref = ref_decode(uint8_t(c), f);
      const float got = fp8::decode(uint8_t(c), f);
      if (std::isnan(ref)) {
        EXPECT_TRUE(std::isnan(got)) << "code " << c;
        ++nans;
        continue;
      }
      if (std::isinf(ref)) ++infs;
      // Compared as bits: -0 must come back as -0.
      EXPECT_EQ(bits(got), bits(float(ref))) << "code " << c << ": " << got << " vs " << ref;
      EXPECT_EQ(double(got), ref) << "code " << c;  // ref is exactly a float
      if (std::isfinite(ref)) largest = std::max(largest, ref);
    }
    EXPECT_EQ(largest, double(fp8::max_finite(f)));
    if (f == Format::e4m3) {
      EXPECT_EQ(nans, 2);  // S.1111.111
      EXPECT_EQ(infs, 0);
    } else {
      EXPECT_EQ(nans, 6);  // S.11111.{01,10,11}
      EXPECT_EQ(infs, 2);
    }
    // Positive codes are ordered like their values up to max_finite.
    const int max_code = f == Format::e4m3 ? 0x7E : 0x7B;
    for (int c = 1; c <= max_code; ++c)
      EXPECT_LT(fp8::decode(uint8_t(c - 1), f), fp8::decode(uint8_t(c), f)) << "code " << c;
  }
}

TEST(Fp8, HandCheckedCodes) {
  struct Case {
    Format f;
    float x;
    uint8_t code;
  };
  const Format e4 = Format::e4m3, e5 = Format::e5m2;
  const Case cases[] = {
      {e4, 448.0f, 0x7E},
      {e4, -448.0f, 0xFE},
      {e4, 1.0f, 0x38},
      {e4, -1.0f, 0xB8},
      {e4, 0x1p-9f, 0x01},      // smallest subnormal
      {e4, 0x1p-6f, 0x08},      // smallest normal
      {e4, 7 * 0x1p-9f, 0x07},  // largest subnormal
      {e4, 0x1p-10f, 0x00},     // half the smallest subnormal: tie to even 0
      {e4, 0x1.000002p-10f, 0x01},
      {e4, 3 * 0x1p-10f, 0x02},   // tie between 1 and 2 steps: even 2
      {e4, 15 * 0x1p-10f, 0x08},  // tie between 7 steps and 2^-6: even 0x08
      {e4, 1.0625f, 0x38},        // tie between 1 and 1.125
      {e4, 1.1875f, 0x3A},        // tie between 1.125 and 1.25
      {e4, 1.0625001f, 0x39},
      {e4, 416.0f, 0x7D},
      {e4, 432.0f, 0x7E},  // tie between 416 (0x7D) and 448: even 0x7E
      {e4, 400.0f, 0x7C},  // tie between 384 (0x7C) and 416: even 0x7C
      {e4, 464.0f, 0x7E},
      {e4, 1e6f, 0x7E},
      {e4, -1e6f, 0xFE},
      {e4, inf, 0x7E},
      {e4, -inf, 0xFE},
      {e4, std::numeric_limits<float>::max(), 0x7E},
      {e4, 0.0f, 0x00},
      {e4, -0.0f, 0x80},
      {e4, -1e-30f, 0x80},
      {e4, qnan, 0x7F},
      {e4, -qnan, 0xFF},
      {e5, 57344.0f, 0x7B},
      {e5, -57344.0f, 0xFB},
      {e5, 1.0f, 0x3C},
      {e5, 0x1p-16f, 0x01},
      {e5, 0x1p-14f, 0x04},
      {e5, 0x1p-17f, 0x00},
      {e5, 3 * 0x1p-17f, 0x02},
      {e5, 1.125f, 0x3C},  // tie between 1 and 1.25
      {e5, 1.375f, 0x3E},  // tie between 1.25 and 1.5
      {e5, 61440.0f, 0x7B},
      {e5, 1e6f, 0x7B},
      {e5, -1e6f, 0xFB},
      {e5, inf, 0x7B},
      {e5, -inf, 0xFB},
      {e5, 0.0f, 0x00},
      {e5, -0.0f, 0x80},
      {e5, qnan, 0x7F},
      {e5, -qnan, 0xFF},
  };
  for (const Case& c : cases)
    EXPECT_EQ(int(fp8::encode(c.x, c.f)), int(c.code))
        << fp8::format_name(c.f) << " " << c.x << std::hexfloat << " (" << c.x << ")";

  EXPECT_EQ(fp8::decode(0x7E, e4), 448.0f);
  EXPECT_EQ(fp8::decode(0x38, e4), 1.0f);
  EXPECT_EQ(fp8::decode(0x01, e4), 0x1p-9f);
  EXPECT_TRUE(std::isnan(fp8::decode(0x7F, e4)));
  EXPECT_TRUE(std::isnan(fp8::decode(0xFF, e4)));
  EXPECT_EQ(fp8::decode(0x7B, e5), 57344.0f);
  EXPECT_EQ(fp8::decode(0x3C, e5), 1.0f);
  EXPECT_EQ(fp8::decode(0x7C, e5), inf);
  EXPECT_EQ(fp8::decode(0xFC, e5), -inf);
  EXPECT_TRUE(std::isnan(fp8::decode(0x7D, e5)));
  EXPECT_TRUE(std::signbit(fp8::decode(0x80, e4)));
  EXPECT_TRUE(std::signbit(fp8::decode(0x80, e5)));
}

TEST(Fp8, EncodeMatchesBruteForceNearestEven) {
  std::mt19937 rng(20240601);
  for (Format f : formats) {
    SCOPED_TRACE(fp8::format_name(f));
    const RefEncoder ref(f);
    const std::vector<float> in = rounding_inputs(f, rng);
    ASSERT_GT(in.size(), 250000u);
    int failures = 0;
    for (float x : in) {
      const uint8_t want = ref(x), got = fp8::encode(x, f);
      if (got != want && ++failures <= 10)
        ADD_FAILURE() << std::hexfloat << x << std::dec << " (" << x << "): got " << int(got)
                      << ", want " << int(want);
    }
    EXPECT_EQ(failures, 0) << "of " << in.size();
  }
}

TEST(Fp8, CodesRoundTrip) {
  for (Format f : formats) {
    SCOPED_TRACE(fp8::format_name(f));
    for (int c = 0; c < 256; ++c) {
      const float v = fp8::decode(uint8_t(c), f);
      const uint8_t back = fp8::encode(v, f);
      if (std::isnan(v)) {
        EXPECT_EQ(back & 0x7F, 0x7F) << "code " << c;
        EXPECT_TRUE(std::isnan(fp8::decode(back, f)));
      } else if (std::isinf(v)) {
        EXPECT_EQ(fp8::decode(back, f), v > 0 ? fp8::max_finite(f) : -fp8::max_finite(f));
      } else {
        EXPECT_EQ(int(back), c);
        EXPECT_EQ(bits(fp8::decode(back, f)), bits(v)) << "code " << c;
      }
    }
  }
}

TEST(Fp8, ArraysWithScale) {
  std::mt19937 rng(7);
  for (Format f : formats) {
    SCOPED_TRACE(fp8::format_name(f));
    // Every finite code times a power-of-two scale comes back exactly.
    for (float scale : {1.0f, 0x1p-12f, 0.25f, 1024.0f}) {
      std::vector<float> x;
      std::vector<uint8_t> codes;
      for (int c = 0; c < 256; ++c)
        if (std::isfinite(fp8::decode(uint8_t(c), f))) {
          codes.push_back(uint8_t(c));
          x.push_back(fp8::decode(uint8_t(c), f) * scale);
        }
      std::vector<uint8_t> enc(x.size());
      std::vector<float> dec(x.size());
      fp8::encode_array(x.data(), int64_t(x.size()), scale, f, enc.data());
      fp8::decode_array(enc.data(), int64_t(enc.size()), scale, f, dec.data());
      EXPECT_EQ(enc, codes) << "scale " << scale;
      for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(bits(dec[i]), bits(x[i])) << i;
    }
    // Any scale: the documented formulas, and the error bound of a nearest code.
    for (float scale : {0.37f, 3.0f, 1e-3f, 123.456f}) {
      const float inv = 1.0f / scale;
      std::normal_distribution<float> dist(0.0f, fp8::max_finite(f) * scale / 8);
      std::vector<float> x(10000);
      for (float& v : x) v = dist(rng);
      x[0] = fp8::max_finite(f) * scale * 4;  // saturates
      x[1] = -x[0];
      std::vector<uint8_t> enc(x.size());
      std::vector<float> dec(x.size());
      fp8::encode_array(x.data(), int64_t(x.size()), scale, f, enc.data());
      fp8::decode_array(enc.data(), int64_t(enc.size()), scale, f, dec.data());
      const int mbits = fields(f).mbits;
      const float min_normal = std::ldexp(1.0f, 1 - fields(f).bias);
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_EQ(enc[i], fp8::encode(x[i] * inv, f)) << i;
        ASSERT_EQ(bits(dec[i]), bits(fp8::decode(enc[i], f) * scale)) << i;
        const float y = x[i] * inv;
        if (std::fabs(y) >= fp8::max_finite(f)) {
          EXPECT_EQ(dec[i], std::copysign(fp8::max_finite(f), y) * scale);
        } else {
          // Half a step: 2^-(mbits+1) relative for normals, half the subnormal step below.
          const double step = std::fabs(y) >= min_normal
                                  ? std::ldexp(std::fabs(double(y)), -mbits - 1)
                                  : std::ldexp(min_normal, -mbits - 1);
          EXPECT_LE(std::fabs(double(dec[i]) / scale - y), step * (1 + 1e-6)) << x[i];
        }
      }
    }
  }
}

TEST(Fp8, BadScaleOrCountThrows) {
  std::vector<float> x(4, 1.0f);
  std::vector<uint8_t> c(4);
  for (Format f : formats) {
    for (float scale : {0.0f, -0.0f, -1.0f, inf, -inf, qnan}) {
      SCOPED_TRACE(scale);
      try {
        fp8::encode_array(x.data(), 4, scale, f, c.data());
        ADD_FAILURE() << "encode_array: no throw";
      } catch (const kv::Error& e) {
        EXPECT_EQ(e.code(), kv::Exit::usage);
      }
      try {
        fp8::decode_array(c.data(), 4, scale, f, x.data());
        ADD_FAILURE() << "decode_array: no throw";
      } catch (const kv::Error& e) {
        EXPECT_EQ(e.code(), kv::Exit::usage);
      }
    }
    // 1/scale overflows float: encode refuses (0 * inf would be NaN), decode is fine.
    const float tiny = 1e-39f;
    try {
      fp8::encode_array(x.data(), 4, tiny, f, c.data());
      ADD_FAILURE() << "encode_array: no throw for a scale whose inverse overflows";
    } catch (const kv::Error& e) {
      EXPECT_EQ(e.code(), kv::Exit::usage);
    }
    EXPECT_NO_THROW(fp8::decode_array(c.data(), 4, tiny, f, x.data()));
    try {
      fp8::encode_array(x.data(), -1, 1.0f, f, c.data());
      ADD_FAILURE() << "encode_array: no throw for n < 0";
    } catch (const kv::Error& e) {
      EXPECT_EQ(e.code(), kv::Exit::usage);
    }
    try {
      fp8::decode_array(c.data(), -1, 1.0f, f, x.data());
      ADD_FAILURE() << "decode_array: no throw for n < 0";
    } catch (const kv::Error& e) {
      EXPECT_EQ(e.code(), kv::Exit::usage);
    }
    EXPECT_NO_THROW(fp8::encode_array(nullptr, 0, 1.0f, f, nullptr));
    EXPECT_NO_THROW(fp8::decode_array(nullptr, 0, 1.0f, f, nullptr));
  }
}

}  // namespace

// The vector paths against the scalar code, bit for bit: encode_array's loop (compiled for the
// CPU's vector width) against encode() on every rounding input above and NaNs of both signs,
// and decode_array at each kv::quant SIMD level against decode() * scale on all 256 codes (in
// an order that is not the codes' own, with a tail shorter than a vector).
TEST(Fp8, VectorPathsMatchTheScalarCode) {
  std::mt19937 rng(99);
  for (Format f : formats) {
    SCOPED_TRACE(fp8::format_name(f));
    std::vector<float> in = rounding_inputs(f, rng);
    for (uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff812345u})
      in.insert(in.begin() + 100, std::bit_cast<float>(nan));
    std::vector<uint8_t> codes(in.size());
    fp8::encode_array(in.data(), int64_t(in.size()), 1.0f, f, codes.data());  // x * 1 is x
    int failures = 0;
    for (size_t i = 0; i < in.size(); ++i)
      if (codes[i] != fp8::encode(in[i], f) && ++failures <= 10)
        ADD_FAILURE() << std::hexfloat << in[i] << ": " << int(codes[i]) << " vs "
                      << int(fp8::encode(in[i], f));
    EXPECT_EQ(failures, 0);

    std::vector<uint8_t> all(256 * 3 + 13);
    for (size_t i = 0; i < all.size(); ++i) all[i] = uint8_t(i * 37 + i / 256);
    for (float scale : {1.0f, 0.37f, 3e-5f, 1234.5f}) {
      const kv::quant::Simd widest = kv::quant::simd_supported();
      for (kv::quant::Simd level : {kv::quant::Simd::scalar, widest}) {
        kv::quant::set_simd_level(level);
        std::vector<float> out(all.size());
        fp8::decode_array(all.data(), int64_t(all.size()), scale, f, out.data());
        for (size_t i = 0; i < all.size(); ++i)
          ASSERT_EQ(bits(out[i]), bits(fp8::decode(all[i], f) * scale))
              << "code " << int(all[i]) << " scale " << scale << " level " << int(level);
      }
      kv::quant::set_simd_level(widest);
    }
  }
}
