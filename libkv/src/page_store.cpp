#include "kv/page_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

#include "kv/error.h"
#include "kv/file.h"
#include "kv/json.h"
#include "kv/sha256.h"
#include "kv/str.h"

namespace kv {
namespace {

constexpr const char* kFormat = "kvtk-page-store";

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(Exit::data, what + ": file '" + path + "' is missing");
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

PageStore::PageStore(std::string dir, bool writable) : dir_(std::move(dir)) {
  if (writable) {
    if (::mkdir(dir_.c_str(), 0777) != 0 && errno != EEXIST)
      throw Error(Exit::cant_create, str("cannot create page store '", dir_, "': ", errno_text()));
    const std::string pages = dir_ + "/pages";
    if (::mkdir(pages.c_str(), 0777) != 0 && errno != EEXIST)
      throw Error(Exit::cant_create, str("cannot create '", pages, "': ", errno_text()));
    if (::access(pages.c_str(), W_OK) != 0 || ::access(dir_.c_str(), W_OK) != 0)
      throw Error(Exit::cant_create, str("page store '", dir_, "' is not writable"));
  }
  const std::string manifest = dir_ + "/manifest.json";
  std::ifstream in(manifest, std::ios::binary);
  if (!in) {
    if (!writable) throw Error(Exit::data, str("page store '", dir_, "' has no manifest.json"));
    return;
  }
  std::stringstream text;
  text << in.rdbuf();
  try {
    const Json j = Json::parse(text.str());
    const Json* format = j.find("format");
    if (!format || !format->is_string() || format->string() != kFormat)
      throw Error(Exit::data, "not a kvtk page store manifest");
    const Json* version = j.find("version");
    if (!version || !version->is_number() || version->integer() != 1)
      throw Error(Exit::data, "manifest version is not 1 (this kvtk reads version 1)");
    const Json* pages = j.find("pages");
    if (!pages) throw Error(Exit::data, "no 'pages'");
    for (const Json& p : pages->as_array()) {
      Entry e;
      const Json *id = p.find("id"), *file = p.find("file"), *bytes = p.find("bytes"),
                 *stored = p.find("stored");
      if (!id || !file || !bytes || !stored)
        throw Error(Exit::data, "a page lacks id, file, bytes or stored");
      e.file = file->string();
      e.bytes = bytes->integer();
      e.stored = stored->integer();
      if (e.bytes < 0 || e.stored < 0) throw Error(Exit::data, "a page has a negative size");
      if (e.file.find("..") != std::string::npos || e.file.empty() || e.file[0] == '/')
        throw Error(Exit::data, str("page file '", e.file, "' is outside the store"));
      entries_[id->string()] = e;
    }
  } catch (const Error& e) {
    throw Error(Exit::data, str("'", manifest, "': ", e.what()));
  }
}

std::shared_ptr<const PageStore> PageStore::open_for_reading(const std::string& dir) {
  struct Opened {
    struct stat manifest;
    std::shared_ptr<const PageStore> store;
  };
  static std::mutex mutex;
  static std::map<std::string, Opened> opened;
  struct stat st {};
  const bool has_manifest = ::stat((dir + "/manifest.json").c_str(), &st) == 0;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = opened.find(dir); it != opened.end()) {
    const struct stat& was = it->second.manifest;
    if (has_manifest && was.st_dev == st.st_dev && was.st_ino == st.st_ino &&
        was.st_size == st.st_size && was.st_mtim.tv_sec == st.st_mtim.tv_sec &&
        was.st_mtim.tv_nsec == st.st_mtim.tv_nsec && was.st_ctim.tv_sec == st.st_ctim.tv_sec &&
        was.st_ctim.tv_nsec == st.st_ctim.tv_nsec)
      return it->second.store;
    opened.erase(it);
  }
  auto store = std::make_shared<const PageStore>(dir, false);  // throws as the constructor does
  if (has_manifest) opened[dir] = Opened{st, store};
  return store;
}

std::string PageStore::put(const void* data, size_t n, bool zstd) {
  const std::string id = sha256_hex(data, n);
  // Already stored, unless its file went missing or changed size (then it is written again).
  if (const auto it = entries_.find(id); it != entries_.end()) {
    struct stat st;
    const std::string path = dir_ + "/" + it->second.file;
    if (::stat(path.c_str(), &st) == 0 && int64_t(st.st_size) == it->second.stored) return id;
    entries_.erase(it);
  }
  Entry e;
  e.bytes = int64_t(n);
  e.file = "pages/" + id + (zstd ? ".zst" : ".raw");
  const std::string path = dir_ + "/" + e.file;
  if (zstd) {
    std::vector<uint8_t> out(ZSTD_compressBound(n));
    const size_t m = ZSTD_compress(out.data(), out.size(), data, n, 3);
    if (ZSTD_isError(m)) throw Error(Exit::software, str("zstd: ", ZSTD_getErrorName(m)));
    write_file_atomically(path, out.data(), m, false);
    e.stored = int64_t(m);
  } else {
    write_file_atomically(path, data, n, false);
    e.stored = int64_t(n);
  }
  entries_[id] = e;
  return id;
}

std::vector<uint8_t> PageStore::get(const std::string& id) const {
  const auto it = entries_.find(id);
  const std::string what = str("page store '", dir_, "': page ", id);
  if (it == entries_.end()) throw Error(Exit::data, what + " is not in the manifest");
  const std::string file = read_file(dir_ + "/" + it->second.file, what);
  if (int64_t(file.size()) != it->second.stored)
    throw Error(Exit::data, str(what, ": file has ", file.size(), " bytes, the manifest says ",
                                it->second.stored));
  std::vector<uint8_t> out(static_cast<size_t>(it->second.bytes));
  if (it->second.file.ends_with(".zst")) {
    const size_t m = ZSTD_decompress(out.data(), out.size(), file.data(), file.size());
    if (ZSTD_isError(m) || m != out.size())
      throw Error(Exit::data, what + ": not a zstd frame of its size");
  } else {
    if (it->second.stored != it->second.bytes)
      throw Error(Exit::data, str(what, ": a raw page of ", it->second.bytes, " bytes stored in ",
                                  it->second.stored));
    if (!out.empty()) std::memcpy(out.data(), file.data(), out.size());
  }
  if (sha256_hex(out.data(), out.size()) != id)
    throw Error(Exit::data, what + ": content does not match its id (corrupt page)");
  return out;
}

void PageStore::commit() {
  Json pages = Json::array();
  for (const auto& [id, e] : entries_) {
    Json p = Json::object();
    p.set("id", id).set("file", e.file).set("bytes", e.bytes).set("stored", e.stored);
    pages.push(std::move(p));
  }
  Json j = Json::object();
  j.set("format", kFormat).set("version", 1).set("pages", std::move(pages));
  const std::string text = j.dump() + "\n";
  // The page files reach the disk before the manifest that lists them.
  const int dir_fd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY);
  if (dir_fd < 0 || ::syncfs(dir_fd) != 0) {
    if (dir_fd >= 0) ::close(dir_fd);
    throw Error(Exit::io, str("cannot sync page store '", dir_, "': ", errno_text()));
  }
  ::close(dir_fd);
  write_file_atomically(dir_ + "/manifest.json", text.data(), text.size(), true);
}

void PageStore::append_id_bytes(const std::string& id, std::vector<uint8_t>& out) {
  auto nibble = [&](char c) -> uint8_t {
    if (c >= '0' && c <= '9') return uint8_t(c - '0');
    if (c >= 'a' && c <= 'f') return uint8_t(c - 'a' + 10);
    throw Error(Exit::software, "page id '" + id + "' is not lowercase hex");
  };
  if (id.size() != 64) throw Error(Exit::software, "page id '" + id + "' is not 64 hex digits");
  for (size_t i = 0; i < 64; i += 2) out.push_back(uint8_t(nibble(id[i]) << 4 | nibble(id[i + 1])));
}

std::string PageStore::id_from_bytes(const uint8_t* bytes) {
  static const char* hex = "0123456789abcdef";
  std::string id;
  for (int i = 0; i < 32; ++i) {
    id += hex[bytes[i] >> 4];
    id += hex[bytes[i] & 15];
  }
  return id;
}

}  // namespace kv
