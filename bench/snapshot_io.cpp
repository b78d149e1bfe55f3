// bench-snapshot-io: end-to-end throughput of kv::SnapshotWriter / kv::SnapshotReader against
// plain I/O of the same bytes in the same run (DESIGN.md section 7), for an 8B-shaped synthetic
// snapshot (llama3-8b preset: 32 layers, 8 KV heads, head_dim 128; 8192 tokens, f16: k+v = 1 GiB).
//
//   file write  SnapshotWriter(FILE) + 32 x write_layer + finish()  vs  fwrite of the same k and v
//               buffers to another file in the same directory; fflush + fclose, no fsync.
//   file read   SnapshotReader(FILE) + 32 x read_layer into one reused Layer  vs  fread of each
//               layer's k and v bytes into one reused, page-aligned buffer of one layer's size;
//               both files are read once first (page cache warm).
//   pipe write  the writer with "-" while fd 1 is a pipe to a child that read()s and discards
//               (1 MiB buffer)  vs  write() of the same k and v buffers to an identical pipe/child.
//   pipe read   a child copies the snapshot file into a pipe; SnapshotReader("-") with fd 0 on
//               that pipe reads all layers  vs  read() of the plain k+v file from an identical
//               pipe/child into the reused one-layer buffer.
//   peak RSS    a fresh process (this program, exec'd with --rss-read FILE) reads the file layer
//               by layer into one Layer and prints its peak RSS (VmHWM; see maxrss_kib()).
//   memory bw   STREAM-like read (sum of a 1 GiB array with 2 threads), single-thread memcpy.
//   diagnostics plain I/O that shows what costs what (an O_TRUNC'd file, as the writer's
//               temporary file was before; fresh buffers; an unaligned buffer; ours without the
//               NaN scan), to show where ours' time goes.
//   --first-touch demand|populate|thp [MIB]: only times the first write of fresh memory, the
//               cost under every in-memory image (see bench/README.md).
//
// GB/s are 1e9 bytes per second of k+v payload (the same byte count for ours and plain, whatever
// the codec), best of --reps runs (all runs are printed). Exit status is non-zero only if something
// fails to run, never because a target is missed.
#include <fcntl.h>
#include <omp.h>
#include <sys/mman.h>
#include <sched.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common.h"
#include "kv/error.h"
#include "kv/snapshot_io.h"
#include "kv/synth.h"

extern char** environ;

namespace {

constexpr size_t kMiB = size_t(1) << 20;

using kvbench::now;
using kvbench::stream_read_gbps;

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "bench-snapshot-io: %s\n", msg.c_str());
  std::exit(70);
}

void check_sys(bool ok, const char* what) {
  if (!ok) die(std::string(what) + ": " + std::strerror(errno));
}

void write_all(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (n) {
    ssize_t put = ::write(fd, p, n);
    if (put < 0 && errno == EINTR) continue;
    check_sys(put > 0, "write");
    p += put;
    n -= size_t(put);
  }
}

// ---------------------------------------------------------------------------------------------
// Child modes (this program exec'd by itself).

// Reads fd 0 into a 1 MiB buffer until EOF and discards it.
int mode_drain() {
  std::vector<char> buf(kMiB);
  for (;;) {
    ssize_t got = ::read(0, buf.data(), buf.size());
    if (got == 0) return 0;
    if (got < 0 && errno == EINTR) continue;
    check_sys(got > 0, "drain: read");
  }
}

// Copies FILE to fd 1 in 1 MiB blocks.
int mode_feed(const char* path) {
  int fd = ::open(path, O_RDONLY);
  check_sys(fd >= 0, "feed: open");
  std::vector<char> buf(kMiB);
  for (;;) {
    ssize_t got = ::read(fd, buf.data(), buf.size());
    if (got == 0) break;
    if (got < 0 && errno == EINTR) continue;
    check_sys(got > 0, "feed: read");
    write_all(1, buf.data(), size_t(got));
  }
  ::close(fd);
  return 0;
}

// Peak RSS of this process in KiB: VmHWM from /proc/self/status, the high-water mark of this
// process's own address space. getrusage's ru_maxrss is not used: Linux carries it across exec
// (and posix_spawn's child shares the parent's address space until exec), so a child exec'd by a
// 2 GiB parent would report 2 GiB before reading anything. ru_maxrss is printed for reference.
long maxrss_kib() {
  long hwm = -1;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "VmHWM: %ld kB", &hwm) == 1) break;
    std::fclose(f);
  }
  if (hwm < 0) die("cannot read VmHWM from /proc/self/status");
  return hwm;
}

long ru_maxrss_kib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;  // KiB on Linux
}

// Reads FILE ("-": stdin) layer by layer into one Layer and prints the peak RSS.
int mode_rss_read(const char* path) {
  kv::SnapshotReader reader(path);
  kv::Layer layer;
  int64_t layer_kv = 0;
  for (int l = 0; l < reader.n_layers(); ++l) {
    reader.read_layer(l, layer);
    layer_kv = std::max<int64_t>(layer_kv, int64_t(layer.k.bytes() + layer.v.bytes()));
  }
  std::printf("maxrss_kib %ld layer_kv_bytes %" PRId64 " ru_maxrss_kib %ld\n", maxrss_kib(),
              layer_kv, ru_maxrss_kib());
  return 0;
}

// Times the first write of MIB fresh MiB (anonymous mmap), as every in-memory image pays it:
// "demand" (4 KiB pages faulted in by memset), "populate" (MADV_POPULATE_WRITE first, as libkv's
// image buffers do) or "thp" (MADV_HUGEPAGE). On this VM the result depends on what the memory
// was recently used for, so it is a mode of its own, run in a fresh process (see README).
int mode_first_touch(const std::string& how, size_t mib) {
  if (how != "demand" && how != "populate" && how != "thp") {
    std::fprintf(stderr, "bench-snapshot-io: --first-touch demand|populate|thp [MIB]\n");
    return 64;
  }
  const size_t bytes = mib * kMiB;
  const double t0 = now();
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  check_sys(p != MAP_FAILED, "mmap");
  if (how == "thp") check_sys(::madvise(p, bytes, MADV_HUGEPAGE) == 0, "madvise(MADV_HUGEPAGE)");
  if (how == "populate")
    check_sys(::madvise(p, bytes, MADV_POPULATE_WRITE) == 0, "madvise(MADV_POPULATE_WRITE)");
  std::memset(p, 1, bytes);
  const double t = now() - t0;
  ::munmap(p, bytes);
  std::printf("first touch, %s: %zu MiB in %.3f s (%.2f GB/s)\n", how.c_str(), mib, t,
              double(bytes) / 1e9 / t);
  return 0;
}

// The same process with libkv/HDF5 loaded and initialized but nothing read: the RSS baseline.
int mode_rss_idle() {
  kv::register_zstd_filter();
  std::printf("maxrss_kib %ld layer_kv_bytes 0 ru_maxrss_kib %ld\n", maxrss_kib(), ru_maxrss_kib());
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Processes and fds

std::string self_exe;

// --pipe-cpus: where the two ends of a pipe run. "any": the scheduler decides (default);
// "same": both on CPU 0; "split": this process on CPU 0, the child on CPU 1. On this VM a pipe
// between two CPUs is about 3x slower than one within a CPU (cross-CPU wakeups), so unpinned
// pipe figures swing with whatever else runs.
std::string g_pipe_cpus = "any";

void set_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  check_sys(sched_setaffinity(0, sizeof set, &set) == 0, "sched_setaffinity");
}

// Pins this process for one pipe measurement and restores the affinity afterwards.
class PipePinning {
 public:
  PipePinning() {
    sched_getaffinity(0, sizeof saved_, &saved_);
    if (g_pipe_cpus == "same") set_cpu(0);
    if (g_pipe_cpus == "split") set_cpu(1);  // inherited by the child spawned next
  }
  void after_spawn() {
    if (g_pipe_cpus == "split") set_cpu(0);
  }
  ~PipePinning() { sched_setaffinity(0, sizeof saved_, &saved_); }

 private:
  cpu_set_t saved_;
};

// Starts this program with `args`, fd 0 from in_fd and fd 1 to out_fd (-1: inherited).
pid_t spawn_self(const std::vector<std::string>& args, int in_fd, int out_fd) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (in_fd >= 0) posix_spawn_file_actions_adddup2(&fa, in_fd, 0);
  if (out_fd >= 0) posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
  std::vector<char*> argv{const_cast<char*>(self_exe.c_str())};
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::fflush(nullptr);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, self_exe.c_str(), &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) die(std::string("posix_spawn: ") + std::strerror(rc));
  return pid;
}

void wait_child(pid_t pid, const char* what) {
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) check_sys(errno == EINTR, "waitpid");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) die(std::string(what) + " child failed");
}

std::string run_self_capture(const std::vector<std::string>& args, int in_fd = -1) {
  int p[2];
  check_sys(pipe2(p, O_CLOEXEC) == 0, "pipe");
  pid_t pid = spawn_self(args, in_fd, p[1]);
  ::close(p[1]);
  std::string out;
  char buf[4096];
  for (ssize_t got; (got = ::read(p[0], buf, sizeof buf)) != 0;) {
    if (got < 0 && errno == EINTR) continue;
    check_sys(got > 0, "read");
    out.append(buf, size_t(got));
  }
  ::close(p[0]);
  wait_child(pid, args[0].c_str());
  return out;
}

// Points fd `target` (0 or 1) at `fd` until destroyed (or restore()).
class Redirect {
 public:
  Redirect(int fd, int target) : target_(target) {
    std::fflush(nullptr);
    saved_ = ::dup(target);
    check_sys(saved_ >= 0 && ::dup2(fd, target) == target, "dup2");
  }
  ~Redirect() { restore(); }
  void restore() {
    if (saved_ < 0) return;
    ::dup2(saved_, target_);
    ::close(saved_);
    saved_ = -1;
  }

 private:
  int target_, saved_ = -1;
};

volatile uint64_t g_sink;

// ---------------------------------------------------------------------------------------------
// The measurements. Each returns seconds; `parts` (when given) gets a breakdown.

struct Parts {
  double open = 0, layers = 0, finish = 0;
};

struct Input {
  kv::Header header;
  std::vector<kv::Layer> layers;
  size_t kv_bytes = 0;        // k+v of all layers
  size_t layer_kv_bytes = 0;  // k+v of the largest layer
};

void write_layers_ours(const std::string& path, const Input& in, const kv::Codec& codec,
                       Parts* parts) {
  kv::WriteOptions wo;
  wo.codec = codec;
  double t0 = now();
  kv::SnapshotWriter w(path, in.header, wo);
  double t1 = now();
  for (const kv::Layer& layer : in.layers) w.write_layer(layer);
  double t2 = now();
  w.finish();
  double t3 = now();
  if (parts) *parts = {t1 - t0, t2 - t1, t3 - t2};
}

void write_layers_plain(int fd, const Input& in) {
  for (const kv::Layer& layer : in.layers) {
    write_all(fd, layer.k.data(), layer.k.bytes());
    write_all(fd, layer.v.data(), layer.v.bytes());
  }
}

double file_write_ours(const std::string& path, const Input& in, const kv::Codec& codec,
                       Parts* parts) {
  ::unlink(path.c_str());
  double t0 = now();
  write_layers_ours(path, in, codec, parts);
  return now() - t0;
}

double file_write_plain(const std::string& path, const Input& in) {
  ::unlink(path.c_str());
  double t0 = now();
  FILE* f = std::fopen(path.c_str(), "wb");
  check_sys(f != nullptr, "fopen");
  for (const kv::Layer& layer : in.layers) {
    check_sys(std::fwrite(layer.k.data(), 1, layer.k.bytes(), f) == layer.k.bytes(), "fwrite");
    check_sys(std::fwrite(layer.v.data(), 1, layer.v.bytes(), f) == layer.v.bytes(), "fwrite");
  }
  check_sys(std::fflush(f) == 0, "fflush");
  check_sys(std::fclose(f) == 0, "fclose");
  return now() - t0;
}

double file_read_ours(const std::string& path, kv::Layer& out, Parts* parts,
                      kv::ReadOptions ro = {}) {
  double t0 = now();
  kv::SnapshotReader r(path, ro);
  double t1 = now();
  for (int l = 0; l < r.n_layers(); ++l) r.read_layer(l, out);
  double t2 = now();
  if (parts) *parts = {t1 - t0, t2 - t1, 0};
  return t2 - t0;
}

// fread of each layer's k and then v bytes (the requests fwrite made, the dataset reads ours
// makes) into the two halves of one reused buffer of one layer's size.
double file_read_plain(const std::string& path, const Input& in, std::span<char> buf) {
  double t0 = now();
  FILE* f = std::fopen(path.c_str(), "rb");
  check_sys(f != nullptr, "fopen");
  size_t total = 0;
  for (const kv::Layer& layer : in.layers) {
    total += std::fread(buf.data(), 1, layer.k.bytes(), f);
    total += std::fread(buf.data() + layer.k.bytes(), 1, layer.v.bytes(), f);
  }
  check_sys(!std::ferror(f), "fread");
  std::fclose(f);
  double t = now() - t0;
  if (total != in.kv_bytes) die("plain read: short file");
  return t;
}

double pipe_write_ours(const Input& in, const kv::Codec& codec, Parts* parts) {
  PipePinning pin;
  int p[2];
  check_sys(pipe2(p, O_CLOEXEC) == 0, "pipe");
  pid_t pid = spawn_self({"--drain"}, p[0], -1);
  pin.after_spawn();
  ::close(p[0]);
  Redirect out(p[1], 1);
  ::close(p[1]);
  double t0 = now();
  write_layers_ours("-", in, codec, parts);
  out.restore();  // closes our last write end: the child sees EOF
  wait_child(pid, "--drain");
  return now() - t0;
}

double pipe_write_plain(const Input& in) {
  PipePinning pin;
  int p[2];
  check_sys(pipe2(p, O_CLOEXEC) == 0, "pipe");
  pid_t pid = spawn_self({"--drain"}, p[0], -1);
  pin.after_spawn();
  ::close(p[0]);
  Redirect out(p[1], 1);
  ::close(p[1]);
  double t0 = now();
  write_layers_plain(1, in);
  out.restore();
  wait_child(pid, "--drain");
  return now() - t0;
}

double pipe_read_ours(const std::string& feed, kv::Layer& out, Parts* parts) {
  PipePinning pin;
  int p[2];
  check_sys(pipe2(p, O_CLOEXEC) == 0, "pipe");
  pid_t pid = spawn_self({"--feed", feed}, -1, p[1]);
  pin.after_spawn();
  ::close(p[1]);
  Redirect in(p[0], 0);
  ::close(p[0]);
  double t0 = now();
  {
    kv::SnapshotReader r("-");
    double t1 = now();
    for (int l = 0; l < r.n_layers(); ++l) r.read_layer(l, out);
    if (parts) *parts = {t1 - t0, now() - t1, 0};
  }
  in.restore();
  wait_child(pid, "--feed");
  return now() - t0;
}

double pipe_read_plain(const std::string& feed, std::span<char> buf, size_t expect) {
  PipePinning pin;
  int p[2];
  check_sys(pipe2(p, O_CLOEXEC) == 0, "pipe");
  pid_t pid = spawn_self({"--feed", feed}, -1, p[1]);
  pin.after_spawn();
  ::close(p[1]);
  Redirect in(p[0], 0);
  ::close(p[0]);
  double t0 = now();
  size_t total = 0, off = 0;
  for (;;) {
    if (off == buf.size()) off = 0;
    ssize_t got = ::read(0, buf.data() + off, buf.size() - off);
    if (got == 0) break;
    if (got < 0 && errno == EINTR) continue;
    check_sys(got > 0, "read");
    off += size_t(got);
    total += size_t(got);
  }
  in.restore();
  wait_child(pid, "--feed");
  double t = now() - t0;
  if (total != expect) die("plain pipe read: short");
  return t;
}

// --- Diagnostics: plain I/O doing what libkv does, to show where ours' time goes.

// fwrite of k+v into a file that already exists, empty, opened with O_TRUNC ("wb"): what the
// writer's temporary file cost when it was made with mkstemp() + H5Fcreate(H5F_ACC_TRUNC) (it is
// now created afresh by HDF5). ext4 (auto_da_alloc) starts writeback of the whole file in close()
// after a truncate, which a newly created file does not get.
void file_write_plain_pretruncated(const std::string& path, const Input& in, double& t_write,
                                   double& t_close) {
  ::unlink(path.c_str());
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  check_sys(fd >= 0, "open");
  ::close(fd);
  double t0 = now();
  FILE* f = std::fopen(path.c_str(), "wb");
  check_sys(f != nullptr, "fopen");
  for (const kv::Layer& layer : in.layers) {
    check_sys(std::fwrite(layer.k.data(), 1, layer.k.bytes(), f) == layer.k.bytes(), "fwrite");
    check_sys(std::fwrite(layer.v.data(), 1, layer.v.bytes(), f) == layer.v.bytes(), "fwrite");
  }
  check_sys(std::fflush(f) == 0, "fflush");
  double t1 = now();
  check_sys(std::fclose(f) == 0, "fclose");
  t_write = t1 - t0;
  t_close = now() - t1;
  ::unlink(path.c_str());
}

// memcpy of all k+v into one freshly allocated buffer, then free: the page faults and copy that
// building a whole file image in memory costs (the pipe writer pays this once: HDF5's core
// driver zero-fills and fills its image, whose pages libkv populates ahead of use).
double memcpy_fresh(const Input& in) {
  double t0 = now();
  auto* p = static_cast<char*>(std::malloc(in.kv_bytes));
  if (!p) die("out of memory");
  size_t off = 0;
  for (const kv::Layer& layer : in.layers) {
    std::memcpy(p + off, layer.k.data(), layer.k.bytes());
    off += layer.k.bytes();
    std::memcpy(p + off, layer.v.data(), layer.v.bytes());
    off += layer.v.bytes();
  }
  g_sink = uint64_t(p[off / 2]);
  std::free(p);
  return now() - t0;
}

// read() of the pipe into one freshly allocated buffer of the whole size (what the pipe reader's
// slurp of stdin into memory costs, without its realloc growth).
double pipe_read_plain_fresh(const std::string& feed, size_t expect) {
  PipePinning pin;
  int p[2];
  check_sys(pipe2(p, O_CLOEXEC) == 0, "pipe");
  pid_t pid = spawn_self({"--feed", feed}, -1, p[1]);
  pin.after_spawn();
  ::close(p[1]);
  double t0 = now();
  auto* buf = static_cast<char*>(std::malloc(expect));
  if (!buf) die("out of memory");
  size_t total = 0;
  for (;;) {
    ssize_t got = ::read(p[0], buf + total, expect - total);
    if (got == 0 || total == expect) break;
    if (got < 0 && errno == EINTR) continue;
    check_sys(got > 0, "read");
    total += size_t(got);
  }
  ::close(p[0]);
  wait_child(pid, "--feed");
  g_sink = uint64_t(buf[total / 2]);
  std::free(buf);
  double t = now() - t0;
  if (total != expect) die("plain pipe read: short");
  return t;
}

// ---------------------------------------------------------------------------------------------
// Memory bandwidth

double memcpy_gbps(size_t bytes, int reps) {
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    double t0 = now();
    std::memcpy(dst.data(), src.data(), bytes);
    best = std::min(best, now() - t0);
    g_sink = uint64_t(dst[bytes / 2]);
  }
  return double(bytes) / best / 1e9;
}

// ---------------------------------------------------------------------------------------------
// Reporting

struct Times {
  std::vector<double> s;
  double best() const { return *std::min_element(s.begin(), s.end()); }
  double median() const {
    auto v = s;
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  }
  std::string all() const {
    std::string out;
    char buf[32];
    for (double t : s) {
      std::snprintf(buf, sizeof buf, "%s%.3f", out.empty() ? "" : " ", t);
      out += buf;
    }
    return out;
  }
};

struct Row {
  std::string path, codec;
  double ours_gbps, plain_gbps;
  bool judged;  // codec none: judged against the target
  std::string note;
};

// CPU time of the whole machine from /proc/stat (seconds): busy (not idle/iowait) and steal.
struct MachineCpu {
  double busy = 0, steal = 0;
};

MachineCpu machine_cpu() {
  MachineCpu m;
  FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return m;
  unsigned long long v[8] = {};
  if (std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                  &v[4], &v[5], &v[6], &v[7]) == 8) {
    const double hz = double(sysconf(_SC_CLK_TCK));
    m.busy = double(v[0] + v[1] + v[2] + v[5] + v[6]) / hz;  // user nice system irq softirq
    m.steal = double(v[7]) / hz;
  }
  std::fclose(f);
  return m;
}

// CPU seconds used by this process and its waited-for children.
double own_cpu() {
  double t = 0;
  for (int who : {RUSAGE_SELF, RUSAGE_CHILDREN}) {
    rusage ru{};
    getrusage(who, &ru);
    t += double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  }
  return t;
}

struct Options {
  int64_t tokens = 8192;
  std::string model = "llama3-8b";
  std::string dir = "/tmp";
  int reps = 3;
  int codec_reps = 1;
  std::vector<std::string> codecs;
  double target = 0.7;
  bool keep = false;
  std::string pipe_cpus = "any";
};

void usage() {
  std::printf(
      "usage: bench-snapshot-io [--tokens N] [--model PRESET] [--dir DIR] [--reps R]\n"
      "                         [--codec-reps R] [--codec SPEC]... [--keep]\n"
      "  --tokens N      tokens per snapshot (default 8192: 1 GiB of k+v for llama3-8b)\n"
      "  --model PRESET  kv::model_preset name (default llama3-8b)\n"
      "  --dir DIR       where the files go (default /tmp)\n"
      "  --reps R        runs of each codec-none measurement, best taken (default 3)\n"
      "  --codec-reps R  runs of each compressed measurement (default 1)\n"
      "  --codec SPEC    codecs to run (default: none, zstd,1, deflate,1); none always runs\n"
      "  --keep          keep the files\n"
      "  --pipe-cpus M   pipe ends: any (scheduler decides, default), same (both on CPU 0),\n"
      "                  split (this process on CPU 0, the child on CPU 1)\n"
      "       bench-snapshot-io --first-touch demand|populate|thp [MIB]\n"
      "                  only time the first write of MIB (default 1024) fresh MiB\n");
}

Options parse(int argc, char** argv) {
  Options o;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) {
      usage();
      std::exit(64);
    }
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--tokens") o.tokens = std::atoll(need(i).c_str());
    else if (a == "--model") o.model = need(i);
    else if (a == "--dir") o.dir = need(i);
    else if (a == "--reps") o.reps = std::max(1, std::atoi(need(i).c_str()));
    else if (a == "--codec-reps") o.codec_reps = std::max(1, std::atoi(need(i).c_str()));
    else if (a == "--codec") o.codecs.push_back(need(i));
    else if (a == "--keep") o.keep = true;
    else if (a == "--pipe-cpus") {
      o.pipe_cpus = need(i);
      if (o.pipe_cpus != "any" && o.pipe_cpus != "same" && o.pipe_cpus != "split") {
        usage();
        std::exit(64);
      }
    }
    else if (a == "-h" || a == "--help") {
      usage();
      std::exit(0);
    } else {
      usage();
      std::exit(64);
    }
  }
  if (o.codecs.empty()) o.codecs = {"none", "zstd,1", "deflate,1"};
  // none first: the plain baselines are measured alongside it.
  o.codecs.erase(std::remove(o.codecs.begin(), o.codecs.end(), "none"), o.codecs.end());
  o.codecs.insert(o.codecs.begin(), "none");
  return o;
}

int64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? int64_t(st.st_size) : -1;
}

struct Rss {
  long kib = 0;     // VmHWM
  long ru_kib = 0;  // ru_maxrss (inherited across exec: for reference only)
  int64_t layer_kv = 0;
};

Rss parse_rss(const std::string& s) {
  Rss r;
  long long lk = 0;
  if (std::sscanf(s.c_str(), "maxrss_kib %ld layer_kv_bytes %lld ru_maxrss_kib %ld", &r.kib, &lk,
                  &r.ru_kib) != 3)
    die("cannot parse the --rss-read output: " + s);
  r.layer_kv = lk;
  return r;
}

int run(const Options& o) {
  std::string host_cpu = "?";
  if (FILE* f = std::fopen("/proc/cpuinfo", "r")) {
    char line[512];
    while (std::fgets(line, sizeof line, f))
      if (std::strncmp(line, "model name", 10) == 0) {
        const char* c = std::strchr(line, ':');
        host_cpu = c ? c + 2 : line;
        host_cpu.erase(host_cpu.find_last_not_of("\n") + 1);
        break;
      }
    std::fclose(f);
  }
  std::printf("bench-snapshot-io: %s, %" PRId64 " tokens, dir %s, %ld CPUs (%s), %d OpenMP "
              "threads, pipe ends on CPUs: %s\n",
              o.model.c_str(), o.tokens, o.dir.c_str(), sysconf(_SC_NPROCESSORS_ONLN),
              host_cpu.c_str(), omp_get_max_threads(), o.pipe_cpus.c_str());

  g_pipe_cpus = o.pipe_cpus;
  if (g_pipe_cpus != "any" && sysconf(_SC_NPROCESSORS_ONLN) < 2) die("--pipe-cpus needs 2 CPUs");
  const MachineCpu cpu0 = machine_cpu();
  const double own0 = own_cpu(), wall0 = now();

  // --- the snapshot, generated once (not timed as I/O)
  kv::SynthSpec spec;
  spec.model = kv::model_preset(o.model);
  spec.n_tokens = o.tokens;
  spec.dtype = kv::DType::f16;
  kv::Synthesizer synth(spec);
  Input in;
  in.header = synth.header();
  in.layers.resize(size_t(in.header.model.n_layers));
  double tg = now();
  for (int l = 0; l < in.header.model.n_layers; ++l) {
    synth.layer(l, in.layers[size_t(l)]);
    size_t b = in.layers[size_t(l)].k.bytes() + in.layers[size_t(l)].v.bytes();
    in.kv_bytes += b;
    in.layer_kv_bytes = std::max(in.layer_kv_bytes, b);
  }
  std::printf("generated %d layers, k+v %.3f GiB (%.1f MiB per layer) in %.2f s\n",
              in.header.model.n_layers, double(in.kv_bytes) / double(1 << 30),
              double(in.layer_kv_bytes) / double(kMiB), now() - tg);

  // --- disk space: ours + plain file + the O_TRUNC diagnostic's file, codec none, + slack
  struct statvfs vfs {};
  check_sys(statvfs(o.dir.c_str(), &vfs) == 0, ("statvfs " + o.dir).c_str());
  double free_gib = double(vfs.f_bavail) * double(vfs.f_frsize) / double(1 << 30);
  double need_gib = 3.2 * double(in.kv_bytes) / double(1 << 30) + 0.1;
  std::printf("free space in %s: %.1f GiB (need about %.1f GiB)\n", o.dir.c_str(), free_gib,
              need_gib);
  if (free_gib < need_gib) die("not enough free space in " + o.dir + " (use --dir)");

  // --- memory bandwidth
  double bw_read = stream_read_gbps(size_t(1) << 30, 2, 5);
  double bw_copy = memcpy_gbps(256 * kMiB, 3);
  std::printf("memory: STREAM-like read (sum of 1 GiB, 2 threads) %.1f GB/s; "
              "memcpy (256 MiB, 1 thread) %.1f GB/s copied\n\n",
              bw_read, bw_copy);

  const std::string pid = std::to_string(::getpid());
  const std::string plain_path = o.dir + "/bench-snapshot-io." + pid + ".plain.bin";
  kv::Layer layer;
  // The plain readers' buffer: page-aligned, as a careful reader would use. The copy out of the
  // page cache (rep movsb) runs at about half speed when source and destination are not
  // 32-byte aligned to each other; a plain malloc'd buffer (16 bytes past a page boundary) is
  // measured as a diagnostic below. Faulted in before timing.
  const size_t buf_bytes = (in.layer_kv_bytes + 4095) / 4096 * 4096;
  std::unique_ptr<char, decltype(&std::free)> buf_owner(
      static_cast<char*>(std::aligned_alloc(4096, buf_bytes)), &std::free);
  if (!buf_owner) die("out of memory");
  std::span<char> buf(buf_owner.get(), in.layer_kv_bytes);
  std::memset(buf.data(), 0, buf.size());
  std::vector<char> buf_malloc(in.layer_kv_bytes, 0);
  std::vector<Row> rows;
  double plain_gbps[4] = {};  // file write, file read, pipe write, pipe read
  const double gb = double(in.kv_bytes) / 1e9;
  Rss rss_file, rss_stdin, rss_idle;
  std::vector<std::pair<std::string, Rss>> rss_codec;
  std::string breakdown;
  auto add_breakdown = [&](const std::string& what, const Parts& p, double total) {
    char line[256];
    std::snprintf(line, sizeof line, "  %-22s open %.3f s, layers %.3f s, finish %.3f s (total %.3f s)\n",
                  what.c_str(), p.open, p.layers, p.finish, total);
    breakdown += line;
  };

  for (const std::string& spec_str : o.codecs) {
    const kv::Codec codec = kv::Codec::parse(spec_str);
    const bool none = codec.kind == kv::Codec::Kind::none;
    const int reps = none ? o.reps : o.codec_reps;
    const std::string tag = codec.str();
    std::string safe = tag;
    std::replace(safe.begin(), safe.end(), ',', '-');
    const std::string ours_path = o.dir + "/bench-snapshot-io." + pid + "." + safe + ".kv.h5";
    std::printf("== codec %s (%d run%s each)\n", tag.c_str(), reps, reps > 1 ? "s" : "");

    // file write. With codec none, one untimed round first: the first 1 GiB written into the
    // page cache after start-up runs several times slower here (fresh pages), for either writer.
    Times tw_ours, tw_plain;
    Parts pw_best{}, parts{};
    if (none) {
      file_write_plain(plain_path, in);
      file_write_ours(ours_path, in, codec, nullptr);
    }
    for (int r = 0; r < reps; ++r) {
      bool plain_first = r % 2 == 0;  // alternate the order so drift hits both alike
      if (none && plain_first) tw_plain.s.push_back(file_write_plain(plain_path, in));
      tw_ours.s.push_back(file_write_ours(ours_path, in, codec, &parts));
      if (tw_ours.s.back() == tw_ours.best()) pw_best = parts;
      if (none && !plain_first) tw_plain.s.push_back(file_write_plain(plain_path, in));
    }
    const int64_t ours_bytes = file_size(ours_path);
    std::printf("file write  ours  [%s] s   file %.1f MiB (%.3f of k+v)\n", tw_ours.all().c_str(),
                double(ours_bytes) / double(kMiB), double(ours_bytes) / double(in.kv_bytes));
    if (none) {
      std::printf("file write  plain [%s] s\n", tw_plain.all().c_str());
      plain_gbps[0] = gb / tw_plain.best();
    }
    add_breakdown("file write " + tag, pw_best, tw_ours.best());
    if (none) {
      Times tw, tc;
      for (int r = 0; r < reps; ++r) {
        double a = 0, b = 0;
        file_write_plain_pretruncated(plain_path + ".trunc", in, a, b);
        tw.s.push_back(a);
        tc.s.push_back(b);
      }
      char line[320];
      std::snprintf(line, sizeof line,
                    "  %-22s fwrite+fflush [%s] s, fclose [%s] s: plain write into an existing "
                    "empty file opened with O_TRUNC, as the writer's temporary file was before\n",
                    "file write plain", tw.all().c_str(), tc.all().c_str());
      breakdown += line;
    }
    rows.push_back({"file write", tag, gb / tw_ours.best(), plain_gbps[0], none, ""});

    // file read: warm the page cache (and check the round trip) first
    {
      kv::SnapshotReader r(ours_path);
      for (int l = 0; l < r.n_layers(); ++l) {
        r.read_layer(l, layer);
        const kv::Layer& want = in.layers[size_t(l)];
        if (!layer.k.same_contents(want.k) || !layer.v.same_contents(want.v) ||
            layer.positions != want.positions)
          die("layer " + std::to_string(l) + " did not round-trip through " + ours_path);
      }
      if (none) file_read_plain(plain_path, in, buf);
    }
    Times tr_ours, tr_plain;
    Parts pr_best{};
    for (int r = 0; r < reps; ++r) {
      bool plain_first = r % 2 == 0;
      if (none && plain_first) tr_plain.s.push_back(file_read_plain(plain_path, in, buf));
      tr_ours.s.push_back(file_read_ours(ours_path, layer, &parts));
      if (tr_ours.s.back() == tr_ours.best()) pr_best = parts;
      if (none && !plain_first) tr_plain.s.push_back(file_read_plain(plain_path, in, buf));
    }
    std::printf("file read   ours  [%s] s (page cache warm)\n", tr_ours.all().c_str());
    if (none) {
      std::printf("file read   plain [%s] s (page cache warm)\n", tr_plain.all().c_str());
      plain_gbps[1] = gb / tr_plain.best();
    }
    add_breakdown("file read " + tag, pr_best, tr_ours.best());
    if (none) {
      Times t;
      for (int r = 0; r < reps; ++r) t.s.push_back(file_read_plain(plain_path, in, buf_malloc));
      char line[320];
      std::snprintf(line, sizeof line,
                    "  %-22s %.3f s best [%s] (%.2f GB/s): plain fread into a std::vector buffer "
                    "(malloc'd, %zu mod 64) instead of a page-aligned one\n",
                    "file read plain", t.best(), t.all().c_str(), gb / t.best(),
                    size_t(reinterpret_cast<uintptr_t>(buf_malloc.data()) % 64));
      breakdown += line;
    }
    rows.push_back({"file read", tag, gb / tr_ours.best(), plain_gbps[1], none, ""});
    if (none) {
      // Where read time goes: the same read without the NaN/Inf scan of k and v.
      kv::ReadOptions ro;
      ro.allow_nonfinite = true;
      Times t;
      for (int r = 0; r < reps; ++r) t.s.push_back(file_read_ours(ours_path, layer, nullptr, ro));
      char line[256];
      std::snprintf(line, sizeof line,
                    "  %-22s %.3f s best [%s] (%.2f GB/s): read_layer without the NaN/Inf scan\n",
                    "file read none", t.best(), t.all().c_str(), gb / t.best());
      breakdown += line;
      double t0 = now();
      for (int l = 0; l < in.header.model.n_layers; ++l)
        kv::validate_layer(in.header, l, in.layers[size_t(l)], true);
      double tv = now() - t0;
      std::snprintf(line, sizeof line,
                    "  %-22s %.3f s (%.2f GB/s): validate_layer(check_values) of all layers in "
                    "memory (a separate pass; read_layer checks each block as it lands)\n",
                    "validate", tv, gb / tv);
      breakdown += line;
    }

    // peak RSS of a layer-by-layer read, in a fresh process
    if (none) {
      rss_idle = parse_rss(run_self_capture({"--rss-idle"}));
      rss_file = parse_rss(run_self_capture({"--rss-read", ours_path}));
      int fd = ::open(ours_path.c_str(), O_RDONLY | O_CLOEXEC);
      check_sys(fd >= 0, "open");
      rss_stdin = parse_rss(run_self_capture({"--rss-read", "-"}, fd));
      ::close(fd);
    } else {
      rss_codec.push_back({tag, parse_rss(run_self_capture({"--rss-read", ours_path}))});
    }

    // pipe write
    Times tpw_ours, tpw_plain;
    Parts ppw_best{};
    for (int r = 0; r < reps; ++r) {
      bool plain_first = r % 2 == 0;
      if (none && plain_first) tpw_plain.s.push_back(pipe_write_plain(in));
      tpw_ours.s.push_back(pipe_write_ours(in, codec, &parts));
      if (tpw_ours.s.back() == tpw_ours.best()) ppw_best = parts;
      if (none && !plain_first) tpw_plain.s.push_back(pipe_write_plain(in));
    }
    std::printf("pipe write  ours  [%s] s\n", tpw_ours.all().c_str());
    if (none) {
      std::printf("pipe write  plain [%s] s\n", tpw_plain.all().c_str());
      plain_gbps[2] = gb / tpw_plain.best();
    }
    add_breakdown("pipe write " + tag, ppw_best, tpw_ours.best());
    if (none) {
      Times t;
      for (int r = 0; r < reps; ++r) t.s.push_back(memcpy_fresh(in));
      char line[320];
      std::snprintf(line, sizeof line,
                    "  %-22s %.3f s best [%s] (%.2f GB/s): memcpy of k+v into a fresh malloc'd "
                    "buffer + free (page faults + copy)\n",
                    "fresh-buffer copy", t.best(), t.all().c_str(), gb / t.best());
      breakdown += line;
    }
    rows.push_back({"pipe write", tag, gb / tpw_ours.best(), plain_gbps[2], none, ""});

    // pipe read
    Times tpr_ours, tpr_plain;
    Parts ppr_best{};
    for (int r = 0; r < reps; ++r) {
      bool plain_first = r % 2 == 0;
      if (none && plain_first) tpr_plain.s.push_back(pipe_read_plain(plain_path, buf, in.kv_bytes));
      tpr_ours.s.push_back(pipe_read_ours(ours_path, layer, &parts));
      if (tpr_ours.s.back() == tpr_ours.best()) ppr_best = parts;
      if (none && !plain_first) tpr_plain.s.push_back(pipe_read_plain(plain_path, buf, in.kv_bytes));
    }
    std::printf("pipe read   ours  [%s] s\n", tpr_ours.all().c_str());
    if (none) {
      std::printf("pipe read   plain [%s] s\n", tpr_plain.all().c_str());
      plain_gbps[3] = gb / tpr_plain.best();
    }
    add_breakdown("pipe read " + tag, ppr_best, tpr_ours.best());
    if (none) {
      Times t;
      for (int r = 0; r < reps; ++r) t.s.push_back(pipe_read_plain_fresh(plain_path, in.kv_bytes));
      char line[320];
      std::snprintf(line, sizeof line,
                    "  %-22s %.3f s best [%s] (%.2f GB/s): plain read() of the pipe into one "
                    "fresh buffer of the whole size\n",
                    "pipe read plain fresh", t.best(), t.all().c_str(), gb / t.best());
      breakdown += line;
    }
    rows.push_back({"pipe read", tag, gb / tpr_ours.best(), plain_gbps[3], none, ""});

    if (!o.keep) ::unlink(ours_path.c_str());
    if (none && !o.keep) ::unlink(plain_path.c_str());
    std::printf("\n");
  }

  // --- the table
  std::printf("Throughput (GB/s = 1e9 B/s of k+v payload, %.3f GB; best run; files in the page "
              "cache, no fsync):\n",
              gb);
  std::printf("%-11s %-10s %9s %9s %7s %8s %7s %8s\n", "path", "codec", "ours", "plain", "ratio",
              "target", "result", "ours/bw");
  for (const Row& r : rows) {
    double ratio = r.ours_gbps / r.plain_gbps;
    char target[16];
    std::snprintf(target, sizeof target, r.judged ? ">=%.2f" : "info", o.target);
    std::printf("%-11s %-10s %9.2f %9.2f %7.2f %8s %7s %7.1f%%\n", r.path.c_str(), r.codec.c_str(),
                r.ours_gbps, r.plain_gbps, ratio, target,
                r.judged ? (ratio >= o.target ? "PASS" : "FAIL") : "-",
                100.0 * r.ours_gbps / bw_read);
  }
  std::printf("memory read bandwidth (STREAM-like, 2 threads): %.1f GB/s; memcpy 1 thread %.1f GB/s\n\n",
              bw_read, bw_copy);

  const double bound_mib = 1.3 * double(in.layer_kv_bytes) / double(kMiB) + 100.0;
  const double rss_mib = double(rss_file.kib) / 1024.0;
  std::printf("Peak RSS reading the codec-none file layer by layer (fresh process, VmHWM):\n");
  std::printf("  %.1f MiB; bound 1.3 x %.1f MiB (one layer's k+v) + 100 MiB = %.1f MiB: %s\n",
              rss_mib, double(rss_file.layer_kv) / double(kMiB), bound_mib,
              rss_mib <= bound_mib ? "PASS" : "FAIL");
  std::printf("  for information: idle process with libkv loaded %.1f MiB", rss_idle.kib / 1024.0);
  for (const auto& [tag, r] : rss_codec) std::printf("; %s file %.1f MiB", tag.c_str(), r.kib / 1024.0);
  std::printf("; none from stdin (\"-\", held whole in memory) %.1f MiB\n", rss_stdin.kib / 1024.0);
  std::printf("  (the child's getrusage ru_maxrss was %.1f MiB: Linux carries it over from the "
              "parent across exec, so VmHWM is used)\n\n",
              rss_file.ru_kib / 1024.0);

  std::printf("Where ours spends its time (best run of each; open = constructor, layers = "
              "write_layer/read_layer calls, finish = finish()):\n%s\n",
              breakdown.c_str());

  const MachineCpu cpu1 = machine_cpu();
  const double wall = now() - wall0, own = own_cpu() - own0;
  const double others = std::max(0.0, cpu1.busy - cpu0.busy - own);
  const long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  std::printf("Run: %.0f s wall; CPU busy outside this benchmark (other processes, kernel threads "
              "such as writeback): %.1f s of %.0f s (%.0f%%); VM steal %.1f s\n",
              wall, others, wall * double(ncpu), 100.0 * others / (wall * double(ncpu)),
              cpu1.steal - cpu0.steal);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    {
      char exe[4096];
      ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
      if (n <= 0) die("cannot find /proc/self/exe");
      exe[n] = 0;
      self_exe = exe;
    }
    if (argc >= 2) {
      std::string m = argv[1];
      if (m == "--drain") return mode_drain();
      if (m == "--feed" && argc == 3) return mode_feed(argv[2]);
      if (m == "--rss-read" && argc == 3) return mode_rss_read(argv[2]);
      if (m == "--rss-idle") return mode_rss_idle();
      if (m == "--first-touch" && (argc == 3 || argc == 4))
        return mode_first_touch(argv[2], argc == 4 ? size_t(std::atoll(argv[3])) : 1024);
    }
    return run(parse(argc, argv));
  } catch (const kv::Error& e) {
    std::fprintf(stderr, "bench-snapshot-io: %s\n", e.what());
    return int(e.code());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench-snapshot-io: %s\n", e.what());
    return 70;
  }
}
