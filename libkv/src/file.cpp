#include "kv/file.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

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

// The temporary-file registry (file.h). A slot goes free -> written -> live (published with a
// release store, so the handler never reads a half-written path) -> free again on unregister. The
// handler claims a live slot (live -> dying) before it unlinks the path: a slot being unlinked is
// never freed and rewritten under it, even when the handler runs in another thread.
enum SlotState : int { kFree, kWriting, kLive, kDying };
struct TempSlot {
  std::atomic<int> state{kFree};
  char path[PATH_MAX];
};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs lock-free atomics");
constexpr int kTempSlots = 64;
TempSlot temp_slots[kTempSlots];
std::mutex temp_mutex;  // serialises register/unregister; the handler never takes it
constexpr int kCleanupSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE};

// Async-signal-safe only: atomics, unlink, sigaction, raise.
void remove_temp_files_and_die(int sig) {
  for (TempSlot& slot : temp_slots) {
    int live = kLive;
    if (slot.state.compare_exchange_strong(live, kDying, std::memory_order_acquire))
      ::unlink(slot.path);
  }
  // The signal is blocked while its handler runs: raised again with the default action, it ends
  // the process when the handler returns, so the exit status still says which signal it was.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(sig, &dfl, nullptr);
  ::raise(sig);
}

void install_cleanup_handlers() {
  struct sigaction act {};
  act.sa_handler = remove_temp_files_and_die;
  // The other cleanup signals wait until this handler is done, so a second Ctrl-C or a SIGTERM
  // right after the SIGINT cannot end the process half way through the unlinks.
  sigemptyset(&act.sa_mask);
  for (int sig : kCleanupSignals) sigaddset(&act.sa_mask, sig);
  act.sa_flags = SA_RESTART;
  for (int sig : kCleanupSignals) {
    struct sigaction old {};
    if (::sigaction(sig, nullptr, &old) == 0 && !(old.sa_flags & SA_SIGINFO) &&
        old.sa_handler == SIG_DFL)
      ::sigaction(sig, &act, nullptr);
  }
}

}  // namespace

void register_temp_file(const std::string& path) {
  static std::once_flag installed;
  std::call_once(installed, install_cleanup_handlers);
  if (path.empty() || path.size() >= PATH_MAX) return;
  const std::lock_guard<std::mutex> lock(temp_mutex);
  for (TempSlot& slot : temp_slots) {
    int free = kFree;
    if (!slot.state.compare_exchange_strong(free, kWriting, std::memory_order_relaxed)) continue;
    std::memcpy(slot.path, path.c_str(), path.size() + 1);
    slot.state.store(kLive, std::memory_order_release);
    return;
  }
}

void unregister_temp_file(const std::string& path) {
  const std::lock_guard<std::mutex> lock(temp_mutex);
  for (TempSlot& slot : temp_slots) {
    // A slot the handler has claimed (dying) stays as it is: the process is ending.
    if (slot.state.load(std::memory_order_relaxed) != kLive || path != slot.path) continue;
    int live = kLive;
    if (slot.state.compare_exchange_strong(live, kFree, std::memory_order_relaxed)) return;
  }
}

std::string rename_target(const std::string& path) {
  // Link by link (at most 40, as the kernel), so that a dangling link names the file to create.
  std::string p = path;
  for (int hops = 0; hops < 40; ++hops) {
    struct stat st {};
    if (::lstat(p.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) return p;
    std::string to(PATH_MAX, '\0');
    const ssize_t n = ::readlink(p.c_str(), to.data(), to.size());
    if (n <= 0 || size_t(n) >= to.size()) return p;
    to.resize(size_t(n));
    const size_t slash = p.rfind('/');
    p = to[0] == '/' || slash == std::string::npos ? to : p.substr(0, slash + 1) + to;
  }
  return path;
}

void write_file_atomically(const std::string& given, const void* data, size_t n, bool sync) {
  struct stat out {};
  if (::stat(given.c_str(), &out) == 0 && !S_ISREG(out.st_mode)) {
    // A device or a pipe (/dev/stdout, /dev/null) is written as it is: nothing to rename over.
    const int fd = ::open(given.c_str(), O_WRONLY);
    if (fd < 0) throw Error(Exit::cant_create, str("cannot open '", given, "': ", errno_text()));
    const bool written = write_all(fd, data, n);
    const std::string why = errno_text();
    if (::close(fd) != 0 || !written)
      throw Error(Exit::io, str("cannot write '", given, "': ", written ? errno_text() : why));
    return;
  }
  const std::string path = rename_target(given);
  const std::string temp = path + ".tmp" + std::to_string(::getpid());
  // Registered before it exists, so no signal finds it unregistered; forgotten on every way out,
  // after the rename or the unlink.
  register_temp_file(temp);
  struct Forget {
    const std::string& path;
    ~Forget() { unregister_temp_file(path); }
  } forget{temp};
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0666);
  if (fd < 0) throw Error(Exit::cant_create, str("cannot create '", given, "': ", errno_text()));
  if (!write_all(fd, data, n) || (sync && ::fsync(fd) != 0)) {
    const std::string why = errno_text();
    ::close(fd);
    ::unlink(temp.c_str());
    throw Error(Exit::io, str("cannot write '", given, "': ", why));
  }
  if (::close(fd) != 0) {
    const std::string why = errno_text();
    ::unlink(temp.c_str());
    throw Error(Exit::io, str("cannot write '", given, "': ", why));
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(temp.c_str());
    throw Error(Exit::cant_create, str("cannot create '", given, "': ", why));
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
