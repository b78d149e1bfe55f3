// GGUF reader, writer and dequantization: the real stories260K model, hand-built blocks of each
// supported type, a writer round trip, and malformed files (each with its exit code and message).
// GgufReference.* compare against PyPI's gguf package when tests/cli/gguf_reference.sh runs them.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "helpers.h"
#include "kv/error.h"
#include "kv/gguf.h"
#include "kvk/ops.h"

namespace {

using kv::Exit;
using kv::GgmlType;
using kv::GgufFile;
using kv::GgufType;
using kv::GgufWriter;
using Bytes = std::vector<uint8_t>;

// ---- helpers ---------------------------------------------------------------------------------

// Little-endian byte builder for hand-made (often malformed) files.
struct Builder {
  Bytes b;
  Builder& u8(uint8_t v) { return raw(&v, 1); }
  Builder& u16(uint16_t v) { return raw(&v, 2); }
  Builder& u32(uint32_t v) { return raw(&v, 4); }
  Builder& u64(uint64_t v) { return raw(&v, 8); }
  Builder& f32(float v) { return raw(&v, 4); }
  Builder& str(const std::string& s) { return u64(s.size()).raw(s.data(), s.size()); }
  Builder& raw(const void* p, size_t n) {
    b.insert(b.end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n);
    return *this;
  }
  Builder& magic() { return raw("GGUF", 4); }
  Builder& header(uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    return magic().u32(version).u64(n_tensors).u64(n_kv);
  }
  Builder& pad(size_t a) {
    b.resize((b.size() + a - 1) / a * a, 0);
    return *this;
  }
  Builder& zeros(size_t n) {
    b.resize(b.size() + n, 0);
    return *this;
  }
};

// A file with one key (general.architecture = "test") and one tensor "t", then `data_bytes`
// zero bytes of data section, which starts at byte 128.
Bytes one_tensor(std::vector<uint64_t> dims, uint32_t type, uint64_t offset, size_t data_bytes) {
  Builder f;
  f.header(3, 1, 1).str("general.architecture").u32(8).str("test");
  f.str("t").u32(uint32_t(dims.size()));
  for (uint64_t d : dims) f.u64(d);
  f.u32(type).u64(offset).pad(32).zeros(data_bytes);
  return f.b;
}

// Parses `image` and expects kv::Error with `code` and exactly `message`.
void expect_error(const Bytes& image, Exit code, const std::string& message) {
  try {
    GgufFile g(image.data(), image.size(), "x.gguf");
    ADD_FAILURE() << "parsed, expected: " << message;
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), int(code)) << e.what();
    EXPECT_EQ(std::string(e.what()), message);
  }
}

uint16_t h(float f) {
  return kvk::f32_to_f16(f);
}

std::string write_temp(const std::string& name, const Bytes& b) {
  std::string path = kvtest::temp_dir() + "/" + name;
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
  return path;
}

Bytes read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

// ---- stories260K -------------------------------------------------------------------------

// From the environment (ctest sets it); KV_MODELS_DIR_DEFAULT, when the build defines it, is the
// fallback.
std::string models_dir() {
  if (const char* d = std::getenv("KV_MODELS_DIR")) return d;
#ifdef KV_MODELS_DIR_DEFAULT
  return KV_MODELS_DIR_DEFAULT;
#else
  return "";
#endif
}

TEST(Gguf, Stories260KMetadataAndTensors) {
  if (models_dir().empty()) GTEST_SKIP() << "KV_MODELS_DIR is not set";
  GgufFile g(models_dir() + "/stories260K.gguf");
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.alignment(), 32u);
  EXPECT_EQ(g.metadata().size(), 19u);
  EXPECT_EQ(g.get("general.architecture").as_string("a"), "llama");
  EXPECT_EQ(g.get("llama.block_count").as_int("b"), 5);
  EXPECT_EQ(g.get("llama.embedding_length").as_int("e"), 64);
  EXPECT_EQ(g.get("llama.feed_forward_length").as_int("f"), 172);
  EXPECT_EQ(g.get("llama.attention.head_count").as_int("h"), 8);
  EXPECT_EQ(g.get("llama.attention.head_count_kv").as_int("k"), 4);
  EXPECT_EQ(g.get("llama.context_length").as_int("c"), 2048);
  EXPECT_EQ(g.get("llama.rope.dimension_count").as_int("r"), 8);
  EXPECT_EQ(g.get("llama.block_count").type, GgufType::UINT32);
  EXPECT_NEAR(g.get("llama.attention.layer_norm_rms_epsilon").as_float("eps"), 1e-5, 1e-12);
  EXPECT_EQ(g.get("tokenizer.ggml.model").as_string("m"), "llama");
  EXPECT_EQ(g.get("tokenizer.ggml.bos_token_id").as_int("bos"), 1);
  EXPECT_EQ(g.get("tokenizer.ggml.eos_token_id").as_int("eos"), 2);
  const auto& tokens = g.get("tokenizer.ggml.tokens");
  EXPECT_EQ(tokens.elem_type, GgufType::STRING);
  ASSERT_EQ(tokens.as_array("t").size(), 512u);
  EXPECT_EQ(tokens.as_array("t")[1].as_string("t"), "<s>");
  EXPECT_EQ(tokens.as_array("t")[2].as_string("t"), "</s>");
  EXPECT_EQ(g.get("tokenizer.ggml.scores").as_array("s").size(), 512u);
  EXPECT_EQ(g.get("tokenizer.ggml.token_type").elem_type, GgufType::INT32);
  EXPECT_EQ(g.get("tokenizer.ggml.padding_token_id").as_int("p"), 4294967295);

  ASSERT_EQ(g.tensors().size(), 3u + 5u * 9u);
  EXPECT_EQ(g.data_offset(), 14176u);
  struct Want {
    const char* name;
    std::vector<int64_t> dims;
  };
  const Want wants[] = {
      {"token_embd.weight", {64, 512}},       {"output_norm.weight", {64}},
      {"output.weight", {64, 512}},           {"blk.0.attn_q.weight", {64, 64}},
      {"blk.0.attn_k.weight", {64, 32}},      {"blk.0.attn_v.weight", {64, 32}},
      {"blk.4.attn_output.weight", {64, 64}}, {"blk.4.ffn_gate.weight", {64, 172}},
      {"blk.4.ffn_down.weight", {172, 64}},   {"blk.4.ffn_up.weight", {64, 172}},
      {"blk.2.attn_norm.weight", {64}},       {"blk.2.ffn_norm.weight", {64}},
  };
  for (const Want& w : wants) {
    const kv::GgufTensor* t = g.find_tensor(w.name);
    ASSERT_NE(t, nullptr) << w.name;
    EXPECT_EQ(t->dims, w.dims) << w.name;
    EXPECT_EQ(t->type, GgmlType::F32) << w.name;
    EXPECT_EQ(t->bytes, uint64_t(t->elements()) * 4) << w.name;
    EXPECT_EQ(t->offset % 32, 0u);
  }
  EXPECT_EQ(g.find_tensor("blk.5.attn_q.weight"), nullptr);
  const kv::GgufTensor& last = g.tensors().back();
  EXPECT_EQ(last.name, "blk.4.ffn_norm.weight");
  EXPECT_EQ(g.data_offset() + last.offset + last.bytes, 1185376u);  // the file's size

  // The llama2.c checkpoint holds the same weights: its token embedding follows the 7-int32
  // header as [vocab][dim] f32, the same bytes as GGUF's token_embd.weight (dims [64, 512]).
  const Bytes bin = read_all(models_dir() + "/stories260K.bin");
  const kv::GgufTensor* emb = g.find_tensor("token_embd.weight");
  ASSERT_GE(bin.size(), 28 + emb->bytes);
  EXPECT_EQ(std::memcmp(bin.data() + 28, emb->data, emb->bytes), 0);
  const std::vector<float> v = kv::dequantize(*emb);
  ASSERT_EQ(v.size(), 64u * 512u);
  EXPECT_EQ(std::memcmp(v.data(), emb->data, emb->bytes), 0);
}

TEST(Gguf, Stories260KTruncatedAnywhere) {
  if (models_dir().empty()) GTEST_SKIP() << "KV_MODELS_DIR is not set";
  const Bytes full = read_all(models_dir() + "/stories260K.gguf");
  ASSERT_EQ(full.size(), 1185376u);
  std::vector<size_t> cuts;
  for (size_t c = 0; c < 14400; c += 3) cuts.push_back(c);               // header, metadata, infos
  for (size_t c = 14400; c < full.size(); c += 9973) cuts.push_back(c);  // tensor data
  cuts.push_back(full.size() - 1);
  for (size_t c : cuts) {
    try {
      GgufFile g(full.data(), c, "cut.gguf");
      ADD_FAILURE() << "parsed a file cut at " << c;
    } catch (const kv::Error& e) {
      ASSERT_EQ(int(e.code()), 65) << c << ": " << e.what();
    }
  }
  // A cut in the data section names the tensor that no longer fits.
  try {
    GgufFile g(full.data(), full.size() - 1, "cut.gguf");
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(
        std::string(e.what()),
        "'cut.gguf': tensor 'blk.4.ffn_norm.weight' data (offset 1185120, 256 bytes) runs past "
        "the end of the file (truncated?)");
  }
}

// ---- dequantization of hand-made blocks --------------------------------------------------

TEST(GgufDequant, Floats) {
  const float f32[3] = {1.5f, -0.0f, 1e-40f};
  float out[4];
  kv::dequantize(GgmlType::F32, f32, out, 3);
  EXPECT_EQ(std::memcmp(out, f32, sizeof f32), 0);

  const uint16_t f16[4] = {0x3C00, 0xC000, 0x7BFF, 0x0001};  // 1, -2, 65504, 2^-24
  kv::dequantize(GgmlType::F16, f16, out, 4);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 65504.0f);
  EXPECT_EQ(out[3], std::ldexp(1.0f, -24));

  const uint16_t bf16[3] = {0x3F80, 0xC040, 0x7F80};  // 1, -3, +Inf
  kv::dequantize(GgmlType::BF16, bf16, out, 3);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -3.0f);
  EXPECT_TRUE(std::isinf(out[2]) && out[2] > 0);

  // 16-bit floats at an odd address (legal with general.alignment 1) take the unaligned path.
  uint8_t odd[1 + 8];
  std::memcpy(odd + 1, f16, 8);
  kv::dequantize(GgmlType::F16, odd + 1, out, 4);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[3], std::ldexp(1.0f, -24));
}

TEST(GgufDequant, Q8_0) {
  Builder b;
  b.u16(h(0.5f));
  for (int j = 0; j < 32; ++j) b.u8(uint8_t(int8_t(j * 8 - 128)));  // -128, -120, ..., 120
  ASSERT_EQ(b.b.size(), 34u);
  float y[32];
  kv::dequantize(GgmlType::Q8_0, b.b.data(), y, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], float(j * 8 - 128) * 0.5f) << j;
  EXPECT_EQ(y[0], -64.0f);
  EXPECT_EQ(y[31], 60.0f);
}

TEST(GgufDequant, Q4_0) {
  Builder b;
  b.u16(h(2.0f));
  for (int j = 0; j < 16; ++j) b.u8(uint8_t(j | ((15 - j) << 4)));
  ASSERT_EQ(b.b.size(), 18u);
  float y[32];
  kv::dequantize(GgmlType::Q4_0, b.b.data(), y, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], float(j - 8) * 2.0f) << j;              // low nibbles: values 0..15
    EXPECT_EQ(y[j + 16], float((15 - j) - 8) * 2.0f) << j;  // high nibbles: values 16..31
  }
  EXPECT_EQ(y[0], -16.0f);
  EXPECT_EQ(y[16], 14.0f);
}

// Packs 8 six-bit scales and mins the way llama.cpp's quantize_row_q4_K does (the inverse of
// the decoder under test).
void pack_q4_k_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t out[12]) {
  for (int j = 0; j < 4; ++j) {
    out[j] = uint8_t(sc[j] | ((sc[j + 4] >> 4) << 6));
    out[j + 4] = uint8_t(m[j] | ((m[j + 4] >> 4) << 6));
    out[j + 8] = uint8_t((sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4));
  }
}

TEST(GgufDequant, Q4_K) {
  const uint8_t sc[8] = {1, 2, 3, 4, 17, 33, 50, 63}, m[8] = {0, 1, 5, 10, 20, 40, 60, 63};
  uint8_t scales[12];
  pack_q4_k_scales(sc, m, scales);
  Builder b;
  b.u16(h(1.0f)).u16(h(0.5f)).raw(scales, 12);
  // 4 groups of 32 bytes; sub-block 2g takes the low nibbles of group g, 2g+1 the high ones.
  auto q_of = [](int value) {  // the 4-bit value at position `value` (0..255)
    const int sub = value / 32, l = value % 32, byte = (sub / 2) * 32 + l;
    const int lo = byte % 16, hi = 15 - byte % 16;
    return sub % 2 == 0 ? lo : hi;
  };
  for (int i = 0; i < 128; ++i) b.u8(uint8_t((i % 16) | ((15 - i % 16) << 4)));
  ASSERT_EQ(b.b.size(), 144u);
  float y[256];
  kv::dequantize(GgmlType::Q4_K, b.b.data(), y, 256);
  for (int i = 0; i < 256; ++i)
    EXPECT_EQ(y[i], 1.0f * float(sc[i / 32]) * float(q_of(i)) - 0.5f * float(m[i / 32])) << i;
  EXPECT_EQ(y[0], 0.0f);      // sub-block 0: scale 1, min 0, q 0
  EXPECT_EQ(y[32], 29.5f);    // sub-block 1: 2 * 15 - 0.5 * 1
  EXPECT_EQ(y[129], 7.0f);    // sub-block 4 (high scale bits): 17 * 1 - 0.5 * 20
  EXPECT_EQ(y[255], -31.5f);  // sub-block 7: 63 * 0 - 0.5 * 63
}

TEST(GgufDequant, Q6_K) {
  int8_t sc[16];
  for (int i = 0; i < 16; ++i) sc[i] = int8_t((i % 2 ? -1 : 1) * (i + 1));
  uint8_t q[256];  // six-bit values 0..63
  for (int i = 0; i < 256; ++i) q[i] = uint8_t((i * 7 + 3) % 64);
  // Packing as llama.cpp's quantize_row_q6_K does, per half of 128 values.
  uint8_t ql[128], qh[64];
  for (int half = 0; half < 2; ++half) {
    const uint8_t* v = q + 128 * half;
    for (int l = 0; l < 32; ++l) {
      ql[64 * half + l] = uint8_t((v[l] & 15) | ((v[l + 64] & 15) << 4));
      ql[64 * half + l + 32] = uint8_t((v[l + 32] & 15) | ((v[l + 96] & 15) << 4));
      qh[32 * half + l] = uint8_t((v[l] >> 4) | ((v[l + 32] >> 4) << 2) | ((v[l + 64] >> 4) << 4) |
                                  ((v[l + 96] >> 4) << 6));
    }
  }
  Builder b;
  b.raw(ql, 128).raw(qh, 64).raw(sc, 16).u16(h(0.25f));
  ASSERT_EQ(b.b.size(), 210u);
  float y[256];
  kv::dequantize(GgmlType::Q6_K, b.b.data(), y, 256);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(y[i], 0.25f * float(sc[i / 16]) * float(q[i] - 32)) << i;
  EXPECT_EQ(y[0], -7.25f);  // 0.25 * 1 * (3 - 32)
  EXPECT_EQ(y[16], -9.5f);  // 0.25 * -2 * (51 - 32)
}

TEST(GgufDequant, SeveralBlocksAndRefusals) {
  // Two Q8_0 blocks: the second starts 34 bytes in.
  Builder b;
  for (int blk = 0; blk < 2; ++blk) {
    b.u16(h(blk ? -1.0f : 1.0f));
    for (int j = 0; j < 32; ++j) b.u8(uint8_t(j));
  }
  float y[64];
  kv::dequantize(GgmlType::Q8_0, b.b.data(), y, 64);
  EXPECT_EQ(y[31], 31.0f);
  EXPECT_EQ(y[63], -31.0f);

  try {
    kv::dequantize(GgmlType::Q5_K, b.b.data(), y, 256);
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), 65);
    EXPECT_EQ(std::string(e.what()),
              "cannot dequantize tensor type q5_K (kvtk supports f32, f16, bf16, q8_0, q4_0, q4_K, "
              "q6_K)");
  }
  try {
    kv::dequantize(GgmlType::Q8_0, b.b.data(), y, 33);
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(std::string(e.what()),
              "cannot dequantize 33 values of type q8_0: not a multiple of its block size 32");
  }
  EXPECT_TRUE(kv::ggml_type_dequantizable(GgmlType::Q6_K));
  EXPECT_FALSE(kv::ggml_type_dequantizable(GgmlType::Q4_1));
  EXPECT_STREQ(kv::ggml_type_name(GgmlType::Q4_K), "q4_K");
  EXPECT_STREQ(kv::ggml_type_name(GgmlType(99)), "type 99");
  int64_t bv = 0, bb = 0;
  EXPECT_TRUE(kv::ggml_type_layout(GgmlType(23), &bv, &bb));  // iq4_xs: known, not supported
  EXPECT_EQ(bv, 256);
  EXPECT_EQ(bb, 136);
  EXPECT_FALSE(kv::ggml_type_layout(GgmlType(4), &bv, &bb));  // removed from ggml
}

// ---- writer ------------------------------------------------------------------------------

TEST(GgufWriter, RoundTrip) {
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_uint32("llama.block_count", 7);  // replaced below; keeps its place
  w.set_int32("test.i32", -5);
  w.set_float32("test.f32", 0.25f);
  w.set_uint64("test.u64", uint64_t(1) << 40);
  w.set_bool("test.yes", true);
  w.set_bool("test.no", false);
  w.set_strings("test.strings", {"a", "", "héllo"});
  w.set_float32s("test.floats", {1.5f, -2.0f});
  w.set_int32s("test.ints", {});
  w.set_uint32("llama.block_count", 5);

  const std::vector<float> a = {0, 1, 2, 3, 4, 5};
  w.add_tensor("a", {3, 2}, GgmlType::F32, a.data(), a.size() * 4);
  const uint16_t f16[5] = {h(1), h(-2), h(0.5f), h(65504), h(-0.0f)};  // 10 bytes: padding after
  w.add_tensor("b", {5}, GgmlType::F16, f16, sizeof f16);
  Builder q8;
  q8.u16(h(1.0f));
  for (int j = 0; j < 32; ++j) q8.u8(uint8_t(j - 16));
  w.add_tensor("c", {32, 1, 1, 1}, GgmlType::Q8_0, q8.b.data(), q8.b.size());
  const Bytes q5k(176 * 2, 0);  // a type kvtk cannot dequantize still round-trips
  w.add_tensor("d", {256, 2}, GgmlType::Q5_K, q5k.data(), q5k.size());

  const std::string path = kvtest::temp_dir() + "/w.gguf";
  w.write(path);
  EXPECT_EQ(read_all(path), w.bytes());
  GgufFile g(path);
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.alignment(), 32u);
  EXPECT_EQ(g.data_offset() % 32, 0u);
  EXPECT_EQ(g.metadata().size(), 10u);
  EXPECT_EQ(g.get("general.architecture").as_string("k"), "llama");
  EXPECT_EQ(g.get("llama.block_count").as_int("k"), 5);
  EXPECT_EQ(g.get("llama.block_count").type, GgufType::UINT32);
  EXPECT_EQ(g.get("test.i32").as_int("k"), -5);
  EXPECT_EQ(g.get("test.i32").type, GgufType::INT32);
  EXPECT_EQ(g.get("test.f32").as_float("k"), 0.25);
  EXPECT_EQ(g.get("test.f32").type, GgufType::FLOAT32);
  EXPECT_EQ(g.get("test.u64").as_int("k"), int64_t(1) << 40);
  EXPECT_EQ(g.get("test.u64").type, GgufType::UINT64);
  EXPECT_TRUE(g.get("test.yes").as_bool("k"));
  EXPECT_FALSE(g.get("test.no").as_bool("k"));
  const auto& s = g.get("test.strings").as_array("k");
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[2].as_string("k"), "héllo");
  EXPECT_EQ(s[1].as_string("k"), "");
  const auto& fl = g.get("test.floats");
  EXPECT_EQ(fl.elem_type, GgufType::FLOAT32);
  EXPECT_EQ(fl.as_array("k")[1].as_float("k"), -2.0);
  EXPECT_EQ(g.get("test.ints").as_array("k").size(), 0u);
  EXPECT_EQ(g.get("test.ints").elem_type, GgufType::INT32);

  ASSERT_EQ(g.tensors().size(), 4u);
  EXPECT_EQ(g.tensors()[0].name, "a");
  EXPECT_EQ(g.tensors()[1].offset, 32u);  // a: 24 bytes, padded to 32
  EXPECT_EQ(g.tensors()[2].offset, 64u);  // b: 10 bytes, padded to 32
  EXPECT_EQ(g.find_tensor("c")->dims, (std::vector<int64_t>{32, 1, 1, 1}));
  EXPECT_EQ(kv::dequantize(*g.find_tensor("a")), a);
  EXPECT_EQ(kv::dequantize(*g.find_tensor("b")), (std::vector<float>{1, -2, 0.5f, 65504, -0.0f}));
  const std::vector<float> c = kv::dequantize(*g.find_tensor("c"));
  EXPECT_EQ(c[0], -16.0f);
  EXPECT_EQ(c[31], 15.0f);
  const kv::GgufTensor* d = g.find_tensor("d");
  EXPECT_EQ(d->type, GgmlType::Q5_K);
  EXPECT_EQ(d->bytes, 352u);
  try {
    kv::dequantize(*d);
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(std::string(e.what()),
              "tensor 'd' has type q5_K, which kvtk cannot dequantize (it supports f32, f16, bf16, "
              "q8_0, q4_0, q4_K, q6_K)");
  }
  // In-memory parsing of the same image agrees.
  const Bytes image = w.bytes();
  GgufFile m(image.data(), image.size(), "mem");
  EXPECT_EQ(m.tensors().size(), 4u);
  EXPECT_EQ(std::memcmp(m.find_tensor("a")->data, a.data(), 24), 0);
}

TEST(GgufWriter, Misuse) {
  GgufWriter w;
  const float x[4] = {};
  w.add_tensor("x", {4}, GgmlType::F32, x, 16);
  auto code_of = [](const std::function<void()>& fn) {
    try {
      fn();
    } catch (const kv::Error& e) {
      return int(e.code());
    }
    return 0;
  };
  EXPECT_EQ(code_of([&] { w.add_tensor("x", {4}, GgmlType::F32, x, 16); }), 70);   // duplicate
  EXPECT_EQ(code_of([&] { w.add_tensor("y", {4}, GgmlType::F32, x, 12); }), 70);   // bytes
  EXPECT_EQ(code_of([&] { w.add_tensor("y", {0}, GgmlType::F32, x, 0); }), 70);    // zero dim
  EXPECT_EQ(code_of([&] { w.add_tensor("y", {4}, GgmlType::Q8_0, x, 16); }), 70);  // block
  EXPECT_EQ(code_of([&] { w.add_tensor("y", {1, 1, 1, 1, 1}, GgmlType::F32, x, 4); }), 70);
  EXPECT_EQ(code_of([&] { w.write(kvtest::temp_dir() + "/no/such/dir/x.gguf"); }), 73);
}

// ---- malformed files ---------------------------------------------------------------------

TEST(GgufBad, NotGguf) {
  const std::string text = "hello, this is not a model file";
  expect_error(Bytes(text.begin(), text.end()), Exit::data,
               "'x.gguf' is not a GGUF file (bad magic)");
  expect_error(Bytes{'G', 'G'}, Exit::data, "'x.gguf' is not a GGUF file (bad magic)");
  expect_error(Bytes{}, Exit::data, "'x.gguf' is not a GGUF file (bad magic)");
}

TEST(GgufBad, Versions) {
  expect_error(Builder().header(1, 0, 0).b, Exit::data, "'x.gguf': unsupported GGUF version 1");
  expect_error(Builder().header(4, 0, 0).b, Exit::data, "'x.gguf': unsupported GGUF version 4");
  expect_error(Builder().header(0x03000000, 0, 0).b, Exit::data,
               "'x.gguf': unsupported GGUF version 50331648 (a big-endian file?)");
  // v2 and v3 with nothing in them are valid.
  for (uint32_t v : {2u, 3u}) {
    const Bytes b = Builder().header(v, 0, 0).b;
    GgufFile g(b.data(), b.size(), "empty.gguf");
    EXPECT_EQ(g.version(), v);
    EXPECT_TRUE(g.tensors().empty());
  }
}

TEST(GgufBad, TruncatedHeader) {
  expect_error(Builder().magic().u16(3).b, Exit::data,
               "'x.gguf' is truncated (the file ends at byte 6, inside the header)");
  expect_error(Builder().magic().u32(3).u64(0).b, Exit::data,
               "'x.gguf' is truncated (the file ends at byte 16, inside the header)");
}

TEST(GgufBad, AbsurdCounts) {
  expect_error(Builder().header(3, 0, uint64_t(1) << 62).b, Exit::data,
               "'x.gguf': metadata count 4611686018427387904 is more than the file can hold "
               "(corrupt header?)");
  expect_error(Builder().header(3, 1000, 0).zeros(100).b, Exit::data,
               "'x.gguf': tensor count 1000 is more than the file can hold (corrupt header?)");
  // Array and string lengths are checked before anything is allocated.
  expect_error(Builder().header(3, 0, 1).str("k").u32(9).u32(4).u64(uint64_t(1) << 60).u32(0).b,
               Exit::data,
               "'x.gguf': metadata 'k' has an array count 1152921504606846976 that the remaining 4 "
               "bytes cannot hold (truncated or corrupt)");
  expect_error(Builder().header(3, 0, 1).str("k").u32(8).u64(~uint64_t(0)).zeros(8).b, Exit::data,
               "'x.gguf': string of 18446744073709551615 bytes in metadata 'k' runs past the end "
               "of the file (8 bytes left; truncated?)");
  expect_error(Builder().header(3, 0, 1).u64(uint64_t(1) << 40).zeros(16).b, Exit::data,
               "'x.gguf': string of 1099511627776 bytes in metadata entry #0 runs past the end of "
               "the file (16 bytes left; truncated?)");
}

TEST(GgufBad, MetadataValues) {
  auto kv_file = [](uint32_t type, const Bytes& value) {
    Builder b;
    b.header(3, 0, 1).str("k").u32(type).raw(value.data(), value.size());
    return b.b;
  };
  expect_error(kv_file(13, {0, 0, 0, 0}), Exit::data,
               "'x.gguf': metadata 'k' has unknown value type 13");
  expect_error(kv_file(7, {2}), Exit::data,
               "'x.gguf': metadata 'k' has bool value 2 (must be 0 or 1)");
  expect_error(Builder().header(3, 0, 1).str("k").u32(9).u32(77).u64(0).b, Exit::data,
               "'x.gguf': metadata 'k' is an array of unknown value type 77");
  expect_error(Builder().header(3, 0, 1).str("").u32(4).u32(1).b, Exit::data,
               "'x.gguf': metadata entry #0 has an empty key");
  expect_error(Builder().header(3, 0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(2).b,
               Exit::data, "'x.gguf': duplicate metadata key 'k'");
  // Names from the file are escaped so that messages stay on one line.
  expect_error(Builder().header(3, 0, 1).str("a\nb").u32(4).u16(0).b, Exit::data,
               "'x.gguf' is truncated (the file ends at byte 41, inside metadata 'a\\x0ab')");
  expect_error(Builder().header(3, 0, 2).str("k").u32(4).u32(1).str("l").u32(10).u32(2).b,
               Exit::data, "'x.gguf' is truncated (the file ends at byte 58, inside metadata 'l')");
  // Arrays of arrays are fine to a depth of 8; deeper is refused (stack safety).
  auto nested = [](int depth) {
    Builder b;
    b.header(3, 0, 1).str("k").u32(9);
    for (int i = 0; i < depth - 1; ++i) b.u32(9).u64(1);
    b.u32(4).u64(1).u32(42);
    return b.b;
  };
  {
    const Bytes ok = nested(8);
    GgufFile g(ok.data(), ok.size(), "n");
    const kv::GgufValue* v = &g.get("k");
    for (int i = 0; i < 7; ++i) v = &v->as_array("k")[0];
    EXPECT_EQ(v->as_array("k")[0].as_int("k"), 42);
  }
  expect_error(nested(9), Exit::data,
               "'x.gguf': metadata 'k' nests arrays more than 8 levels deep");

  // Accessors name the key and both types.
  const Bytes b = kv_file(8, Builder().str("text").b);
  GgufFile g(b.data(), b.size(), "x.gguf");
  try {
    g.get("k").as_int("k");
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(std::string(e.what()), "metadata 'k' is string, not an integer");
  }
  try {
    g.get("nope");
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), 65);
    EXPECT_EQ(std::string(e.what()), "'x.gguf': missing metadata 'nope'");
  }
}

TEST(GgufBad, Alignment) {
  auto aligned = [](uint32_t type, const Bytes& value) {
    Builder b;
    b.header(3, 0, 1).str("general.alignment").u32(type).raw(value.data(), value.size());
    return b.b;
  };
  expect_error(aligned(4, Builder().u32(48).b), Exit::data,
               "'x.gguf': general.alignment 48 is not a power of two up to 2^31");
  expect_error(aligned(4, Builder().u32(0).b), Exit::data,
               "'x.gguf': general.alignment 0 is not a power of two up to 2^31");
  expect_error(aligned(8, Builder().str("32").b), Exit::data,
               "'x.gguf': general.alignment is string, not an integer");
  // A non-default alignment moves the data section and constrains the offsets.
  Builder f;
  f.header(3, 1, 1).str("general.alignment").u32(4).u32(64);
  f.str("t").u32(1).u64(4).u32(0).u64(0);
  const size_t infos_end = f.b.size();
  f.pad(64).zeros(16);
  GgufFile g(f.b.data(), f.b.size(), "a64");
  EXPECT_EQ(g.alignment(), 64u);
  EXPECT_EQ(g.data_offset(), (infos_end + 63) / 64 * 64);
  EXPECT_EQ(g.tensors()[0].data, f.b.data() + g.data_offset());
}

TEST(GgufBad, TensorInfos) {
  expect_error(one_tensor({}, 0, 0, 16), Exit::data,
               "'x.gguf': tensor 't' has 0 dimensions (GGUF allows 1 to 4)");
  expect_error(one_tensor({1, 1, 1, 1, 1}, 0, 0, 16), Exit::data,
               "'x.gguf': tensor 't' has 5 dimensions (GGUF allows 1 to 4)");
  expect_error(one_tensor({4, 0}, 0, 0, 16), Exit::data,
               "'x.gguf': tensor 't' has a zero dimension");
  expect_error(one_tensor({uint64_t(1) << 32, uint64_t(1) << 32}, 0, 0, 16), Exit::data,
               "'x.gguf': tensor 't' has dims [4294967296, 4294967296] whose product overflows");
  expect_error(one_tensor({uint64_t(1) << 62}, 0, 0, 16), Exit::data,
               "'x.gguf': tensor 't' has dims [4611686018427387904] whose byte size overflows");
  expect_error(one_tensor({~uint64_t(0)}, 0, 0, 16), Exit::data,
               "'x.gguf': tensor 't' has dimension 18446744073709551615, too large");
  expect_error(one_tensor({4}, 99, 0, 16), Exit::data,
               "'x.gguf': tensor 't' has unknown type id 99");
  expect_error(one_tensor({4}, 4, 0, 16), Exit::data, "'x.gguf': tensor 't' has unknown type id 4");
  expect_error(
      one_tensor({100, 2}, 12, 0, 16), Exit::data,
      "'x.gguf': tensor 't' of type q4_K has dims[0] = 100, not a multiple of the block size 256");
  expect_error(one_tensor({4}, 0, 8, 16), Exit::data,
               "'x.gguf': tensor 't' offset 8 is not a multiple of the alignment 32");
  expect_error(one_tensor({4}, 0, 64, 16), Exit::data,
               "'x.gguf': tensor 't' data (offset 192, 16 bytes) runs past the end of the file "
               "(truncated?)");
  expect_error(one_tensor({8}, 0, 0, 16), Exit::data,
               "'x.gguf': tensor 't' data (offset 128, 32 bytes) runs past the end of the file "
               "(truncated?)");
  expect_error(one_tensor({4}, 0, ~uint64_t(31), 16), Exit::data,
               "'x.gguf': tensor 't' data (offset data + 18446744073709551584, 16 bytes) runs past "
               "the end of the file (truncated?)");
  {  // an unsupported but known type parses
    const Bytes b = one_tensor({256}, 13, 0, 176);
    GgufFile g(b.data(), b.size(), "q5k");
    EXPECT_EQ(g.tensors()[0].type, GgmlType::Q5_K);
    EXPECT_EQ(g.tensors()[0].bytes, 176u);
  }
  // Duplicate and empty tensor names.
  Builder d;
  d.header(3, 2, 0)
      .str("t")
      .u32(1)
      .u64(4)
      .u32(0)
      .u64(0)
      .str("t")
      .u32(1)
      .u64(4)
      .u32(0)
      .u64(0)
      .pad(32)
      .zeros(64);
  expect_error(d.b, Exit::data, "'x.gguf': duplicate tensor name 't'");
  Builder e;
  e.header(3, 1, 0).str("").u32(1).u64(4).u32(0).u64(0).pad(32).zeros(16);
  expect_error(e.b, Exit::data, "'x.gguf': tensor info #0 has an empty name");
}

TEST(GgufBad, TruncatedEverywhere) {
  // A writer-made file with metadata of each type and several tensors, cut at every byte.
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_uint32("u", 1);
  w.set_int32("i", -1);
  w.set_float32("f", 1);
  w.set_uint64("u64", 2);
  w.set_bool("b", true);
  w.set_strings("s", {"x", "yz"});
  w.set_float32s("fs", {1, 2});
  w.set_int32s("is", {3});
  const Bytes q4k(144, 7), f32(40, 1);
  w.add_tensor("q", {256}, GgmlType::Q4_K, q4k.data(), q4k.size());
  w.add_tensor("f", {10}, GgmlType::F32, f32.data(), f32.size());
  const Bytes full = w.bytes();
  { GgufFile ok(full.data(), full.size(), "full"); }
  for (size_t cut = 0; cut < full.size() - 24; ++cut) {  // the last 24 bytes are padding
    try {
      GgufFile g(full.data(), cut, "cut.gguf");
      ADD_FAILURE() << "parsed a file cut at " << cut;
    } catch (const kv::Error& e) {
      ASSERT_EQ(int(e.code()), 65) << cut << ": " << e.what();
    }
  }
}

TEST(GgufBad, Files) {
  const std::string dir = kvtest::temp_dir();
  try {
    GgufFile g(dir + "/missing.gguf");
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), 66);
    EXPECT_EQ(std::string(e.what()),
              "cannot open '" + dir + "/missing.gguf': No such file or directory");
  }
  try {
    GgufFile g(dir);
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), 66);
    EXPECT_EQ(std::string(e.what()), "cannot open '" + dir + "': Is a directory");
  }
  const std::string empty = write_temp("empty.gguf", {});
  try {
    GgufFile g(empty);
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), 65);
    EXPECT_EQ(std::string(e.what()), "'" + empty + "' is not a GGUF file (it is empty)");
  }
  const std::string cut = write_temp("cut.gguf", one_tensor({8}, 0, 0, 16));
  try {
    GgufFile g(cut);
    ADD_FAILURE();
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), 65);
    EXPECT_EQ(std::string(e.what()), "'" + cut +
                                         "': tensor 't' data (offset 128, 32 bytes) runs past the "
                                         "end of the file (truncated?)");
  }
}

// ---- references from PyPI's gguf (run by tests/cli/gguf_reference.sh) ----------------------

// The file written by tests/python/gguf_reference.py: for each type T, tensor "T.q" holds data
// of type T and "T.ref" the values gguf.quants.dequantize gives for it, as F32.
TEST(GgufReference, MatchesGgufPy) {
  const char* path = std::getenv("KV_GGUF_REFERENCE");
  if (!path) GTEST_SKIP() << "KV_GGUF_REFERENCE is not set (tests/cli/gguf_reference.sh sets it)";
  GgufFile g(path);
  // Metadata of every value type, written by gguf-py's GGUFWriter with alignment 64.
  EXPECT_EQ(g.alignment(), 64u);
  EXPECT_EQ(g.get("general.architecture").as_string("k"), "kvtkref");
  EXPECT_EQ(g.get("ref.u8").as_int("k"), 200);
  EXPECT_EQ(g.get("ref.u8").type, GgufType::UINT8);
  EXPECT_EQ(g.get("ref.i8").as_int("k"), -100);
  EXPECT_EQ(g.get("ref.u16").as_int("k"), 60000);
  EXPECT_EQ(g.get("ref.i16").as_int("k"), -30000);
  EXPECT_EQ(g.get("ref.u32").as_int("k"), 4000000000);
  EXPECT_EQ(g.get("ref.i32").as_int("k"), -2000000000);
  EXPECT_EQ(g.get("ref.f32").as_float("k"), 1.5);
  EXPECT_EQ(g.get("ref.f32").type, GgufType::FLOAT32);
  EXPECT_TRUE(g.get("ref.bool").as_bool("k"));
  EXPECT_EQ(g.get("ref.str").as_string("k"), "h\xc3\xa9llo");
  EXPECT_EQ(g.get("ref.u64").as_int("k"), int64_t(1) << 60);
  EXPECT_EQ(g.get("ref.i64").as_int("k"), -(int64_t(1) << 60));
  EXPECT_EQ(g.get("ref.f64").as_float("k"), 0.1);
  EXPECT_EQ(g.get("ref.f64").type, GgufType::FLOAT64);
  const auto& nested = g.get("ref.nested").as_array("k");
  ASSERT_EQ(nested.size(), 2u);
  EXPECT_EQ(nested[1].as_array("k")[2].as_int("k"), 5);
  EXPECT_EQ(g.get("ref.strs").as_array("k")[1].as_string("k"), "bc");

  const char* types[] = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_K", "q6_K"};
  for (const char* type : types) {
    const kv::GgufTensor* q = g.find_tensor(std::string(type) + ".q");
    const kv::GgufTensor* ref = g.find_tensor(std::string(type) + ".ref");
    ASSERT_TRUE(q && ref) << type;
    EXPECT_STREQ(kv::ggml_type_name(q->type), type);
    EXPECT_EQ(ref->type, GgmlType::F32);
    ASSERT_EQ(q->dims, ref->dims) << type;
    const std::vector<float> ours = kv::dequantize(*q);
    std::vector<float> want(size_t(ref->elements()));
    std::memcpy(want.data(), ref->data, ref->bytes);
    size_t exact = 0, bad = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const float a = ours[i], b = want[i];
      if (std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b))) {
        ++exact;
        continue;
      }
      // Not bit-identical: allowed only as a rounding difference (FMA contraction).
      if (!(std::fabs(a - b) <= 1e-6f * std::fabs(b)) && bad++ < 5)
        ADD_FAILURE() << type << " value " << i << ": ours " << a << ", gguf-py " << b;
    }
    EXPECT_EQ(bad, 0u) << type;
    std::printf("%-5s %zu values, %zu bit-identical to gguf-py\n", type, want.size(), exact);
  }
}

// Writes a file with GgufWriter for tests/python/gguf_reference.py to check with gguf-py's
// GGUFReader (the script holds the same expectations).
TEST(GgufReference, WriteForGgufPy) {
  const char* path = std::getenv("KV_GGUF_WRITER_OUT");
  if (!path) GTEST_SKIP() << "KV_GGUF_WRITER_OUT is not set (tests/cli/gguf_reference.sh sets it)";
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_uint32("llama.block_count", 5);
  w.set_int32("kvtk.i32", -7);
  w.set_float32("kvtk.f32", 0.25f);
  w.set_uint64("kvtk.u64", uint64_t(1) << 40);
  w.set_bool("kvtk.bool", true);
  w.set_strings("kvtk.strings", {"a", "", "h\xc3\xa9llo"});
  w.set_float32s("kvtk.floats", {1.5f, -2.0f});
  w.set_int32s("kvtk.ints", {1, -2, 3});
  const std::vector<float> a = {0, 1, 2, 3, 4, 5};
  w.add_tensor("a", {3, 2}, GgmlType::F32, a.data(), a.size() * 4);
  const uint16_t f16[5] = {h(1), h(-2), h(0.5f), h(65504), h(-0.0f)};
  w.add_tensor("b", {5}, GgmlType::F16, f16, sizeof f16);
  Builder q8;
  for (int blk = 0; blk < 2; ++blk) {
    q8.u16(h(blk ? 0.5f : 1.0f));
    for (int j = 0; j < 32; ++j) q8.u8(uint8_t(j - 16));
  }
  w.add_tensor("c", {32, 2}, GgmlType::Q8_0, q8.b.data(), q8.b.size());
  w.write(path);
}

}  // namespace
