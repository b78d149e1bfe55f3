// The frame every kv-* tool runs in: CLI11 parsing with the shared options of DESIGN.md
// section 4, "kv-tool: message" errors with sysexits codes, --version, threads, progress.
// Tools add their own options, then call run() with their body; the body throws kv::Error.
#pragma once
#include <CLI/CLI.hpp>
#include <cerrno>
#include <concepts>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <string>
#include <utility>

#include "kv/snapshot_io.h"

namespace kvt {

class Tool {
 public:
  Tool(std::string name, std::string description);

  CLI::App& app() { return app_; }
  const std::string& name() const { return name_; }

  // Positional INPUT, default "-" (stdin).
  void add_input(std::string* input);
  // -o, --codec, --no-provenance, --force, --allow-nonfinite: for tools that write snapshots.
  void add_output_options();
  // --json.
  void add_json_option();
  // --allow-nonfinite, on the tool or on one of its subcommands.
  void add_allow_nonfinite_option(CLI::App* on = nullptr);
  // --device cpu|cuda|auto.
  void add_device_option();

  // Parses argv and runs body; returns the process exit code.
  int run(int argc, char** argv, const std::function<void()>& body);

  // Values of the shared options.
  std::string output = "-";
  std::string codec = "none";
  std::string device = "cpu";
  int threads = 0;  // 0: OpenMP's default
  bool json = false;
  bool quiet = false;
  bool force = false;
  bool no_provenance = false;
  bool allow_nonfinite = false;

  kv::ReadOptions read_options() const { return {allow_nonfinite}; }
  kv::WriteOptions write_options(const std::string& input_path) const;
  // Checks early, before expensive work, that the output can be written: not a terminal without
  // --force, and a directory that exists and is writable. The writer checks again.
  void check_output() const;
  // Adds this run's provenance record unless --no-provenance.
  void stamp(kv::Header& header) const;

  // Progress on stderr, only when stderr is a terminal and not -q.
  void progress(const std::string& what, int64_t done, int64_t total) const;
  void progress_done() const;

 private:
  // A parse error's message, one line, in the tools' words where CLI11's say too little.
  std::string parse_error_text(const CLI::ParseError& e) const;

  std::string name_;
  CLI::App app_;
  int argc_ = 0;
  char** argv_ = nullptr;
};

// Human-readable byte counts: "1.00 GiB".
std::string human_bytes(double bytes);

// Checks of numeric options, instead of CLI::Range (which answers "Value abc not in range 0 to
// 1024" to a word, and lets CLI11 wrap -1 into an unsigned option). The text is read as CLI11
// then reads it (strtoll, strtoull, strtold: 0x10 is 16), and refused with one of
//   --threads: 'abc' is not an integer        --rope-theta: 'abc' is not a number
//   --threads: 2000 is outside [0, 1024]       --rope-theta: nan is outside (0, inf)
// Use with ->check(); --help shows the interval.
template <std::integral T>
CLI::Validator integer_in(T lo, T hi);
// Which ends of a real interval are open (excluded): [lo, hi], (lo, hi), (lo, hi], [lo, hi).
enum class Ends { closed, open, open_low, open_high };
CLI::Validator real_in(double lo, double hi, Ends ends = Ends::closed);

// An option that only some runs use: `option` is for `owner` ("--score snapkv"), and `used` says
// whether this run is one of those.
struct OptionFor {
  const CLI::Option* option;
  std::string owner;
  bool used;
};
// Throws Error(Exit::usage) for the first option given to a run that would ignore it:
// "--kernel is for --score snapkv; this run would ignore it".
void refuse_ignored(const std::vector<OptionFor>& options);

template <std::integral T>
CLI::Validator integer_in(T lo, T hi) {
  const std::string interval = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        // strtoull takes "-1" for 2^64 - 1: a minus sign goes to strtoll.
        const size_t first = text.find_first_not_of(" \t\n\v\f\r");
        const char* s = text.c_str();
        char* end = nullptr;
        errno = 0;
        bool inside;
        if (first != std::string::npos && text[first] == '-') {
          const long long v = std::strtoll(s, &end, 0);
          inside = errno != ERANGE && std::cmp_greater_equal(v, lo) && std::cmp_less_equal(v, hi);
        } else {
          const unsigned long long v = std::strtoull(s, &end, 0);
          inside = errno != ERANGE && std::cmp_greater_equal(v, lo) && std::cmp_less_equal(v, hi);
        }
        if (text.empty() || end != s + text.size()) return "'" + text + "' is not an integer";
        return inside ? "" : text + " is outside " + interval;
      },
      interval);
}

}  // namespace kvt
