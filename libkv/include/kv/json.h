// A small JSON value: built and dump()ed for the tools' --json output (ordered keys), and
// parse()d back from files those tools wrote (e.g. kv-eval's JSON Lines), which are untrusted.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace kv {

class Json {
 public:
  using Array = std::vector<Json>;
  using Object = std::vector<std::pair<std::string, Json>>;

  Json() : v_(nullptr) {}
  Json(std::nullptr_t) : v_(nullptr) {}
  Json(bool b) : v_(b) {}
  Json(int v) : v_(int64_t(v)) {}
  Json(int64_t v) : v_(v) {}
  Json(uint64_t v) : v_(int64_t(v)) {}
  Json(double v) : v_(v) {}
  Json(float v) : v_(double(v)) {}
  Json(const char* s) : v_(std::string(s)) {}
  Json(std::string s) : v_(std::move(s)) {}
  Json(Array a) : v_(std::move(a)) {}
  Json(Object o) : v_(std::move(o)) {}

  static Json object() { return Json(Object{}); }
  static Json array() { return Json(Array{}); }
  template <class T>
  static Json array_of(const std::vector<T>& values) {
    Array a;
    a.reserve(values.size());
    for (const T& v : values) a.emplace_back(v);
    return Json(std::move(a));
  }

  // Object: sets key (appends; keys keep insertion order). Array: appends.
  Json& set(const std::string& key, Json value);
  Json& push(Json value);

  std::string dump() const;  // compact, one line

  // Parses one JSON text (RFC 8259) with optional surrounding whitespace: objects, arrays,
  // strings with every escape (\uXXXX incl. surrogate pairs, written out as UTF-8), numbers,
  // true/false/null. An integral number without fraction/exponent that fits int64_t is stored
  // as int64_t, every other number as double, "-0" included (so -0.0, which dump() writes as
  // "-0", keeps its sign); one that underflows becomes a signed 0.0, one too large for a double
  // is an error. Raw bytes >= 0x20 in strings are kept as they
  // are, so strings that dump() wrote from non-UTF-8 bytes read back unchanged. Duplicate
  // object keys are all kept, in order. Throws Error(Exit::data, "JSON: <what> at offset N") on
  // malformed input: trailing garbage, bad escapes, lone surrogates, control characters in
  // strings, leading zeros, '+' signs, NaN/Infinity, nesting deeper than 256, unterminated
  // anything. Linear time; kv::Error is the only exception it throws (bar std::bad_alloc).
  static Json parse(std::string_view text);

  bool is_null() const;
  bool is_bool() const;
  bool is_number() const;  // int64 or double
  bool is_string() const;
  bool is_array() const;
  bool is_object() const;

  // Checked accessors: each throws Error(Exit::data, "JSON: expected ...") for another type.
  // (The array and object accessors are as_array()/as_object(): array() and object() are the
  // static factories above, and C++ cannot overload a static member on constness.)
  double number() const;    // int64 or double, as double
  int64_t integer() const;  // int64 values, and doubles that are exact integers in range
  bool boolean() const;
  const std::string& string() const;
  const Array& as_array() const;
  const Object& as_object() const;
  // The first member with that key; null when absent or when this is not an object.
  const Json* find(const std::string& key) const;

  // Structural equality: same type, same strings, arrays element by element, objects member by
  // member in order (keys included). Numbers compare by exact mathematical value whatever their
  // representation, so int64 1 == double 1.0 (dump() writes both as "1") but int64 2^53 + 1 !=
  // double 2^53; doubles compare with ==, so -0.0 == 0.0 and a NaN equals nothing.
  bool operator==(const Json& other) const;

 private:
  void dump_to(std::string& out) const;
  std::variant<std::nullptr_t, bool, int64_t, double, std::string, Array, Object> v_;
};

}  // namespace kv
