// libFuzzer target for what a reader takes from a page store (libkv/src/page_store.cpp,
// libkv/src/offload.cpp), all of it untrusted: the manifest, a page file, and an external
// object (an encoded tensor kv-offload moved whole), which is then decoded as the tensor it
// stands for. The first byte picks the part:
//   0: the rest is manifest.json, with one page file (pages/p.raw, pages/p.zst) holding the
//      same bytes; every page the manifest lists is fetched, as readers do, at its own size and
//      at a page's size;
//   1: the rest is an external object, parsed, then decoded as one of the encodings a tensor
//      of 2 KV heads x 16 entries x head_dim 8 may have (the second byte picks it).
// kv::Error is the expected way to refuse input; any crash, sanitizer report, hang, other
// exception or allocation beyond libFuzzer's limit is a bug.
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "kv/encoding.h"
#include "kv/error.h"
#include "kv/file.h"
#include "kv/offload.h"
#include "kv/page_store.h"

namespace {

const std::string& store_dir() {
  static const std::string dir = [] {
    char templ[] = "/tmp/kvtk-fuzz-store.XXXXXX";
    if (!::mkdtemp(templ)) std::abort();
    const std::string d = templ;
    if (::mkdir((d + "/pages").c_str(), 0777) != 0) std::abort();
    return d;
  }();
  return dir;
}

void fuzz_manifest(const uint8_t* data, size_t size) {
  const std::string& dir = store_dir();
  kv::write_file_atomically(dir + "/manifest.json", data, size);
  for (const char* name : {"/pages/p.raw", "/pages/p.zst"})
    kv::write_file_atomically(dir + name, data, size);
  try {
    const kv::PageStore store(dir, false);
    for (const auto& [id, entry] : store.entries()) {
      for (const int64_t expected : {int64_t(-1), int64_t(256)}) {
        try {
          (void)store.get(id, expected);
        } catch (const kv::Error&) {
        }
      }
    }
  } catch (const kv::Error&) {
  }
}

void fuzz_external(const uint8_t* data, size_t size) {
  if (size < 1) return;
  static const char* schemes[] = {"q8_0", "q4_0", "uniform", "kivi", "fp8", "svd", "kvquant"};
  const char* scheme = schemes[data[0] % (sizeof schemes / sizeof *schemes)];
  const char role = data[0] & 0x80 ? 'v' : 'k';
  kv::ModelInfo m;
  m.n_layers = 1;
  m.n_q_heads = 4;
  m.n_kv_heads = 2;
  m.head_dim = m.rope_dims = 8;
  const std::vector<int64_t> offsets = {0, 16, 32};
  std::vector<int32_t> positions(32);
  for (int i = 0; i < 32; ++i) positions[size_t(i)] = i % 16;
  const kv::RowLayout rows{m, offsets, positions};
  const std::vector<uint8_t> blob(data + 1, data + size);
  try {
    const kv::Encoded enc =
        kv::parse_external_object(blob, "fuzz", kv::default_encoding(scheme, role));
    std::vector<float> out(32 * 8);
    kv::decode(enc, rows, out.data());
  } catch (const kv::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  if (data[0] % 2 == 0)
    fuzz_manifest(data + 1, size - 1);
  else
    fuzz_external(data + 1, size - 1);
  return 0;
}
