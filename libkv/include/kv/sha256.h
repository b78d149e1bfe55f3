// SHA-256 (FIPS 180-4), to record which model file a cache came from.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace kv {
std::string sha256_hex(const void* data, size_t n);
}  // namespace kv
