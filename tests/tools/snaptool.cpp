// Test-side helper over libkv, for the CLI tests:
//   snaptool copy [--codec C] IN OUT   stream a snapshot through the reader and writer unchanged
//   snaptool digest IN                 FNV-1a digest of everything but provenance and history
//   snaptool dump-k IN LAYER FILE      layer's keys as raw little-endian f32
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "kv/error.h"
#include "kv/snapshot_io.h"

namespace {

struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void add(const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  template <class T>
  void add(const std::vector<T>& v) {
    uint64_t n = v.size();
    add(&n, 8);
    add(v.data(), v.size() * sizeof(T));
  }
  void add(const std::string& s) { add(std::vector<char>(s.begin(), s.end())); }
  void add(const kv::Tensor& t) {
    int64_t shape[3] = {int64_t(t.dtype()), t.rows(), t.cols()};
    add(shape, sizeof shape);
    add(t.data(), t.bytes());
  }
};

int run(int argc, char** argv) {
  std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "copy" && (argc == 4 || argc == 6)) {
    kv::WriteOptions w;
    int a = 2;
    if (argc == 6 && std::strcmp(argv[2], "--codec") == 0) {
      w.codec = kv::Codec::parse(argv[3]);
      a = 4;
    }
    kv::SnapshotReader r(argv[a]);
    kv::SnapshotWriter wr(argv[a + 1], r.header(), w);
    kv::Layer layer;
    for (int l = 0; l < r.n_layers(); ++l) {
      r.read_layer(l, layer);
      wr.write_layer(layer);
    }
    wr.finish();
    return 0;
  }
  if (cmd == "digest" && argc == 3) {
    kv::SnapshotReader r(argv[2]);
    const kv::Header& h = r.header();
    Fnv f;
    const kv::ModelInfo& m = h.model;
    f.add(m.arch + m.name + m.file_sha256 + m.rope_style + m.key_rope);
    int64_t ints[7] = {m.n_layers, m.n_q_heads, m.n_kv_heads, m.head_dim, m.context_length, m.rope_dims, h.n_tokens};
    f.add(ints, sizeof ints);
    f.add(&m.rope_theta, 8);
    f.add(h.tokens);
    f.add(h.text);
    f.add(h.window_positions);
    f.add(h.probe_tokens);
    f.add(h.probe_positions);
    f.add(h.probe_logits);
    kv::Layer layer;
    for (int l = 0; l < r.n_layers(); ++l) {
      r.read_layer(l, layer);
      f.add(layer.positions);
      f.add(layer.head_offsets);
      f.add(layer.mass);
      for (const kv::Tensor* t : {&layer.k, &layer.v, &layer.window_q, &layer.attn_acc, &layer.attn_last, &layer.probe_q})
        f.add(*t);
    }
    std::printf("%016llx\n", (unsigned long long)f.h);
    return 0;
  }
  if (cmd == "dump-k" && argc == 5) {
    kv::SnapshotReader r(argv[2]);
    kv::Layer layer;
    r.read_layer(std::stoi(argv[3]), layer);
    std::vector<float> k = layer.k.to_f32();
    FILE* out = std::fopen(argv[4], "wb");
    if (!out || std::fwrite(k.data(), 4, k.size(), out) != k.size()) return 74;
    std::fclose(out);
    return 0;
  }
  std::cerr << "usage: snaptool copy [--codec C] IN OUT | digest IN | dump-k IN LAYER FILE\n";
  return 64;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const kv::Error& e) {
    std::cerr << "snaptool: " << e.what() << "\n";
    return int(e.code());
  }
}
