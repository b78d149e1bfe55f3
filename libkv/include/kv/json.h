// A small JSON value for the tools' --json output (ordered keys, no parsing).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
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

 private:
  void dump_to(std::string& out) const;
  std::variant<std::nullptr_t, bool, int64_t, double, std::string, Array, Object> v_;
};

}  // namespace kv
