#include "kv/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>

#include "kv/error.h"
#include "kv/str.h"

namespace kv {

namespace {

// Writes all n bytes to fd, retrying after EINTR and short writes; false (errno set) on failure.
bool write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      if (w == 0) errno = ENOSPC;
      return false;
    }
    p += w;
    n -= size_t(w);
  }
  return true;
}

}  // namespace

void write_file_atomically(const std::string& path, const void* data, size_t n, bool sync) {
  const std::string temp = path + ".tmp" + std::to_string(::getpid());
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0666);
  if (fd < 0) throw Error(Exit::cant_create, str("cannot create '", path, "': ", errno_text()));
  if (!write_all(fd, data, n) || (sync && ::fsync(fd) != 0)) {
    const std::string why = errno_text();
    ::close(fd);
    ::unlink(temp.c_str());
    throw Error(Exit::io, str("cannot write '", path, "': ", why));
  }
  if (::close(fd) != 0) {
    const std::string why = errno_text();
    ::unlink(temp.c_str());
    throw Error(Exit::io, str("cannot write '", path, "': ", why));
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(temp.c_str());
    throw Error(Exit::cant_create, str("cannot create '", path, "': ", why));
  }
}

void append_to_file(const std::string& path, const std::string& text) {
  struct stat before {};
  const bool existed = ::stat(path.c_str(), &before) == 0;
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT, 0666);
  if (fd < 0) throw Error(Exit::cant_create, str("cannot append to '", path, "': ", errno_text()));
  struct stat st {};
  const bool regular = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
  const off_t old_size = regular ? st.st_size : 0;
  if (!write_all(fd, text.data(), text.size()) || (regular && ::fsync(fd) != 0)) {
    const std::string why = errno_text();
    std::string left;
    if (regular && !existed)
      ::unlink(path.c_str());
    else if (regular && ::ftruncate(fd, old_size) != 0)
      left = "; its last line may be incomplete";
    ::close(fd);
    throw Error(Exit::io, str("cannot append to '", path, "': ", why, left));
  }
  if (::close(fd) != 0) throw Error(Exit::io, str("cannot append to '", path, "': ", errno_text()));
}

bool same_file(const std::string& input, const std::string& output) {
  if (input.empty() || output.empty()) return false;
  // "-" is the standard stream: stdin as an input, stdout as an output.
  auto lookup = [](const std::string& path, int fd, struct stat& st) {
    return path == "-" ? ::fstat(fd, &st) == 0 : ::stat(path.c_str(), &st) == 0;
  };
  struct stat in {
  }, out{};
  return lookup(input, 0, in) && lookup(output, 1, out) && S_ISREG(in.st_mode) &&
         in.st_dev == out.st_dev && in.st_ino == out.st_ino;
}

}  // namespace kv
