// Whole-file outputs that either land complete or leave nothing behind: the small files the
// tools write besides snapshots (charts, results lines, GGUF files, page-store manifests), and
// the registry of temporary files that a fatal signal removes.
#pragma once
#include <cstddef>
#include <string>

namespace kv {

// Writes `n` bytes to `path` (to the file it links to, rename_target) through a temporary file
// in the same directory, renamed into place,
// so a reader never sees a partial file and a failed write keeps what was there. `sync` fsyncs
// the temporary file first. Errors: 73 when the file cannot be created or renamed into place,
// 74 when a write fails (the temporary file is removed).
void write_file_atomically(const std::string& path, const void* data, size_t n, bool sync = false);
inline void write_file_atomically(const std::string& path, const std::string& text) {
  write_file_atomically(path, text.data(), text.size());
}

// The file a write through a temporary file and rename() must replace for the output `path`:
// the file a symbolic link points to (all links resolved), so that the link stays and its target
// gets the new contents (`-o /dev/stdout > file` wrote over the link, and left file empty); path
// itself when it is not a link, or its target does not exist yet.
std::string rename_target(const std::string& path);

// Appends `text` to `path` (created if missing) all or nothing: after a failed or short write
// a regular file is cut back to its old length (or removed, if this call created it), so a
// results file never ends in half a line; devices and pipes are written as they are. Errors: 73
// when it cannot be opened, 74 when a write fails.
void append_to_file(const std::string& path, const std::string& text);

// Temporary files that a signal must not leave behind. A file written beside its target and
// renamed into place (write_file_atomically, SnapshotWriter) is registered here while it exists:
// register it before it is created when its name is known in advance (else at once after), and
// unregister it after it is renamed into place or removed. When SIGINT, SIGTERM, SIGHUP or SIGPIPE
// would end the process, a handler unlinks every registered path, restores the default action and
// raises the signal again, so the process still dies of that signal (130 in the shell for SIGINT)
// and a partial file is never left. SIGPIPE is included because a tool whose output pipe closes
// may be writing a page file or a chart at the same moment.
//
// The handlers are installed at the first registration, for each of those signals whose
// disposition is still the default: an ignored signal (nohup, `cmd &` in a script) stays ignored
// and a program's own handler is kept. The handler only unlinks: the paths live in fixed static
// slots (as given, so relative to the working directory at registration: the tools never chdir),
// each published by an atomic flag once written. Registration is thread-safe. Best effort: a path
// longer than PATH_MAX or beyond the slots (64 at once) is not registered, and a file that another
// thread creates while the handler runs can survive it.
void register_temp_file(const std::string& path);
// Forgets one registration of `path` (nothing if it has none); the file itself is not touched.
void unregister_temp_file(const std::string& path);

// Whether an output would land on an input: both name the same existing regular file (same
// device and inode, so links and other spellings count). "-" is stdin as the input and stdout
// as the output, so `tool - -o IN < IN` and `tool IN >> IN` are caught too. False if either is
// empty or missing.
bool same_file(const std::string& input, const std::string& output);

}  // namespace kv
