// Errors carry the sysexits code the tools exit with, so a failure deep in libkv reaches the
// shell as "kv-tool: message" and the right status without every layer translating it.
#pragma once
#include <stdexcept>
#include <string>

namespace kv {

enum class Exit : int {
  ok = 0,
  usage = 64,        // EX_USAGE: bad options or impossible parameters
  data = 65,         // EX_DATAERR: input is malformed
  no_input = 66,     // EX_NOINPUT: input missing or unreadable
  unavailable = 69,  // EX_UNAVAILABLE: e.g. CUDA asked for without a GPU
  software = 70,     // EX_SOFTWARE: internal error
  cant_create = 73,  // EX_CANTCREAT: output cannot be created
  io = 74,           // EX_IOERR: read or write failed
};

class Error : public std::runtime_error {
 public:
  Error(Exit code, const std::string& message) : std::runtime_error(message), code_(code) {}
  Exit code() const { return code_; }

 private:
  Exit code_;
};

// "strerror(errno)" for the current errno, for messages like "cannot open 'x': <why>".
std::string errno_text();

}  // namespace kv
