// kv::str(a, b, c): concatenates anything streamable (GCC 12 has no <format>); kv::format, a
// printf into a string of any length; utf8_length.
#pragma once
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <string_view>

namespace kv {
template <class... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <class... Args>
std::string format(const char* f, Args... args) {
  std::string out(size_t(std::snprintf(nullptr, 0, f, args...)), '\0');
  std::snprintf(out.data(), out.size() + 1, f, args...);
  return out;
}

// The length (1-4) of the well-formed UTF-8 sequence that starts at s[i], or 0 if none does
// (a stray byte, an overlong form, a surrogate, past U+10FFFF): what JSON and XML writers need
// to keep text from the outside (labels, prompts, command lines) valid.
inline size_t utf8_length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return uint8_t(s[i + k]); };
  const uint8_t c = b(0);
  const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k)
    if ((b(k) & 0xc0) != 0x80) return 0;
  const uint32_t cp =
      n == 1   ? c
      : n == 2 ? (c & 0x1fu) << 6 | (b(1) & 0x3fu)
      : n == 3 ? (c & 0x0fu) << 12 | (b(1) & 0x3fu) << 6 | (b(2) & 0x3fu)
               : (c & 0x07u) << 18 | (b(1) & 0x3fu) << 12 | (b(2) & 0x3fu) << 6 | (b(3) & 0x3fu);
  const uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < least[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return n;
}
}  // namespace kv
