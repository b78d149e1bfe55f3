// kv::quant against hand-computed blocks, against gguf-py's reference quantizers (bit for bit,
// env-gated: tests/cli/quant_reference.sh runs the pair), and against the properties quant.h
// promises for uniform groups: the error bound, minimal f16 scales, exact constant groups, the
// LSB-first packing, stable requantization and the parallel path matching the serial one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <new>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kv/error.h"
#include "kv/quant.h"
#include "kvk/ops.h"

namespace q = kv::quant;

namespace {

using Bytes = std::vector<uint8_t>;
using Floats = std::vector<float>;

uint16_t h(float v) {
  return kvk::f32_to_f16(v);
}
float f(uint16_t bits) {
  return kvk::f16_to_f32(bits);
}

template <class F>
kv::Exit error_code(F fn) {
  try {
    fn();
  } catch (const kv::Error& e) {
    return e.code();
  }
  return kv::Exit::ok;
}

Floats gaussian(int64_t n, unsigned seed, float mean = 0, float sd = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(mean, sd);
  Floats x(static_cast<size_t>(n));
  for (auto& v : x) v = g(rng);
  return x;
}

Bytes enc_q8(const Floats& x) {
  Bytes b(q::q8_0_bytes(int64_t(x.size())));
  q::encode_q8_0(x.data(), int64_t(x.size()), b.data());
  return b;
}
Bytes enc_q4(const Floats& x) {
  Bytes b(q::q4_0_bytes(int64_t(x.size())));
  q::encode_q4_0(x.data(), int64_t(x.size()), b.data());
  return b;
}
Floats dec_q8(const Bytes& b, int64_t n) {
  Floats y(static_cast<size_t>(n));
  q::decode_q8_0(b.data(), n, y.data());
  return y;
}
Floats dec_q4(const Bytes& b, int64_t n) {
  Floats y(static_cast<size_t>(n));
  q::decode_q4_0(b.data(), n, y.data());
  return y;
}

struct Uniform {
  Bytes codes;
  std::vector<uint16_t> scales, zeros;
};

Uniform enc_uniform(const Floats& x, const q::UniformParams& p) {
  const int64_t n = int64_t(x.size()), ng = q::uniform_groups(n, p.group);
  Uniform u;
  u.codes.assign(q::uniform_code_bytes(n, p.bits), 0xAA);  // every byte must be written
  u.scales.assign(size_t(ng), 0xFFFF);
  u.zeros.assign(p.symmetric ? 0 : size_t(ng), 0xFFFF);
  q::encode_uniform(x.data(), n, p, u.codes.data(), u.scales.data(),
                    p.symmetric ? nullptr : u.zeros.data());
  return u;
}

Floats dec_uniform(const Uniform& u, int64_t n, const q::UniformParams& p) {
  Floats y(size_t(n), -12345.0f);
  q::decode_uniform(u.codes.data(), u.scales.data(), p.symmetric ? nullptr : u.zeros.data(), n, p,
                    y.data());
  return y;
}

Floats round_trip(const Floats& x, const q::UniformParams& p) {
  return dec_uniform(enc_uniform(x, p), int64_t(x.size()), p);
}

// Independent LSB-first packer: bit k of the stream is bit k % 8 of byte k / 8.
Bytes pack_reference(const std::vector<uint32_t>& codes, int bits) {
  Bytes out((codes.size() * size_t(bits) + 7) / 8, 0);
  for (size_t i = 0; i < codes.size(); ++i)
    for (int k = 0; k < bits; ++k)
      if ((codes[i] >> k) & 1) {
        const size_t bit = i * size_t(bits) + size_t(k);
        out[bit / 8] = uint8_t(out[bit / 8] | (1u << (bit % 8)));
      }
  return out;
}

std::string params_name(const q::UniformParams& p) {
  return std::to_string(p.bits) + "-bit group " + std::to_string(p.group) +
         (p.symmetric ? " symmetric" : " asymmetric");
}

}  // namespace

// ---- q8_0 and q4_0, by hand ---------------------------------------------------------------------

TEST(Q8_0, HandComputedBlocks) {
  Floats x(96, 0.0f);
  // Block 0: max|x| = 127, so d = 1 (f16 0x3c00) and id = 1: the codes are roundf(x), ties away
  // from zero (rounding half to even would give 0, 0 and 2 for 0.5, -0.5 and 2.5, -126 for -126.5).
  const float b0[] = {127, -63.5f, 0.5f, 1.5f, -0.5f, 2.5f, -126.5f, 0.49f};
  std::copy(std::begin(b0), std::end(b0), x.begin());
  // Block 1: the largest magnitude is negative, -31.75, so d = 0.25 (0x3400) and id = 4.
  const float b1[] = {0.125f, -0.375f, 10, 0.1f, 31.625f, -31.75f};
  std::copy(std::begin(b1), std::end(b1), x.begin() + 32);
  // Block 2: zeros: d = 0, id = 0, codes 0.
  const Bytes b = enc_q8(x);
  ASSERT_EQ(b.size(), 3u * 34);
  Bytes want(3 * 34, 0);
  // d as f16 little endian, then the codes as int8: -64 = 0xc0, -1 = 0xff, -127 = 0x81, -2 = 0xfe.
  const uint8_t w0[] = {0x00, 0x3c, 127, 0xc0, 1, 2, 0xff, 3, 0x81, 0};
  const uint8_t w1[] = {0x00, 0x34, 1, 0xfe, 40, 0, 127, 0x81};
  std::copy(std::begin(w0), std::end(w0), want.begin());
  std::copy(std::begin(w1), std::end(w1), want.begin() + 34);
  EXPECT_EQ(b, want);

  const Floats y = dec_q8(b, 96);
  Floats y_want(96, 0.0f);
  const float d0[] = {127, -64, 1, 2, -1, 3, -127, 0};
  const float d1[] = {0.25f, -0.5f, 10, 0, 31.75f, -31.75f};
  std::copy(std::begin(d0), std::end(d0), y_want.begin());
  std::copy(std::begin(d1), std::end(d1), y_want.begin() + 32);
  EXPECT_EQ(y, y_want);
}

TEST(Q4_0, HandComputedBlocks) {
  Floats x(96, 0.0f);
  // Block 0: the first value of largest magnitude is -8 (index 3; the +8 at index 20 comes later),
  // so d = -8 / -8 = 1 (0x3c00), id = 1 and q = min(15, trunc(x + 8.5)): halves round up (-0.5
  // -> 8, 0.5 -> 9) and +8 saturates at 15.
  x[0] = 0.5f, x[1] = -0.5f, x[2] = 1.5f, x[3] = -8, x[4] = -1.5f, x[5] = 7.5f, x[6] = 3.2f;
  x[16] = -7.6f, x[20] = 8, x[31] = 2;
  // Block 1: 4 comes before -4, so d = 4 / -8 = -0.5 (0xb800), id = -2: 4 -> q 0, -4 -> 16 -> 15.
  x[32] = 4, x[33] = -4, x[34] = 1, x[35] = -1, x[36] = 0.25f, x[37] = -0.25f;
  // Block 2: zeros. ggml starts its search from max = +0, so d = +0 / -8 = -0 (0x8000).
  const Bytes b = enc_q4(x);
  ASSERT_EQ(b.size(), 3u * 18);
  Bytes want(3 * 18, 0x88);  // q = 8 in both nibbles: the code of 0
  const uint8_t w0[] = {0x00, 0x3c, 0x09, 0x88, 0x8a, 0x80, 0xf7, 0x8f, 0x8b};
  const uint8_t w1[] = {0x00, 0xb8, 0x80, 0x8f, 0x86, 0x8a, 0x88, 0x89};
  std::copy(std::begin(w0), std::end(w0), want.begin());
  want[17] = 0xa8;  // value 15 (q 8) low, value 31 (2 -> q 10) high
  std::copy(std::begin(w1), std::end(w1), want.begin() + 18);
  want[36] = 0x00, want[37] = 0x80;
  EXPECT_EQ(b, want);

  const Floats y = dec_q4(b, 96);
  Floats y_want(96, 0.0f);
  const float d0[] = {1, 0, 2, -8, -1, 7, 3};
  std::copy(std::begin(d0), std::end(d0), y_want.begin());
  y_want[16] = -8, y_want[20] = 7, y_want[31] = 2;
  const float d1[] = {4, -3.5f, 1, -1, 0, -0.5f};
  std::copy(std::begin(d1), std::end(d1), y_want.begin() + 32);
  EXPECT_EQ(y, y_want);
}

TEST(LlamaBlocks, SizesAndBadInput) {
  EXPECT_EQ(q::q8_0_bytes(0), 0u);
  EXPECT_EQ(q::q8_0_bytes(96), 102u);
  EXPECT_EQ(q::q4_0_bytes(64), 36u);
  Floats x(64, 1.0f);
  Bytes b(200);
  for (int64_t n : {1, 31, 33, 63, -32}) {
    SCOPED_TRACE(n);
    EXPECT_EQ(error_code([&] { q::q8_0_bytes(n); }), kv::Exit::usage);
    EXPECT_EQ(error_code([&] { q::q4_0_bytes(n); }), kv::Exit::usage);
    EXPECT_EQ(error_code([&] { q::encode_q8_0(x.data(), n, b.data()); }), kv::Exit::usage);
    EXPECT_EQ(error_code([&] { q::encode_q4_0(x.data(), n, b.data()); }), kv::Exit::usage);
    EXPECT_EQ(error_code([&] { q::decode_q8_0(b.data(), n, x.data()); }), kv::Exit::usage);
    EXPECT_EQ(error_code([&] { q::decode_q4_0(b.data(), n, x.data()); }), kv::Exit::usage);
  }
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    Floats y(64, 1.0f);
    y[40] = bad;
    EXPECT_EQ(error_code([&] { q::encode_q8_0(y.data(), 64, b.data()); }), kv::Exit::data);
    EXPECT_EQ(error_code([&] { q::encode_q4_0(y.data(), 64, b.data()); }), kv::Exit::data);
  }
  try {
    x[40] = std::numeric_limits<float>::quiet_NaN();
    q::encode_q8_0(x.data(), 64, b.data());
    ADD_FAILURE() << "no error";
  } catch (const kv::Error& e) {
    EXPECT_NE(std::string(e.what()).find("value 40"), std::string::npos) << e.what();
  }
}

// The reconstruction is within half a step of the f32 scale, plus what f16 rounding of the scale
// moves the largest code.
TEST(LlamaBlocks, ErrorWithinHalfAStep) {
  const Floats x = gaussian(32 * 500, 5, 0.3f, 2.0f);
  const Floats y8 = dec_q8(enc_q8(x), int64_t(x.size())), y4 = dec_q4(enc_q4(x), int64_t(x.size()));
  for (size_t b = 0; b < x.size() / 32; ++b) {
    float amax = 0, m = 0;
    for (size_t j = 0; j < 32; ++j)
      if (amax < std::fabs(x[b * 32 + j])) amax = std::fabs(x[b * 32 + j]), m = x[b * 32 + j];
    const double d8 = amax / 127.0, d4 = std::fabs(m / 8.0);
    const double r8 = std::fabs(f(h(float(d8))) - d8), r4 = std::fabs(f(h(float(d4))) - d4);
    for (size_t j = 0; j < 32; ++j) {
      const size_t i = b * 32 + j;
      ASSERT_LE(std::fabs(y8[i] - x[i]), 0.5001 * d8 + 127 * r8) << i;
      // q4_0 truncates x / d + 8.5, i.e. rounds halves toward +inf: also within half a step, but
      // the value -m has no code (q 16 clamps to 15) and is a whole step away.
      const double bound4 = (std::fabs(x[i] + m) <= 0.5001 * d4 ? 1.0001 : 0.5001) * d4 + 8 * r4;
      ASSERT_LE(std::fabs(y4[i] - x[i]), bound4) << i;
    }
  }
}

// ---- q8_0 and q4_0 against gguf-py --------------------------------------------------------------

namespace {

// The values tests/python/quant_reference.py quantizes with gguf-py: blocks chosen for the edge
// cases of both formats, then random blocks. Deterministic (fixed seeds).
Floats reference_inputs() {
  Floats v;
  std::mt19937 rng(20240901);
  std::uniform_real_distribution<float> small(-0.9f, 0.9f);
  auto block = [&](auto fill) {
    Floats b(32);
    for (int j = 0; j < 32; ++j) b[size_t(j)] = fill(j);
    v.insert(v.end(), b.begin(), b.end());
  };
  auto scaled = [&](float amax, float sign) {  // random block whose largest magnitude is amax
    block([&](int j) { return j == 7 ? sign * amax : small(rng) * amax; });
  };
  // Zeros: +0, +0 after a leading -0 (gguf-py and ggml disagree on q4_0's d sign), all -0, mixed.
  block([](int) { return 0.0f; });
  block([](int j) { return j == 0 ? -0.0f : 0.0f; });
  block([](int) { return -0.0f; });
  block([](int j) { return j % 2 ? -0.0f : 0.0f; });
  // q8_0 ties: d = 1 (max 127) and d = 0.5 (max 63.5), x * id exactly k + 0.5; also negated.
  block([](int j) { return j == 31 ? 127.0f : float(j - 16) + 0.5f; });
  block([](int j) { return j == 31 ? -127.0f : -(float(j - 16) + 0.5f); });
  block([](int j) { return j == 0 ? 63.5f : float(j - 16) * 0.5f + 0.25f; });
  // q4_0 ties: d = 1 (m = -8 first) and d = -1 (m = +8 first): x * id + 8.5 on integers and halves.
  block([](int j) { return -8.0f + 0.5f * float(j); });
  block([](int j) { return 8.0f - 0.5f * float(j); });
  // q4_0 near its rounding points with a scale that is not a power of two: x * id within an ulp
  // or two of j - 0.5, where rounding x * id before adding 8.5 (ggml) and fusing the two (an FMA)
  // truncate differently. These blocks catch a build that contracts the encoder into FMAs.
  for (float m : {-24.0f, 24.0f, -5.5f, -0.7f, 1000.1f}) {
    const float d = m / -8;
    Floats near;
    for (int j = -7; j <= 8; ++j) {
      const float c = d * (float(j) - 0.5f);
      for (float v : {c, std::nextafter(c, -INFINITY), std::nextafter(c, INFINITY)})
        if (std::fabs(v) < std::fabs(m)) near.push_back(v);
    }
    for (size_t k = 0; k < near.size(); k += 31)
      block([&](int j) {
        return j == 0 ? m : k + size_t(j) - 1 < near.size() ? near[k + size_t(j) - 1] : 0.0f;
      });
  }
  // Equal magnitudes of opposite signs: the first one sets q4_0's sign.
  block([&](int j) { return j == 0 ? -5.0f : j == 1 ? 5.0f : small(rng); });
  block([&](int j) { return j == 0 ? 5.0f : j == 1 ? -5.0f : small(rng); });
  block([&](int j) { return j == 3 ? 2.0f : j == 17 ? -2.0f : small(rng); });
  block([&](int j) { return j == 30 ? -3.0f : j == 31 ? 3.0f : small(rng) * 3; });
  // Negative maxima.
  for (float amax : {10.0f, 0.7f, 1000.0f}) scaled(amax, -1);
  // Tiny scales: f16-subnormal d, d flushed to 0 in f16, f32-subnormal d, 1/d overflowing f32.
  for (float amax :
       {1e-3f, 5e-6f, 1e-7f, 1e-8f, 1e-30f, 4e-37f, 3e-37f, 1e-37f, 1e-38f, 1e-40f, 1e-45f})
    for (float sign : {1.0f, -1.0f}) scaled(amax, sign);
  // Large values: 60000, f16's max, d close to and beyond f16's max (stored as Inf).
  block([&](int j) { return j % 3 == 0 ? 60000.0f : j % 3 == 1 ? -60000.0f : small(rng) * 6e4f; });
  for (float amax : {65504.0f, 1e5f, 5e5f, 5.24e5f, 5.3e5f, 8e6f, 8.3e6f, 8.4e6f, 1e9f})
    for (float sign : {1.0f, -1.0f}) scaled(amax, sign);
  // d exactly between two f16 values (ties to even), normal and subnormal.
  for (float dt : {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 3 * 0x1p-25f, 5 * 0x1p-25f}) {
    scaled(127 * dt, 1);
    scaled(8 * dt, -1);
  }
  // Random blocks at several scales, some with an outlier.
  std::normal_distribution<float> g(0, 1);
  for (int b = 0; b < 900; ++b) {
    const float scale = std::pow(10.0f, float(b % 7) - 3);
    block([&](int j) { return (b % 5 == 0 && j == b % 32 ? 40.0f : 1.0f) * scale * g(rng); });
  }
  return v;
}

Bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot read " << path;
    return {};
  }
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

Floats as_floats(const Bytes& b) {
  Floats v(b.size() / 4);
  std::memcpy(v.data(), b.data(), v.size() * 4);
  return v;
}

bool same_float(float a, float b) {
  return std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b));
}

}  // namespace

// Writes reference_inputs() as little-endian f32 for the script (tests/cli/quant_reference.sh).
TEST(QuantReference, WriteInputs) {
  const char* path = std::getenv("KV_QUANT_INPUTS_OUT");
  if (!path)
    GTEST_SKIP() << "KV_QUANT_INPUTS_OUT is not set (tests/cli/quant_reference.sh sets it)";
  const Floats v = reference_inputs();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * 4));
  ASSERT_TRUE(out.good()) << path;
}

// The directory tests/python/quant_reference.py wrote: values.f32 (our inputs) and, for T in
// q8_0 q4_0, T.bin (gguf.quants.quantize's bytes) and T.f32 (gguf.quants.dequantize of them).
TEST(QuantReference, MatchesGgufPy) {
  const char* dir = std::getenv("KV_QUANT_REFERENCE");
  if (!dir) GTEST_SKIP() << "KV_QUANT_REFERENCE is not set (tests/cli/quant_reference.sh sets it)";
  const std::string d = dir;
  const Floats x = as_floats(read_file(d + "/values.f32"));
  const Floats want_x = reference_inputs();
  ASSERT_EQ(x.size(), want_x.size());
  ASSERT_EQ(std::memcmp(x.data(), want_x.data(), x.size() * 4), 0) << "stale values.f32";
  const int64_t n = int64_t(x.size()), blocks = n / 32;

  struct Format {
    const char* name;
    size_t block_bytes;
    Bytes (*encode)(const Floats&);
    Floats (*decode)(const Bytes&, int64_t);
  };
  const Format formats[] = {{"q8_0", 34, enc_q8, dec_q8}, {"q4_0", 18, enc_q4, dec_q4}};
  for (const Format& fmt : formats) {
    SCOPED_TRACE(fmt.name);
    const Bytes theirs = read_file(d + "/" + fmt.name + ".bin");
    const Floats theirs_y = as_floats(read_file(d + "/" + fmt.name + ".f32"));
    const Bytes ours = fmt.encode(x);
    ASSERT_EQ(ours.size(), theirs.size());
    ASSERT_EQ(theirs_y.size(), x.size());
    const Floats ours_y = fmt.decode(ours, n);
    int64_t identical = 0, known = 0, bad = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* o = ours.data() + size_t(b) * fmt.block_bytes;
      const uint8_t* t = theirs.data() + size_t(b) * fmt.block_bytes;
      const float* xb = x.data() + b * 32;
      if (std::memcmp(o, t, fmt.block_bytes) == 0) {
        ++identical;
        for (int64_t j = 0; j < 32; ++j)
          if (!same_float(ours_y[size_t(b * 32 + j)], theirs_y[size_t(b * 32 + j)]) && bad++ < 5)
            ADD_FAILURE() << "block " << b << " value " << j << " decodes to "
                          << ours_y[size_t(b * 32 + j)] << ", gguf-py "
                          << theirs_y[size_t(b * 32 + j)];
        continue;
      }
      // The one known difference: q4_0 of a block of zeros that starts with -0. gguf-py takes m
      // = x[0] = -0, so d = +0; ggml (and we) keep its initial +0, so d = -0. Codes are equal.
      const bool zeros = std::all_of(xb, xb + 32, [](float v) { return v == 0.0f; });
      if (std::string(fmt.name) == "q4_0" && zeros && std::signbit(xb[0]) && o[0] == 0 &&
          o[1] == 0x80 && t[0] == 0 && t[1] == 0 && std::memcmp(o + 2, t + 2, 16) == 0) {
        ++known;
        continue;
      }
      if (bad++ < 5) {
        std::string diff;
        for (size_t k = 0; k < fmt.block_bytes; ++k) {
          char buf[16];
          std::snprintf(buf, sizeof buf, " %02x/%02x", o[k], t[k]);
          diff += buf;
        }
        ADD_FAILURE() << "block " << b << " (x[0] = " << xb[0] << ") ours/gguf-py:" << diff;
      }
    }
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(known, std::string(fmt.name) == "q4_0" ? 2 : 0);
    std::printf(
        "%s: %lld values in %lld blocks; %lld blocks bit-identical to gguf-py, %lld with "
        "the known -0 difference\n",
        fmt.name, (long long)n, (long long)blocks, (long long)identical, (long long)known);
  }
}

// ---- uniform
// -------------------------------------------------------------------------------------

TEST(Uniform, HandComputedGroups) {
  // 4-bit asymmetric: Z = f16(-2) = -2, S = the smallest f16 with 15 S - 2 >= 28: 2. Codes
  // round((x + 2) / 2): 0.4 -> 1.2 -> 1, 5.5 -> 3.75 -> 4, 3 -> 2.5 -> 3 (tie away from zero).
  const q::UniformParams a{4, 8, false};
  const Floats xa = {-2, 0.4f, 5.5f, 28, 3};
  const Uniform ua = enc_uniform(xa, a);
  EXPECT_EQ(ua.scales, std::vector<uint16_t>{0x4000});
  EXPECT_EQ(ua.zeros, std::vector<uint16_t>{0xc000});
  EXPECT_EQ(ua.codes, (Bytes{0x10, 0xf4, 0x03}));  // codes 0 1 4 15 3, low nibble first
  EXPECT_EQ(dec_uniform(ua, 5, a), (Floats{-2, 0, 6, 28, 4}));

  // 3-bit symmetric (Q = 3): S = 1, q = round(x) in [-3, 3], code q + 4: 2 5 7 5 4.
  const q::UniformParams s{3, 8, true};
  const Floats xs = {-1.5f, 0.7f, 3, 0.75f, -0.2f};
  const Uniform us = enc_uniform(xs, s);
  EXPECT_EQ(us.scales, std::vector<uint16_t>{0x3c00});
  EXPECT_TRUE(us.zeros.empty());
  // 010 101 111 101 100 LSB-first: 0b11'101'010, 0b0'100'101'1.
  EXPECT_EQ(us.codes, (Bytes{0xea, 0x4b}));
  EXPECT_EQ(dec_uniform(us, 5, s), (Floats{-2, 1, 3, 1, 0}));

  // 3-bit codes 1..7, 0 cross byte boundaries: 001 010 011 100 101 110 111 000.
  const q::UniformParams t{3, 8, false};
  const Uniform ut = enc_uniform({1, 2, 3, 4, 5, 6, 7, 0}, t);
  EXPECT_EQ(ut.codes, (Bytes{0xd1, 0x58, 0x1f}));
}

TEST(Uniform, SizesAndGroups) {
  EXPECT_EQ(q::uniform_code_bytes(0, 3), 0u);
  EXPECT_EQ(q::uniform_code_bytes(1, 3), 1u);
  EXPECT_EQ(q::uniform_code_bytes(8, 3), 3u);
  EXPECT_EQ(q::uniform_code_bytes(70, 3), 27u);
  EXPECT_EQ(q::uniform_code_bytes(70, 8), 70u);
  EXPECT_EQ(q::uniform_code_bytes(5, 2), 2u);
  EXPECT_EQ(q::uniform_groups(0, 32), 0);
  EXPECT_EQ(q::uniform_groups(64, 32), 2);
  EXPECT_EQ(q::uniform_groups(65, 32), 3);
  EXPECT_EQ(q::uniform_groups(7, 1), 7);
}

// Per group: Z is f16(min), S is the smallest f16 whose top level reaches the max (symmetric:
// Q * S >= max|x|), and every value is within the bound quant.h states. Data with offsets and
// tiny spreads reach the |m - Z| and subnormal-S terms; n = 1000 leaves a short last group.
TEST(Uniform, ErrorBoundAndMinimalScaleOnRandomData) {
  struct Data {
    float mean, sd;
  };
  const Data datas[] = {{0, 1}, {10, 0.01f}, {-3, 1e-3f}, {0, 1e-5f}, {0.5f, 100}};
  int64_t checked = 0, zero_term = 0, subnormal_term = 0;
  for (int bits : {2, 3, 4, 8}) {
    for (int group : {1, 2, 5, 32, 64, 100}) {
      for (bool sym : {false, true}) {
        const q::UniformParams p{bits, group, sym};
        const int L = sym ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
        for (const Data& dt : datas) {
          SCOPED_TRACE(params_name(p) + " mean " + std::to_string(dt.mean) + " sd " +
                       std::to_string(dt.sd));
          const Floats x = gaussian(1000, unsigned(bits * 131 + group * 7 + sym), dt.mean, dt.sd);
          const int64_t n = int64_t(x.size());
          const Uniform u = enc_uniform(x, p);
          const Floats y = dec_uniform(u, n, p);
          for (int64_t g = 0; g < q::uniform_groups(n, group); ++g) {
            const int64_t begin = g * group, end = std::min(n, begin + group);
            const float mn = *std::min_element(x.begin() + begin, x.begin() + end);
            const float mx = *std::max_element(x.begin() + begin, x.begin() + end);
            const uint16_t sb = u.scales[size_t(g)];
            const double S = f(sb);
            double bound;
            if (sym) {
              const float amax = std::max(std::fabs(mn), std::fabs(mx));
              ASSERT_GE(float(L) * f(sb), amax) << "group " << g;
              if (sb != 0) {
                ASSERT_LT(float(L) * f(uint16_t(sb - 1)), amax) << "group " << g;
              }
              bound = std::max(S / 2, L * 0x1p-24) + L * S * 0x1p-52;
            } else {
              const uint16_t zb = u.zeros[size_t(g)];
              const float Z = f(zb);
              ASSERT_EQ(zb, h(mn)) << "group " << g;
              if (mn == mx || Z >= mx) {
                ASSERT_EQ(sb, 0) << "group " << g;  // constant, or all at or below Z
              } else {
                // The decoder's top level reaches the max, and the next smaller scale's does not.
                ASSERT_GE(float(L) * f(sb) + Z, mx) << "group " << g;
                ASSERT_GT(sb, 0) << "group " << g;
                ASSERT_LT(float(L) * f(uint16_t(sb - 1)) + Z, mx) << "group " << g;
              }
              // Close to the ideal s, shifted by the zero's rounding.
              ASSERT_LE(S, std::max(0.0, (double(mx) - Z) / L) * (1 + 0x1p-10) + 0x1p-24) << g;
              const double M = std::max(std::fabs(double(Z)), std::fabs(double(Z) + L * S));
              const double zt = std::fabs(double(mn) - Z);
              bound = std::max({S / 2, zt, L * 0x1p-24}) + M * 0x1p-23;
              zero_term += zt > S / 2;
              subnormal_term += L * 0x1p-24 > S / 2 && S > 0;
            }
            for (int64_t i = begin; i < end; ++i) {
              ++checked;
              ASSERT_LE(std::fabs(double(y[size_t(i)]) - double(x[size_t(i)])), bound)
                  << "value " << i << " x " << x[size_t(i)] << " x^ " << y[size_t(i)] << " S " << S;
            }
          }
        }
      }
    }
  }
  // The data must reach the special terms of the bound, or the test checks less than it claims.
  EXPECT_GT(zero_term, 100);
  EXPECT_GT(subnormal_term, 10);
  std::printf(
      "%lld values within the bound; %lld groups where |m - Z| > S/2, %lld with a "
      "subnormal S\n",
      (long long)checked, (long long)zero_term, (long long)subnormal_term);
}

TEST(Uniform, AllEqualGroupsAreExact) {
  // f16 values, including -0, subnormals and the extremes: S = 0 and Z = the value.
  const float values[] = {0.0f,      -0.0f,        1.0f,        -3.5f,   65504.0f,
                          -65504.0f, 5 * 0x1p-24f, f(h(1e-3f)), 1234.0f, -0x1p-14f};
  for (int bits : {2, 3, 4, 8}) {
    for (int group : {1, 4, 33}) {
      const q::UniformParams p{bits, group, false};
      for (float c : values) {
        SCOPED_TRACE(params_name(p) + " value " + std::to_string(c));
        const Floats x(size_t(group) * 2 + 1, c);  // two full groups and a short one
        const Uniform u = enc_uniform(x, p);
        for (uint16_t s : u.scales) EXPECT_EQ(s, 0);
        const Floats y = dec_uniform(u, int64_t(x.size()), p);
        for (size_t i = 0; i < x.size(); ++i) ASSERT_TRUE(same_float(y[i], c)) << i << " " << y[i];
      }
      // Not an f16 value: the nearest f16 is the best a stored zero can do.
      const Floats x(size_t(group), 0.1f);
      const Uniform u = enc_uniform(x, p);
      EXPECT_EQ(u.scales[0], 0);
      EXPECT_EQ(u.zeros[0], h(0.1f));
      for (float v : dec_uniform(u, group, p)) EXPECT_EQ(v, f(h(0.1f)));
    }
    // Symmetric: zeros are exact (S = 0); 2-bit (Q = 1) stores any f16 constant as S itself.
    const Floats zeros(40, 0.0f);
    EXPECT_EQ(round_trip(zeros, {bits, 8, true}), zeros);
  }
  const Floats c(16, -3.5f);
  EXPECT_EQ(round_trip(c, {2, 16, true}), c);
}

TEST(Uniform, PackingRoundTripLengths1To70) {
  for (int bits : {2, 3, 4, 8}) {
    const int L = (1 << bits) - 1;
    for (int64_t n = 1; n <= 70; ++n) {
      SCOPED_TRACE(std::to_string(bits) + " bits, n " + std::to_string(n));
      // One group holding 0 and L: Z = 0, S = 1, so the codes are the values themselves.
      Floats x(static_cast<size_t>(n));
      std::vector<uint32_t> codes(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) codes[size_t(i)] = uint32_t((i * 5 + 3) % (L + 1));
      codes[0] = 0;  // also a lone value's code: a constant group has S = 0 and code 0
      if (n > 1) codes[size_t(n - 1)] = uint32_t(L);
      for (int64_t i = 0; i < n; ++i) x[size_t(i)] = float(codes[size_t(i)]);
      const q::UniformParams p{bits, 1000, false};
      const Uniform u = enc_uniform(x, p);
      ASSERT_EQ(u.codes.size(), size_t((n * bits + 7) / 8));
      EXPECT_EQ(u.codes, pack_reference(codes, bits));  // also: the padding bits are 0
      EXPECT_EQ(dec_uniform(u, n, p), x);
    }
  }
}

// decode(encode(y)) == y for y = decode(encode(x)), bit for bit.
TEST(Quant, StableUnderRequantization) {
  std::vector<Floats> datas = {gaussian(4096, 1), gaussian(4096, 2, 10, 0.01f),
                               gaussian(4096, 3, -2, 1e-4f), gaussian(4096, 4, 0, 1e-3f),
                               gaussian(4096, 5, 3e-3f, 1e-6f)};
  auto same = [](const Floats& a, const Floats& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
  };
  for (size_t k = 0; k < datas.size(); ++k) {
    SCOPED_TRACE("data " + std::to_string(k));
    const Floats& x = datas[k];
    const int64_t n = int64_t(x.size());
    const Floats y8 = dec_q8(enc_q8(x), n), y4 = dec_q4(enc_q4(x), n);
    EXPECT_TRUE(same(dec_q8(enc_q8(y8), n), y8)) << "q8_0";
    EXPECT_TRUE(same(dec_q4(enc_q4(y4), n), y4)) << "q4_0";
    for (int bits : {2, 3, 4, 8})
      for (int group : {1, 2, 3, 7, 32, 64, 128})
        for (bool sym : {false, true}) {
          const q::UniformParams p{bits, group, sym};
          const Floats y = round_trip(x, p);
          const Floats y2 = round_trip(y, p);
          int64_t diff = 0;
          for (size_t i = 0; i < y.size(); ++i) diff += !same_float(y[i], y2[i]);
          EXPECT_EQ(diff, 0) << params_name(p);
        }
  }
}

TEST(Quant, ErrorOrderingOnGaussianData) {
  const Floats x = gaussian(1 << 16, 9);
  const int64_t n = int64_t(x.size());
  for (bool sym : {false, true}) {
    double prev = 0;
    for (int bits : {8, 4, 3, 2}) {
      const Floats y = round_trip(x, {bits, 32, sym});
      const double e = q::relative_error(y.data(), x.data(), n);
      EXPECT_GT(e, prev) << bits << " bits" << (sym ? " symmetric" : "");
      prev = e;
      std::printf("uniform %d-bit group 32 %s: relative error %.4f\n", bits,
                  sym ? "symmetric " : "asymmetric", e);
    }
    EXPECT_LT(q::relative_error(round_trip(x, {8, 32, sym}).data(), x.data(), n), 0.01);
    EXPECT_LT(prev, 1.0);
  }
  const double e8 = q::relative_error(dec_q8(enc_q8(x), n).data(), x.data(), n);
  const double e4 = q::relative_error(dec_q4(enc_q4(x), n).data(), x.data(), n);
  std::printf("q8_0: relative error %.4f, q4_0: %.4f\n", e8, e4);
  EXPECT_LT(e8, e4);
  EXPECT_LT(e8, 0.01);
  EXPECT_LT(e4, 0.2);
}

// Inputs above the parallel threshold are encoded by threads in 8-code chunks; encoding the same
// values in small (serial) pieces that start on a byte and group boundary must give the same bytes.
TEST(Quant, ThreadedMatchesPiecewise) {
  const Floats x = gaussian(100000, 21, 0.5f, 3);
  const int64_t n = int64_t(x.size());
  for (int bits : {3, 8}) {
    for (bool sym : {false, true}) {
      const q::UniformParams p{bits, 32, sym};
      const Uniform whole = enc_uniform(x, p);
      const int64_t piece = 32 * 8 * 16;  // 4096 values: whole groups and whole bytes
      Uniform parts;
      for (int64_t b = 0; b < n; b += piece) {
        const Floats xs(x.begin() + b, x.begin() + std::min(n, b + piece));
        const Uniform u = enc_uniform(xs, p);
        parts.codes.insert(parts.codes.end(), u.codes.begin(), u.codes.end());
        parts.scales.insert(parts.scales.end(), u.scales.begin(), u.scales.end());
        parts.zeros.insert(parts.zeros.end(), u.zeros.begin(), u.zeros.end());
      }
      EXPECT_EQ(whole.codes, parts.codes) << params_name(p);
      EXPECT_EQ(whole.scales, parts.scales) << params_name(p);
      EXPECT_EQ(whole.zeros, parts.zeros) << params_name(p);
      const Floats y = dec_uniform(whole, n, p);
      for (int64_t b = 0; b < n; b += piece) {
        const int64_t len = std::min(piece, n - b);
        Floats ys(static_cast<size_t>(len));
        q::decode_uniform(whole.codes.data() + b * bits / 8, whole.scales.data() + b / 32,
                          sym ? nullptr : whole.zeros.data() + b / 32, len, p, ys.data());
        ASSERT_TRUE(std::equal(ys.begin(), ys.end(), y.begin() + b)) << params_name(p) << " " << b;
      }
    }
  }
  const Floats x32(x.begin(), x.begin() + 99968);  // a multiple of 32
  const Bytes q8 = enc_q8(x32), q4 = enc_q4(x32);
  for (int64_t b = 0; b < int64_t(x32.size()); b += 4096) {
    const Floats xs(x32.begin() + b,
                    x32.begin() + std::min<int64_t>(int64_t(x32.size()), b + 4096));
    const Bytes p8 = enc_q8(xs), p4 = enc_q4(xs);
    ASSERT_TRUE(std::equal(p8.begin(), p8.end(), q8.begin() + b / 32 * 34)) << b;
    ASSERT_TRUE(std::equal(p4.begin(), p4.end(), q4.begin() + b / 32 * 18)) << b;
  }
}

TEST(Uniform, BadParamsThrowUsage) {
  Floats x(64, 1.0f);
  Bytes codes(64);
  std::vector<uint16_t> s(64), z(64);
  for (int bits : {-1, 0, 1, 5, 6, 7, 9, 16}) {
    SCOPED_TRACE(bits);
    const q::UniformParams p{bits, 32, false};
    EXPECT_EQ(error_code([&] { q::check_params(p); }), kv::Exit::usage);
    EXPECT_EQ(error_code([&] { q::uniform_code_bytes(64, bits); }), kv::Exit::usage);
    EXPECT_EQ(
        error_code([&] { q::encode_uniform(x.data(), 64, p, codes.data(), s.data(), z.data()); }),
        kv::Exit::usage);
    EXPECT_EQ(
        error_code([&] { q::decode_uniform(codes.data(), s.data(), z.data(), 64, p, x.data()); }),
        kv::Exit::usage);
  }
  for (int group : {0, -1, -32}) {
    SCOPED_TRACE(group);
    const q::UniformParams p{4, group, true};
    EXPECT_EQ(error_code([&] { q::check_params(p); }), kv::Exit::usage);
    EXPECT_EQ(error_code([&] { q::uniform_groups(64, group); }), kv::Exit::usage);
    EXPECT_EQ(
        error_code([&] { q::encode_uniform(x.data(), 64, p, codes.data(), s.data(), z.data()); }),
        kv::Exit::usage);
  }
  const q::UniformParams ok{4, 32, false};
  EXPECT_EQ(error_code([&] { q::check_params(ok); }), kv::Exit::ok);
  EXPECT_EQ(error_code([&] { q::uniform_groups(-1, 32); }), kv::Exit::usage);
  EXPECT_EQ(error_code([&] { q::uniform_code_bytes(-1, 4); }), kv::Exit::usage);
  EXPECT_EQ(
      error_code([&] { q::encode_uniform(x.data(), -1, ok, codes.data(), s.data(), z.data()); }),
      kv::Exit::usage);
  // Asymmetric needs a zero-point buffer; symmetric does not.
  EXPECT_EQ(
      error_code([&] { q::encode_uniform(x.data(), 64, ok, codes.data(), s.data(), nullptr); }),
      kv::Exit::usage);
  EXPECT_EQ(
      error_code([&] { q::decode_uniform(codes.data(), s.data(), nullptr, 64, ok, x.data()); }),
      kv::Exit::usage);
  EXPECT_EQ(error_code([&] {
              q::encode_uniform(x.data(), 64, {4, 32, true}, codes.data(), s.data(), nullptr);
            }),
            kv::Exit::ok);
}

TEST(Uniform, UnrepresentableDataThrowsData) {
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();
  struct Case {
    Floats x;
    bool sym;
  };
  const Case cases[] = {
      {{1, nan, 2}, false}, {{1, inf, 2}, true},
      {{-inf, 0}, false},   {{-70000, 0}, false},  // the min rounds to -Inf in f16
      {{0, 1e7f}, false},                          // S = 1e7 / 15 is beyond f16
      {{-1e7f, 1}, true},                          // S = 1e7 / 7
  };
  for (const Case& c : cases) {
    const q::UniformParams p{4, 8, c.sym};
    SCOPED_TRACE(std::to_string(c.x[0]) + (c.sym ? " symmetric" : ""));
    Bytes codes(8);
    std::vector<uint16_t> s(1), z(1);
    EXPECT_EQ(error_code([&] {
                q::encode_uniform(c.x.data(), int64_t(c.x.size()), p, codes.data(), s.data(),
                                  z.data());
              }),
              kv::Exit::data);
  }
  // The edges of f16's range are fine: Z = -65504, S = 514 (the f16 at or above 131008 / 255),
  // whose top level 255 * 514 - 65504 = 65566 is where the max is pinned (within S/2); 0 is
  // 127.44 steps up, so it decodes to 127 * 514 - 65504 = -226.
  const Floats edge = {-65504, 65504, 0};
  const Uniform u = enc_uniform(edge, {8, 8, false});
  EXPECT_EQ(f(u.scales[0]), 514.0f);
  EXPECT_EQ(dec_uniform(u, 3, {8, 8, false}), (Floats{-65504, 65566, -226}));
}

TEST(RelativeError, Definition) {
  const Floats a = {1, 2, 3}, ref = {1, 2, 4}, zero = {0, 0, 0};
  EXPECT_DOUBLE_EQ(q::relative_error(a.data(), ref.data(), 3), 1 / std::sqrt(21.0));
  EXPECT_EQ(q::relative_error(ref.data(), ref.data(), 3), 0.0);
  EXPECT_EQ(q::relative_error(zero.data(), zero.data(), 3), 0.0);
  EXPECT_EQ(q::relative_error(a.data(), zero.data(), 3), std::numeric_limits<double>::infinity());
  EXPECT_EQ(q::relative_error(a.data(), ref.data(), 0), 0.0);
  EXPECT_EQ(error_code([&] { q::relative_error(a.data(), ref.data(), -1); }), kv::Exit::usage);
}

// ---- vector kernels against the scalar reference ------------------------------------------------
// Each vector path must give the scalar path's bytes and floats exactly. Inputs mix gaussian
// groups with the cases where a shortcut would show: ties between levels, zeros of both signs,
// constant groups, f16-subnormal and float-subnormal ranges, offset groups, magnitudes at the
// edge of f16 and of the block scales.

namespace {

// Runs fn at the scalar level and at the widest one, restoring the level afterwards.
template <class F>
void at_each_level(F fn) {
  const q::Simd widest = q::simd_supported();
  for (q::Simd level : {q::Simd::scalar, widest}) {
    q::set_simd_level(level);
    fn(level);
  }
  q::set_simd_level(widest);
}

// Runs fn(level) at each level and expects the widest to return what the scalar path returned:
// the vector paths are pinned to the scalar code bit for bit.
template <class F>
void expect_same_at_each_level(F fn) {
  std::optional<decltype(fn(q::Simd::scalar))> scalar;
  at_each_level([&](q::Simd level) {
    auto got = fn(level);
    if (!scalar)
      scalar = std::move(got);
    else
      EXPECT_EQ(got, *scalar) << "SIMD level " << int(level);
  });
}

// What an encoder produced: its bytes, or the error it threw.
struct Outcome {
  Bytes bytes;
  std::string error;
  bool operator==(const Outcome&) const = default;
};
template <class F>
Outcome outcome(F fn) {
  Outcome o;
  try {
    o.bytes = fn();
  } catch (const kv::Error& e) {
    o.error = e.what();
  }
  return o;
}

Bytes float_bytes(const Floats& v) {
  Bytes b(v.size() * 4);
  if (!v.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// Groups of 32 values: gaussian, then one edge case per group from the list below.
Floats edge_groups(int64_t groups, unsigned seed) {
  Floats x = gaussian(groups * 32, seed);
  std::mt19937 rng(seed + 1);
  for (int64_t g = 0; g < groups; ++g) {
    float* v = x.data() + g * 32;
    switch (g % 12) {
      case 0:
        break;  // gaussian
      case 1:
        std::fill(v, v + 32, 0.0f);
        break;
      case 2:
        std::fill(v, v + 32, 0.0f);
        v[3] = -0.0f;  // the first zero decides the stored zero's sign
        break;
      case 3:
        // A zero minimum whose first occurrence is -0, after a larger value and before +0.
        for (int i = 0; i < 32; ++i) v[i] = std::fabs(v[i]) + 0.5f;
        v[1] = -0.0f;
        v[4] = 0.0f;
        v[20] = 0.0f;
        break;
      case 4:
        std::fill(v, v + 32, 3.3f);
        break;  // constant, not an f16
      case 5:
        for (int i = 0; i < 32; ++i) v[i] = 10.0f + 0.01f * float(i % 5 - 2);  // offset group
        break;
      case 6:
        for (int i = 0; i < 32; ++i) v[i] *= 1e-6f;  // f16 subnormal scales
        break;
      case 7:
        for (int i = 0; i < 32; ++i) v[i] *= 1e-39f;  // float subnormals
        break;
      case 8:
        for (int i = 0; i < 32; ++i) v[i] = (i % 2 ? 60000.0f : -60000.0f) * (float(i) / 31);
        break;
      case 9:
        // Ties: values on the levels and midway between them, of a grid 0..15 x 0.25.
        for (int i = 0; i < 32; ++i) v[i] = 0.125f * float(i % 31);
        break;
      case 10:
        for (int i = 0; i < 32; ++i) v[i] = float(int(rng() % 9) - 4) * 0.5f;  // ties at .5
        break;
      case 11:
        for (int i = 0; i < 32; ++i) v[i] = std::ldexp(v[i], int(rng() % 32) - 20);
        break;
    }
  }
  return x;
}

}  // namespace

TEST(QuantVector, BlocksMatchTheScalarPath) {
  // Block counts around the 16-block batch; values that hit the rounding ties of both formats.
  for (int64_t blocks : {1, 15, 16, 17, 40, 1100}) {
    Floats x = edge_groups(blocks, unsigned(blocks));
    for (int64_t b = 0; b < blocks; b += 5) {
      float* v = x.data() + b * 32;
      v[0] = 127.0f;  // d = 1: every other value k + 0.5 is a tie for q8_0
      for (int i = 1; i < 32; ++i) v[i] = float(i) - 0.5f - float(i % 3) * 40;
    }
    if (blocks > 16) {
      std::fill(x.begin() + 16 * 32, x.begin() + 17 * 32, 8.4e6f);  // q8_0 scale overflows f16
      x[16 * 32 + 5] = -1e-38f;
    }
    if (blocks > 18)                                                // (17 blocks have no block 18)
      std::fill(x.begin() + 18 * 32, x.begin() + 19 * 32, 1e-38f);  // 1/d overflows (q8_0)
    const int64_t n = int64_t(x.size());
    expect_same_at_each_level([&](q::Simd) {
      const Outcome o8 = outcome([&] { return enc_q8(x); });
      const Outcome o4 = outcome([&] { return enc_q4(x); });
      EXPECT_TRUE(o8.error.empty() && o4.error.empty());
      return std::tuple(o8, o4, float_bytes(dec_q8(o8.bytes, n)), float_bytes(dec_q4(o4.bytes, n)));
    });
  }
  // Arbitrary stored bytes (scales that are NaN, Inf, subnormal) decode alike.
  std::mt19937 rng(5);
  Bytes random(34 * 37);
  for (auto& b : random) b = uint8_t(rng());
  expect_same_at_each_level([&](q::Simd) {
    Floats y8(37 * 32), y4(37 * 32);
    q::decode_q8_0(random.data(), 37 * 32, y8.data());
    q::decode_q4_0(random.data(), 37 * 32, y4.data());
    y8.insert(y8.end(), y4.begin(), y4.end());
    return float_bytes(y8);
  });
  // NaN/Inf: the same error, naming the same value.
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Floats x = gaussian(32 * 20, 9);
    x[32 * 17 + 4] = bad;
    expect_same_at_each_level([&](q::Simd) {
      const Outcome o8 = outcome([&] { return enc_q8(x); });
      const Outcome o4 = outcome([&] { return enc_q4(x); });
      EXPECT_FALSE(o8.error.empty());
      return o8.error + o4.error;
    });
  }
}

namespace {

// Groups of 32 as the strided group kernels take them: `groups` groups, `group_stride` apart,
// their values `value_stride` apart.
struct GroupLayout {
  int64_t groups, group_stride, value_stride;
};

// Groups `e` (32 values each, l.groups of them) laid out in `l`'s order, zeros between them.
Floats laid_out(const GroupLayout& l, const Floats& e) {
  Floats x(static_cast<size_t>((l.groups - 1) * l.group_stride + 31 * l.value_stride + 1), 0.0f);
  for (int64_t g = 0; g < l.groups; ++g)
    for (int64_t i = 0; i < 32; ++i)
      x[size_t(g * l.group_stride + i * l.value_stride)] = e[size_t(g * 32 + i)];
  return x;
}

// Runs body(l, bits, symmetric) for every layout, 2, 3, 4 and 8 bits, asymmetric and symmetric,
// with a trace naming the case.
template <size_t N, typename Body>
void for_each_group_case(const GroupLayout (&layouts)[N], Body body) {
  for (const GroupLayout& l : layouts)
    for (int bits : {2, 3, 4, 8})
      for (bool symmetric : {false, true}) {
        SCOPED_TRACE(testing::Message()
                     << "groups " << l.groups << " stride " << l.group_stride << "/"
                     << l.value_stride << " bits " << bits << (symmetric ? " symmetric" : ""));
        body(l, bits, symmetric);
      }
}

}  // namespace

TEST(QuantVector, GroupsMatchTheScalarPath) {
  // Rows (groups along a row, contiguous or with a gap) and columns (groups down D channels:
  // D = 48 fills three batches, D = 20 leaves a tail of 4 to the scalar path, D = 160 is more
  // batches than the column decoder takes at once).
  const GroupLayout layouts[] = {{37, 32, 1}, {16, 40, 1}, {1, 32, 1},
                                 {48, 1, 48}, {20, 1, 20}, {160, 1, 160}};
  for_each_group_case(layouts, [&](const GroupLayout& l, int bits, bool symmetric) {
    const q::UniformParams p{bits, 32, symmetric};
    const Floats e = edge_groups(l.groups, unsigned(bits * 7 + l.groups));
    Floats x = laid_out(l, e);
    const int64_t span = int64_t(x.size());
    expect_same_at_each_level([&](q::Simd level) {
      std::vector<uint16_t> scales(size_t(l.groups)), zeros(size_t(l.groups));
      Bytes codes(q::uniform_code_bytes(l.groups * 32, bits));
      const Outcome o = outcome([&] {
        q::quantize_groups(x.data(), l.groups, l.group_stride, l.value_stride, p, scales.data(),
                           zeros.data(), codes.data());
        Bytes all = codes;
        for (auto* v : {&scales, &zeros})
          for (uint16_t s : *v) all.insert(all.end(), {uint8_t(s), uint8_t(s >> 8)});
        return all;
      });
      EXPECT_TRUE(o.error.empty()) << o.error;
      Floats y(static_cast<size_t>(span), -1.0f);
      q::dequantize_groups(codes.data(), scales.data(), zeros.data(), l.groups, l.group_stride,
                           l.value_stride, p, y.data());
      // And each group on its own, through the one-group functions.
      if (level == q::Simd::scalar)
        for (int64_t g = 0; g < l.groups; ++g) {
          uint16_t s, z = 0;
          uint8_t c[32];
          q::quantize_group(e.data() + g * 32, 32, p, &s, &z, c);
          EXPECT_EQ(s, scales[size_t(g)]);
          if (!symmetric) {
            EXPECT_EQ(z, zeros[size_t(g)]);
          }
        }
      return std::pair(o, float_bytes(y));
    });
  });
}

TEST(QuantVector, GroupErrorsMatchTheScalarPath) {
  // A group f16 cannot describe (range 1e6), then NaN: the same first error at every level.
  for (int64_t bad_group : {0, 5, 17}) {
    for (float bad : {2e6f, std::numeric_limits<float>::quiet_NaN()}) {
      for (bool columns : {false, true}) {
        const int64_t G = 32;
        Floats x = gaussian(G * 32, unsigned(bad_group));
        if (columns)
          x[size_t(9 * G + bad_group)] = bad;  // row 9 of column bad_group
        else
          x[size_t(bad_group * 32 + 9)] = bad;
        if (bad > 1e6f) x[size_t(columns ? bad_group : bad_group * 32)] = -bad;
        expect_same_at_each_level([&](q::Simd) {
          std::vector<uint16_t> scales(G), zeros(G);
          Bytes codes(q::uniform_code_bytes(G * 32, 2));
          const Outcome o = outcome([&] {
            q::quantize_groups(x.data(), G, columns ? 1 : 32, columns ? G : 1, {2, 32, false},
                               scales.data(), zeros.data(), codes.data());
            return Bytes{};
          });
          EXPECT_FALSE(o.error.empty());
          return o.error;
        });
      }
    }
  }
}

TEST(QuantVector, F16InputMatchesFloatInput) {
  // The f16 entry points must give the float functions' bytes for the same values, at the
  // vector level; at the scalar level (or without a kernel for the parameters) they decline.
  auto to_f16 = [](const Floats& x) {
    std::vector<uint16_t> b(x.size());
    for (size_t i = 0; i < x.size(); ++i) b[i] = h(std::clamp(x[i], -65504.0f, 65504.0f));
    return b;
  };
  auto to_float = [](const std::vector<uint16_t>& b) {
    Floats x(b.size());
    for (size_t i = 0; i < b.size(); ++i) x[i] = f(b[i]);
    return x;
  };
  // Blocks: edge groups as f16 (ties, zeros of both signs, subnormals, near 65504).
  for (int64_t blocks : {1, 16, 17, 40}) {
    const std::vector<uint16_t> half = to_f16(edge_groups(blocks, unsigned(blocks) + 100));
    const Floats x = to_float(half);
    const int64_t n = int64_t(x.size());
    at_each_level([&](q::Simd level) {
      Bytes b8(q::q8_0_bytes(n)), b4(q::q4_0_bytes(n));
      const bool done8 = q::encode_q8_0_f16(half.data(), n, b8.data());
      const bool done4 = q::encode_q4_0_f16(half.data(), n, b4.data());
      EXPECT_EQ(done8, level != q::Simd::scalar);
      EXPECT_EQ(done4, level != q::Simd::scalar);
      if (done8) {
        EXPECT_EQ(b8, enc_q8(x));
      }
      if (done4) {
        EXPECT_EQ(b4, enc_q4(x));
      }
      // NaN and Inf: declined (the float functions then throw).
      for (uint16_t bad : {uint16_t(0x7e00), uint16_t(0xfc00)}) {
        std::vector<uint16_t> y = half;
        y[size_t(n - 7)] = bad;
        EXPECT_FALSE(q::encode_q8_0_f16(y.data(), n, b8.data()));
        EXPECT_FALSE(q::encode_q4_0_f16(y.data(), n, b4.data()));
      }
    });
  }
  // Groups: rows and columns as in GroupsMatchTheScalarPath; 3 and 8 bits have no kernel.
  const GroupLayout layouts[] = {{37, 32, 1}, {16, 40, 1}, {48, 1, 48}, {20, 1, 20}};
  for_each_group_case(layouts, [&](const GroupLayout& l, int bits, bool symmetric) {
    const q::UniformParams p{bits, 32, symmetric};
    const Floats laid = laid_out(l, edge_groups(l.groups, unsigned(bits * 5 + l.groups)));
    const std::vector<uint16_t> half = to_f16(laid);
    const Floats x = to_float(half);
    auto run = [&](auto quantize, const auto* input) {
      std::vector<uint16_t> scales(size_t(l.groups)), zeros(size_t(l.groups));
      Bytes codes(q::uniform_code_bytes(l.groups * 32, bits));
      const bool done = quantize(input, l.groups, l.group_stride, l.value_stride, p, scales.data(),
                                 zeros.data(), codes.data());
      for (auto* v : {&scales, &zeros})
        for (uint16_t s : *v) codes.insert(codes.end(), {uint8_t(s), uint8_t(s >> 8)});
      return std::pair(done, codes);
    };
    at_each_level([&](q::Simd level) {
      const auto [done, bytes] = run(q::quantize_groups_f16, half.data());
      const bool kernel = level != q::Simd::scalar && (bits == 2 || bits == 4) &&
                          (l.value_stride == 1 || l.groups % 16 == 0);
      EXPECT_EQ(done, kernel);
      if (done) {
        const auto [_, ref] = run(
            [](auto... a) {
              q::quantize_groups(a...);
              return true;
            },
            x.data());
        EXPECT_EQ(bytes, ref);
      }
      std::vector<uint16_t> y = half;
      y[size_t((l.groups - 1) * l.group_stride + 9 * l.value_stride)] = 0x7c00;  // Inf
      EXPECT_FALSE(run(q::quantize_groups_f16, y.data()).first);
    });
  });
}

namespace {

// Floats in 64-byte aligned storage.
struct AlignedFloats {
  explicit AlignedFloats(size_t n)
      : p(static_cast<float*>(::operator new[](n * sizeof(float), std::align_val_t(64)))) {
    std::fill(p, p + n, -1.0f);
  }
  ~AlignedFloats() { ::operator delete[](p, std::align_val_t(64)); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* data() { return p; }
  float* p;
};

}  // namespace

TEST(QuantVector, AdversarialGroupsMatchTheScalarPath) {
  // Thousands of groups where a code or a scale computed rather than searched for could slip:
  // ranges from f16-subnormal to near 65504, offsets large against the range (Z far from the
  // min), and values on the thresholds between levels and one float either side of them.
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const int64_t groups = 16 * 96;
  for (int bits : {2, 4})
    for (bool symmetric : {false, true}) {
      SCOPED_TRACE(testing::Message() << "bits " << bits << (symmetric ? " symmetric" : ""));
      const q::UniformParams p{bits, 32, symmetric};
      const int L = symmetric ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
      Floats e(size_t(groups * 32));
      for (int64_t g = 0; g < groups; ++g) {
        float* v = e.data() + g * 32;
        const float range = std::ldexp(0.5f + unit(rng), int(rng() % 40) - 28);
        const float offset =
            (g % 3 == 0) ? 0.0f : range * std::ldexp(unit(rng) - 0.5f, int(rng() % 16));
        const float mn = std::clamp(offset - range / 2, -60000.0f, 60000.0f);
        const float mx = std::clamp(offset + range / 2, -60000.0f, 60000.0f);
        // The grid these extremes give, from the scalar code.
        const float ends[2] = {mn, mx};
        uint16_t s = 0, z = 0;
        uint8_t c[2];
        q::set_simd_level(q::Simd::scalar);
        q::quantize_group(ends, 2, p, &s, &z, c);
        q::set_simd_level(q::simd_supported());
        const double S = f(s), Z = symmetric ? 0.0 : f(z);
        v[0] = mn;
        v[1] = mx;
        for (int i = 2; i < 32; ++i) {
          const int j = int(rng() % unsigned(L));
          const double t = Z + (j + 0.5) * S * (symmetric && rng() % 2 ? -1 : 1);
          float x = float(t);
          if (double(x) < t) x = std::nextafter(x, 1e30f);
          switch (rng() % 4) {
            case 0:
              x = std::nextafter(x, -1e30f);
              break;
            case 1:
              x = std::nextafter(x, 1e30f);
              break;
            case 2:
              x = mn + (mx - mn) * unit(rng);
              break;
          }
          v[i] = std::clamp(x, symmetric ? -std::max(-mn, mx) : mn,
                            symmetric ? std::max(-mn, mx) : mx);
        }
        std::shuffle(v, v + 32, rng);
      }
      for (const GroupLayout& l : {GroupLayout{groups, 32, 1}, GroupLayout{groups, 1, groups}}) {
        const Floats x = laid_out(l, e);
        const size_t span = x.size();
        expect_same_at_each_level([&](q::Simd) {
          std::vector<uint16_t> scales(static_cast<size_t>(groups)),
              zeros(static_cast<size_t>(groups));
          Bytes codes(q::uniform_code_bytes(groups * 32, bits));
          q::quantize_groups(x.data(), groups, l.group_stride, l.value_stride, p, scales.data(),
                             zeros.data(), codes.data());
          // Decoded into 64-byte aligned storage (the vector decoders stream there) and one
          // float off it.
          Bytes decoded;
          for (size_t offset : {0, 1}) {
            AlignedFloats y(span + 1);
            q::dequantize_groups(codes.data(), scales.data(), zeros.data(), groups, l.group_stride,
                                 l.value_stride, p, y.data() + offset);
            const Bytes b = float_bytes(Floats(y.data() + offset, y.data() + offset + span));
            decoded.insert(decoded.end(), b.begin(), b.end());
          }
          for (auto* v : {&scales, &zeros})
            for (uint16_t s : *v) codes.insert(codes.end(), {uint8_t(s), uint8_t(s >> 8)});
          return std::pair(codes, decoded);
        });
      }
    }
}

TEST(QuantVector, Q4_0RoundsTheProductBeforeAddingAsGgml) {
  // Values whose code changes when x * id + 8.5 is fused into one rounding: the exact product
  // lies between 1 and 1.5 ulps below a code's boundary m - 8.5 (m = 13..15, where the product's
  // ulp is half the sum's): rounded, it is one ulp below, and adding 8.5 gives a tie that rounds
  // to even, up to m; fused, the sum stays below the tie and rounds down.
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> unit(1.0f, 2.0f);
  Floats x;
  int found = 0;
  while (found < 64) {
    const float top = -4.0f * unit(rng);  // the first value of largest magnitude
    const float d = top / -8, id = 1.0f / d;
    float v[32];
    v[0] = top;
    int k = 1;
    for (int m = 13; m <= 15 && k < 32; ++m) {
      const double h = m - 8.5, ulp = std::ldexp(1.0, std::ilogb(h) - 23);
      const float guess = float((h - 1.25 * ulp) / double(id));
      for (float c = std::nextafter(guess, -1e30f), e = std::nextafter(guess, 1e30f); k < 32;
           c = std::nextafter(c, 1e30f)) {
        const double p = double(c) * double(id);  // exact
        if (p < h - ulp && p > h - 1.5 * ulp && std::fabs(c) < std::fabs(top)) v[k++] = c;
        if (c == e) break;
      }
    }
    if (k == 1) continue;
    for (int i = k; i < 32; ++i) v[i] = v[1 + (i % (k - 1))];
    x.insert(x.end(), v, v + 32);
    ++found;
  }
  expect_same_at_each_level([&](q::Simd) {
    const Bytes b = enc_q4(x), b8 = enc_q8(x);
    // And both decoded, into aligned storage (streamed) and one float off it.
    const int64_t n = int64_t(x.size());
    Bytes decoded;
    for (size_t offset : {0, 1}) {
      AlignedFloats y(x.size() * 2 + 1);
      q::decode_q4_0(b.data(), n, y.data() + offset);
      q::decode_q8_0(b8.data(), n, y.data() + offset + n);
      const Bytes d = float_bytes(Floats(y.data() + offset, y.data() + offset + 2 * n));
      decoded.insert(decoded.end(), d.begin(), d.end());
    }
    return std::pair(b, decoded);
  });
  // The inputs are the cases meant: fused, their codes would differ.
  int differ = 0;
  for (size_t b = 0; b < x.size() / 32; ++b) {
    const float d = x[b * 32] / -8, id = 1.0f / d;
    for (int j = 1; j < 32; ++j) {
      const float v = x[b * 32 + size_t(j)];
      volatile float product = v * id;  // (volatile: rounded, whatever the compiler fuses)
      differ += int(std::fma(v, id, 8.5f)) != int(product + 8.5f);
    }
  }
  EXPECT_GT(differ, 0);
}

TEST(QuantVector, FlatGroupsDecodeToTheirStoredZero) {
  // S = 0: every value is Z itself, bit for bit: -0 stays -0 (0 + Z would not), a signaling NaN
  // stays signaling.
  const int64_t groups = 32;
  std::vector<uint16_t> scales(groups, 0), zeros(groups);
  const uint16_t special[] = {0x8000, 0x0000, 0x7d01, 0xfd01, 0x7c00, 0x3c00, 0x8001, 0xbc00};
  for (int64_t g = 0; g < groups; ++g) zeros[size_t(g)] = special[g % 8];
  Bytes codes(q::uniform_code_bytes(groups * 32, 4));
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = uint8_t(i * 37);
  for (bool columns : {false, true}) {
    SCOPED_TRACE(columns ? "columns" : "rows");
    expect_same_at_each_level([&](q::Simd) {
      AlignedFloats y(groups * 32);
      q::dequantize_groups(codes.data(), scales.data(), zeros.data(), groups, columns ? 1 : 32,
                           columns ? groups : 1, {4, 32, false}, y.data());
      return float_bytes(Floats(y.data(), y.data() + groups * 32));
    });
  }
}
