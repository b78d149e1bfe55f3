// SHA-256 (FIPS 180-4): which model file a cache came from, and page stores' content ids.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace kv {
// Hex digest. Uses the x86 SHA extensions when the CPU has them; `portable` forces the plain
// C++ compression (the reference the tests compare the fast path with).
std::string sha256_hex(const void* data, size_t n, bool portable = false);
}  // namespace kv
