// libFuzzer target for the GGUF reader (libkv/src/gguf.cpp): parse the input bytes as a GGUF
// image; when that succeeds, read every metadata value and dequantize every tensor of a
// supported type (at most kMaxValues values in all, so that a valid-but-large file cannot make
// one input slow). kv::Error is the expected way to refuse input; any crash, sanitizer report,
// hang or other exception is a bug. Seed it with a real model (../shared/models/stories260K.gguf)
// and files from GgufWriter.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kv/error.h"
#include "kv/gguf.h"

namespace {

constexpr int64_t kMaxValues = int64_t(1) << 20;

// Walks a value the way a consumer would, through the checked accessors.
size_t touch(const kv::GgufValue& v, const std::string& key) {
  size_t n = 1;
  switch (v.v.index()) {
    case 0:
    case 1:
      (void)v.as_float(key);
      break;
    case 2:
      (void)v.as_float(key);
      break;
    case 3:
      (void)v.as_bool(key);
      break;
    case 4:
      n += v.as_string(key).size();
      break;
    case 5:
      for (const kv::GgufValue& e : v.as_array(key)) n += touch(e, key);
      break;
  }
  try {
    (void)v.as_int(key);  // throws for non-integers and out-of-range values
  } catch (const kv::Error&) {
  }
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    kv::GgufFile g(data, size, "fuzz.gguf");
    size_t seen = 0;
    for (const auto& [key, value] : g.metadata()) seen += touch(value, key);
    if (g.has("general.architecture")) (void)g.get("general.architecture");

    int64_t budget = kMaxValues;
    std::vector<float> out;
    for (const kv::GgufTensor& t : g.tensors()) {
      // Everything the parser promises: the data lies inside the image.
      if (t.data < data || t.bytes > size_t(data + size - t.data)) __builtin_trap();
      if (&t - g.tensors().data() < 64 && g.find_tensor(t.name) != &t) __builtin_trap();
      if (!kv::ggml_type_dequantizable(t.type)) {
        try {
          kv::dequantize(t);  // must refuse with kv::Error
          __builtin_trap();
        } catch (const kv::Error&) {
        }
        continue;
      }
      const int64_t n = t.elements();
      if (n > budget) continue;
      budget -= n;
      out.resize(size_t(n));
      kv::dequantize(t.type, t.data, out.data(), n);
      for (float f : out) seen += f == f;  // reads every output value
    }
    (void)seen;
  } catch (const kv::Error& e) {
    // Messages are one line (names from the file are escaped) and name the input.
    const std::string m = e.what();
    if (m.find('\n') != std::string::npos || m.find("'fuzz.gguf'") == std::string::npos)
      __builtin_trap();
  }
  return 0;
}
