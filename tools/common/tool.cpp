#include "tool.h"

#include <omp.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>

#include "kv/error.h"
#include "kv/str.h"
#include "kv/version.h"

namespace kvt {

Tool::Tool(std::string name, std::string description)
    : name_(std::move(name)), app_(std::move(description), name_) {
  app_.set_version_flag("--version", std::string(name_) + " (kvtk) " + kv::version());
  app_.add_option("-@,--threads", threads, "Worker threads (default: all cores)")
      ->check(integer_in(0, 1024));
  app_.add_flag("-q,--quiet", quiet, "No progress or notes on stderr");
  app_.get_formatter()->column_width(34);
}

void Tool::add_input(std::string* input) {
  app_.add_option("INPUT", *input, "Snapshot to read; - reads stdin")->default_val("-");
}

void Tool::add_output_options() {
  app_.add_option("-o,--output", output, "Snapshot to write; - writes stdout")->default_val("-");
  app_.add_option("--codec", codec,
                  "Lossless codec for stored arrays: none, zstd[,LEVEL] (1-22, default 3), "
                  "deflate[,LEVEL] (0-9, default 6); both after a byte shuffle")
      ->default_val("none");
  app_.add_flag("--no-provenance", no_provenance,
                "Do not append this run to the snapshot's provenance and history");
  app_.add_flag("--force", force, "Write binary output to a terminal, or replace the input file");
  add_allow_nonfinite_option();
}

void Tool::add_allow_nonfinite_option(CLI::App* on) {
  (on ? on : &app_)
      ->add_flag("--allow-nonfinite", allow_nonfinite,
                 "Accept NaN/Inf in keys and values and in the side data (window and probe "
                 "queries, attention statistics)");
}

void Tool::add_json_option() {
  app_.add_flag("--json", json, "Print one JSON object");
}

void Tool::add_device_option() {
  app_.add_option("--device", device, "Kernel backend: cpu, cuda or auto")
      ->default_val("cpu")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
}

kv::WriteOptions Tool::write_options(const std::string& input_path) const {
  kv::WriteOptions w;
  w.codec = kv::Codec::parse(codec);
  w.force = force;
  w.input_path = input_path;
  return w;
}

void Tool::check_output() const {
  kv::Codec::parse(codec);  // a bad --codec, before any work
  if (output == "-") {
    if (isatty(1) && !force)
      throw kv::Error(kv::Exit::usage,
                      "refusing to write a binary snapshot to a terminal; use -o FILE or a pipe "
                      "(or --force)");
    return;
  }
  std::string dir =
      output.find('/') == std::string::npos ? "." : output.substr(0, output.rfind('/'));
  if (dir.empty()) dir = "/";
  if (::access(dir.c_str(), W_OK) != 0)
    throw kv::Error(kv::Exit::cant_create, "cannot create '" + output + "': " + kv::errno_text());
}

void Tool::stamp(kv::Header& header) const {
  if (!no_provenance) kv::append_provenance(header, name_, argc_, argv_);
}

void Tool::progress(const std::string& what, int64_t done, int64_t total) const {
  if (quiet || !isatty(2)) return;
  std::fprintf(stderr, "\r%s: %s %lld/%lld", name_.c_str(), what.c_str(), (long long)done,
               (long long)total);
  std::fflush(stderr);
}

void Tool::progress_done() const {
  if (quiet || !isatty(2)) return;
  std::fprintf(stderr, "\r\033[K");
}

namespace {
// With KV_REPORT_PEAK_RSS set, a tool prints its peak resident memory (VmHWM) on stderr at exit,
// for memory benchmarks that run the tools as child processes.
void report_peak_rss(const std::string& name) {
  if (!std::getenv("KV_REPORT_PEAK_RSS")) return;
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return;
  char line[256];
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, "VmHWM:", 6) == 0) {
      long kib = std::strtol(line + 6, nullptr, 10);
      std::fprintf(stderr, "%s: peak_rss_bytes %lld\n", name.c_str(), (long long)kib * 1024);
    }
  std::fclose(f);
}
}  // namespace

std::string Tool::parse_error_text(const CLI::ParseError& e) const {
  // CLI11 says only "A subcommand is required" when the subcommand is misspelled: name the
  // word it did not know, and the subcommands there are.
  const std::vector<const CLI::App*> subs =
      app_.get_subcommands([](const CLI::App*) { return true; });
  if (subs.empty() || std::string(e.what()) != "A subcommand is required") return e.what();
  std::string names;
  for (const CLI::App* sub : subs) names += (names.empty() ? "" : ", ") + sub->get_name();
  // The first word that is neither an option nor the value of the option before it.
  auto takes_value = [&](const char* arg) {
    const CLI::Option* o = arg[0] == '-' ? app_.get_option_no_throw(arg) : nullptr;
    return o && o->get_expected_min() > 0;
  };
  for (int i = 1; i < argc_; ++i)
    if (argv_[i][0] != '-' && (i == 1 || !takes_value(argv_[i - 1])))
      return kv::str("'", argv_[i], "' is not a subcommand (", names, ")");
  return "a subcommand is required (" + names + ")";
}

int Tool::run(int argc, char** argv, const std::function<void()>& body) {
  argc_ = argc;
  argv_ = argv;
  try {
    app_.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app_.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app_.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app_.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << name_ << ": " << parse_error_text(e) << " (see " << name_ << " --help)\n";
    return int(kv::Exit::usage);
  }
  if (threads > 0) omp_set_num_threads(threads);
  try {
    body();
    // Text on stdout (tables, JSON, generated text) is buffered: a full disk or a closed pipe
    // shows only now, and must not pass for success.
    std::cout.flush();
    if (std::fflush(stdout) != 0 || std::ferror(stdout) || !std::cout)
      throw kv::Error(kv::Exit::io, "cannot write to stdout: " + kv::errno_text());
    report_peak_rss(name_);
    return 0;
  } catch (const kv::Error& e) {
    progress_done();
    std::cerr << name_ << ": " << e.what() << "\n";
    return int(e.code());
  } catch (const std::bad_alloc&) {
    progress_done();
    std::cerr << name_ << ": out of memory\n";
    return int(kv::Exit::software);
  } catch (const std::exception& e) {
    progress_done();
    std::cerr << name_ << ": internal error: " << e.what() << "\n";
    return int(kv::Exit::software);
  }
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.2f %s" : "%.0f %s", bytes, units[u]);
  return buf;
}

CLI::Validator real_in(double lo, double hi, Ends ends) {
  const bool open_low = ends == Ends::open || ends == Ends::open_low;
  const bool open_high = ends == Ends::open || ends == Ends::open_high;
  const std::string interval = kv::str(open_low ? "(" : "[", lo, ", ", hi, open_high ? ")" : "]");
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = double(std::strtold(text.c_str(), &end));  // as CLI11 reads a double
        if (text.empty() || end != text.c_str() + text.size())
          return "'" + text + "' is not a number";
        const bool inside = (open_low ? v > lo : v >= lo) && (open_high ? v < hi : v <= hi);
        return inside ? "" : text + " is outside " + interval;  // (NaN is inside nothing)
      },
      interval);
}

void refuse_ignored(const std::vector<OptionFor>& options) {
  for (const auto& [option, owner, used] : options)
    if (option->count() && !used)
      throw kv::Error(kv::Exit::usage,
                      option->get_name() + " is for " + owner + "; this run would ignore it");
}

}  // namespace kvt
