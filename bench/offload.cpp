// kv-offload's costs on this machine:
//  1. the disk tier: writing and reading pages through the page store (one file per page, the
//     manifest last, content checked on read) against plain sequential I/O of the same bytes in
//     one file, in the same run; for pages of 16 and 256 tokens of an 8B head (4 and 64 KiB);
//  2. `simulate` on an 8B-shaped synthetic cache (llama3-8b: 32 layers, 8 KV heads, head_dim
//     128; 32768 tokens, 512 probe queries, synthesized layer by layer in memory), pages of 16,
//     budget 2048 tokens, Quest scores: its runtime, fetches only (--attention adds the
//     attention outputs and their error against the full cache, for the first layer).
//
//   bench-offload [--dir DIR] [--mib M] [--tokens T] [--probe P] [--layers L] [--attention]
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "kv/error.h"
#include "kv/offload.h"
#include "kv/page_store.h"
#include "kv/synth.h"

namespace {

void write_file(const std::string& path, const std::vector<uint8_t>& data) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || ::write(fd, data.data(), data.size()) != ssize_t(data.size()) || ::fsync(fd) != 0)
    throw kv::Error(kv::Exit::io, "cannot write " + path);
  ::close(fd);
}

std::vector<uint8_t> read_file(const std::string& path, size_t n) {
  std::vector<uint8_t> out(n);
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0 || ::read(fd, out.data(), n) != ssize_t(n))
    throw kv::Error(kv::Exit::io, "cannot read " + path);
  ::close(fd);
  return out;
}

void disk_tier(const std::string& dir, size_t total, size_t page_bytes) {
  std::vector<uint8_t> data(total);
  std::mt19937_64 rng(3);
  for (size_t i = 0; i + 8 <= total; i += 8) {
    const uint64_t r = rng();
    std::memcpy(data.data() + i, &r, 8);
  }
  const std::string store_dir = dir + "/kvtk-bench-offload-store";
  const std::string plain = dir + "/kvtk-bench-offload-plain.bin";
  std::filesystem::remove_all(store_dir);
  // Plain: one file, written sequentially and synced, then read back.
  double t0 = kvbench::now();
  write_file(plain, data);
  const double plain_write = kvbench::now() - t0;
  t0 = kvbench::now();
  const auto back = read_file(plain, total);
  const double plain_read = kvbench::now() - t0;
  // The store: one file per page, synced together, the manifest last.
  const size_t pages = total / page_bytes;
  std::vector<std::string> ids;
  t0 = kvbench::now();
  {
    kv::PageStore store(store_dir, true);
    for (size_t p = 0; p < pages; ++p)
      ids.push_back(store.put(data.data() + p * page_bytes, page_bytes, false));
    store.commit();
  }
  const double store_write = kvbench::now() - t0;
  t0 = kvbench::now();
  const kv::PageStore store(store_dir, false);
  size_t got = 0;
  for (const std::string& id : ids) got += store.get(id).size();
  const double store_read = kvbench::now() - t0;
  // The same files without the content check, to show what hashing costs.
  t0 = kvbench::now();
  for (const std::string& id : ids)
    got += read_file(store_dir + "/pages/" + id + ".raw", page_bytes).size();
  const double files_read = kvbench::now() - t0;
  const double gb = double(total) / 1e9;
  std::printf(
      "pages of %5zu B x %zu (%.0f MiB): write store %.3f GB/s, plain %.3f GB/s (ratio %.2f); "
      "read store %.3f GB/s (files alone %.3f), plain %.3f GB/s (ratio %.2f)\n",
      page_bytes, pages, double(total) / (1 << 20), gb / store_write, gb / plain_write,
      plain_write / store_write, gb / store_read, gb / files_read, gb / plain_read,
      plain_read / store_read);
  if (back.size() + got == 0) std::printf("(nothing read)\n");
  std::filesystem::remove_all(store_dir);
  std::filesystem::remove(plain);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = std::filesystem::temp_directory_path();
  size_t mib = 256;
  int64_t tokens = 32768;
  int probe = 512, layers = 32;
  bool attention = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool more = i + 1 < argc;
    if (a == "--dir" && more)
      dir = argv[++i];
    else if (a == "--mib" && more)
      mib = size_t(std::atoll(argv[++i]));
    else if (a == "--tokens" && more)
      tokens = std::atoll(argv[++i]);
    else if (a == "--probe" && more)
      probe = std::atoi(argv[++i]);
    else if (a == "--layers" && more)
      layers = std::atoi(argv[++i]);
    else if (a == "--attention")
      attention = true;
    else {
      std::fprintf(stderr,
                   "usage: bench-offload [--dir DIR] [--mib M] [--tokens T] [--probe P] "
                   "[--layers L] [--attention]\n");
      return 64;
    }
  }
  try {
    std::printf("bench-offload: disk tier in %s\n", dir.c_str());
    disk_tier(dir, mib << 20, 16 * 128 * 2);
    disk_tier(dir, mib << 20, 256 * 128 * 2);

    kv::SynthSpec spec;
    spec.model = kv::model_preset("llama3-8b");
    spec.model.n_layers = layers;
    spec.n_tokens = tokens;
    spec.probe = probe;
    kv::Synthesizer synth(spec);
    kv::SimulateOptions o;
    o.page_size = 16;
    o.budget = 2048;
    std::printf(
        "\nsimulate: llama3-8b shape, %d layers, %lld tokens, %d probe steps, pages of 16, "
        "budget 2048, quest, pcie5\n",
        layers, (long long)tokens, probe);
    double synth_s = 0, sim_s = 0, error_s = 0;
    kv::SimulateStats total, with_error;
    kv::Layer layer;
    std::vector<kv::SimulateStats> steps;
    for (int l = 0; l < layers; ++l) {
      double t0 = kvbench::now();
      synth.layer(l, layer);
      synth_s += kvbench::now() - t0;
      o.attention_error = false;
      t0 = kvbench::now();
      total += kv::simulate_layer(synth.header(), layer, o, steps);
      sim_s += kvbench::now() - t0;
      if (attention && l == 0) {
        o.attention_error = true;
        t0 = kvbench::now();
        with_error = kv::simulate_layer(synth.header(), layer, o, steps);
        error_s = kvbench::now() - t0;
      }
    }
    std::printf(
        "runtime %.1f s (synthesis %.1f s apart): %lld pages selected, %lld fetched "
        "(hit rate %.3f), %.1f MiB moved, modelled stall %.1f ms over %d steps\n",
        sim_s, synth_s, (long long)total.pages_selected, (long long)total.pages_fetched,
        double(total.pages_hit) / double(total.pages_selected), total.bytes_fetched / (1 << 20),
        total.stall_seconds * 1e3, probe);
    if (attention)
      std::printf("layer 0 with the attention error: %.1f s, rel. error %.4f\n", error_s,
                  with_error.rel_error / double(with_error.rows));
  } catch (const kv::Error& e) {
    std::fprintf(stderr, "bench-offload: %s\n", e.what());
    return int(e.code());
  }
  return 0;
}
