// kv::str(a, b, c): concatenates anything streamable (GCC 12 has no <format>).
#pragma once
#include <sstream>
#include <string>

namespace kv {
template <class... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace kv
