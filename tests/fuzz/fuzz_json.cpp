// libFuzzer target for the JSON parser (libkv/src/json.cpp): parse the input bytes as one JSON
// text; when that succeeds, dump() the value and parse the dump again. kv::Error is the expected
// way to refuse input; any crash, sanitizer report, hang, other exception or round-trip mismatch
// is a bug. dump() keeps 9 significant digits of a double, so a value only compares equal to its
// re-parse when every double survives "%.9g"; the dumped text itself must be a fixed point.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "kv/error.h"
#include "kv/json.h"

namespace {

// True when every number in v reads back exactly from dump()'s text.
bool dump_is_exact(const kv::Json& v) {
  if (v.is_array()) {
    for (const kv::Json& e : v.as_array())
      if (!dump_is_exact(e)) return false;
    return true;
  }
  if (v.is_object()) {
    for (const auto& [k, e] : v.as_object())
      if (!dump_is_exact(e)) return false;
    return true;
  }
  if (!v.is_number()) return true;
  try {
    return kv::Json::parse(v.dump()) == v;  // numbers: compared by exact value
  } catch (const kv::Error&) {
    __builtin_trap();  // dump() wrote something the parser refuses
  }
}

// Walks a value through the checked accessors the way a consumer would.
size_t touch(const kv::Json& v) {
  size_t n = 1;
  if (v.is_array()) {
    for (const kv::Json& e : v.as_array()) n += touch(e);
  } else if (v.is_object()) {
    for (const auto& [k, e] : v.as_object()) {
      if (v.find(k) == nullptr) __builtin_trap();
      n += k.size() + touch(e);
    }
  } else if (v.is_string()) {
    n += v.string().size();
  } else if (v.is_bool()) {
    n += v.boolean();
  } else if (v.is_number()) {
    if (std::isnan(v.number()) || std::isinf(v.number())) __builtin_trap();
    try {
      (void)v.integer();
    } catch (const kv::Error&) {
    }
  } else if (!v.is_null()) {
    __builtin_trap();
  }
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  kv::Json v;
  try {
    v = kv::Json::parse(text);
  } catch (const kv::Error& e) {
    // Refusals are data errors with one-line "JSON: ... at offset N" messages.
    const std::string m = e.what();
    if (e.code() != kv::Exit::data || m.rfind("JSON: ", 0) != 0 ||
        m.find(" at offset ") == std::string::npos || m.find('\n') != std::string::npos)
      __builtin_trap();
    return 0;
  }
  (void)touch(v);
  if (!(v == v)) __builtin_trap();  // parse() never produces NaN

  const std::string dumped = v.dump();
  kv::Json back;
  try {
    back = kv::Json::parse(dumped);
  } catch (const kv::Error& e) {
    std::fprintf(stderr, "dump() of a parsed value does not parse: %s\n", e.what());
    __builtin_trap();
  }
  if (back.dump() != dumped) __builtin_trap();  // dump() -> parse() -> dump() is a fixed point
  if (dump_is_exact(v) && !(back == v)) __builtin_trap();
  return 0;
}
