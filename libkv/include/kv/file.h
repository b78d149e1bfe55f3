// Whole-file outputs that either land complete or leave nothing behind: the small files the
// tools write besides snapshots (charts, results lines, GGUF files, page-store manifests).
#pragma once
#include <cstddef>
#include <string>

namespace kv {

// Writes `n` bytes to `path` through a temporary file in the same directory, renamed into place,
// so a reader never sees a partial file and a failed write keeps what was there. `sync` fsyncs
// the temporary file first. Errors: 73 when the file cannot be created or renamed into place,
// 74 when a write fails (the temporary file is removed).
void write_file_atomically(const std::string& path, const void* data, size_t n, bool sync = false);
inline void write_file_atomically(const std::string& path, const std::string& text) {
  write_file_atomically(path, text.data(), text.size());
}

// Appends `text` to `path` (created if missing) all or nothing: after a failed or short write
// a regular file is cut back to its old length (or removed, if this call created it), so a
// results file never ends in half a line; devices and pipes are written as they are. Errors: 73
// when it cannot be opened, 74 when a write fails.
void append_to_file(const std::string& path, const std::string& text);

// Whether an output would land on an input: both name the same existing regular file (same
// device and inode, so links and other spellings count). "-" is stdin as the input and stdout
// as the output, so `tool - -o IN < IN` and `tool IN >> IN` are caught too. False if either is
// empty or missing.
bool same_file(const std::string& input, const std::string& output);

}  // namespace kv
