// The frame every kv-* tool runs in: CLI11 parsing with the shared options of DESIGN.md
// section 4, "kv-tool: message" errors with sysexits codes, --version, threads, progress.
// Tools add their own options, then call run() with their body; the body throws kv::Error.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>

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
  std::string name_;
  CLI::App app_;
  int argc_ = 0;
  char** argv_ = nullptr;
};

// Human-readable byte counts: "1.00 GiB".
std::string human_bytes(double bytes);

}  // namespace kvt
