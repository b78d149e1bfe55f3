#pragma once
namespace kv {
const char* version();
}
