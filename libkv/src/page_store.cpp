#include "kv/page_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "kv/error.h"
#include "kv/file.h"
#include "kv/json.h"
#include "kv/sha256.h"
#include "kv/str.h"

namespace kv {
namespace {

constexpr const char* kFormat = "kvtk-page-store";

// The whole file at `path` into `out` (a std::string or a byte vector): false when it does not
// exist, Error(Exit::no_input) naming the reason when it cannot be read (a permission, a
// directory), Error(Exit::data) when `size` >= 0 (the manifest's) and the file has another.
template <class Bytes>
bool read_file(const std::string& path, const std::string& what, int64_t size, Bytes& out) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    if (errno == ENOENT) return false;
    throw Error(Exit::no_input, str(what, ": cannot read '", path, "': ", errno_text()));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(Exit::no_input, str(what, ": '", path, "' is not a regular file"));
  }
  // Checked before reading: a file the manifest does not describe is not read into memory.
  if (size >= 0 && int64_t(st.st_size) != size) {
    ::close(fd);
    throw Error(Exit::data,
                str(what, ": file has ", st.st_size, " bytes, the manifest says ", size));
  }
  out.resize(size_t(st.st_size));
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t r = ::read(fd, reinterpret_cast<char*>(out.data()) + done, out.size() - done);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const std::string why = r < 0 ? errno_text() : "it shrank while being read";
      ::close(fd);
      throw Error(Exit::io, str(what, ": cannot read '", path, "': ", why));
    }
    done += size_t(r);
  }
  ::close(fd);
  return true;
}

}  // namespace

PageStore::PageStore(std::string dir, bool writable) : dir_(std::move(dir)) {
  const std::string manifest = dir_ + "/manifest.json";
  struct stat st {};
  if (writable) {
    // Nothing is created yet (put and commit make the directories), so a run refused before
    // its first page leaves no store behind; but a store that cannot be made is an error now.
    const bool exists = ::stat(dir_.c_str(), &st) == 0;
    if (exists && !S_ISDIR(st.st_mode))
      throw Error(Exit::cant_create, str("page store '", dir_, "' is not a directory"));
    if (!exists) {  // made later: its parent must be a writable directory now
      std::filesystem::path normal = std::filesystem::path(dir_).lexically_normal();
      if (!normal.has_filename()) normal = normal.parent_path();  // "store/"
      const std::string parent = normal.has_parent_path() ? normal.parent_path().string() : ".";
      const std::string what = str("cannot create page store '", dir_, "': ");
      if (::stat(parent.c_str(), &st) != 0) throw Error(Exit::cant_create, what + errno_text());
      if (!S_ISDIR(st.st_mode)) throw Error(Exit::cant_create, what + std::strerror(ENOTDIR));
      if (::access(parent.c_str(), W_OK) != 0) throw Error(Exit::cant_create, what + errno_text());
    } else if (::access(dir_.c_str(), W_OK) != 0 ||
               (::stat((dir_ + "/pages").c_str(), &st) == 0 &&
                (!S_ISDIR(st.st_mode) || ::access((dir_ + "/pages").c_str(), W_OK) != 0))) {
      throw Error(Exit::cant_create, str("page store '", dir_, "' is not writable"));
    }
  }
  std::string text;
  if (!read_file(manifest, str("page store '", dir_, "'"), -1, text)) {
    if (!writable) throw Error(Exit::data, str("page store '", dir_, "' has no manifest.json"));
    return;
  }
  had_manifest_ = true;
  original_manifest_ = text;
  try {
    const Json j = Json::parse(text);
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
  put_ids_.insert(id);
  // Already stored, unless its file went missing or changed size (then it is written again).
  if (const auto it = entries_.find(id); it != entries_.end()) {
    struct stat st;
    const std::string path = dir_ + "/" + it->second.file;
    if (::stat(path.c_str(), &st) == 0 && int64_t(st.st_size) == it->second.stored) return id;
    entries_.erase(it);
  }
  make_directories();
  Entry e;
  e.bytes = int64_t(n);
  e.file = "pages/" + id + (zstd ? ".zst" : ".raw");
  const std::string path = dir_ + "/" + e.file;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) written_.push_back(path);  // new: rollback removes it
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

std::vector<uint8_t> PageStore::get(const std::string& id, int64_t expected_bytes) const {
  const auto it = entries_.find(id);
  const std::string what = str("page store '", dir_, "': page ", id);
  if (it == entries_.end()) throw Error(Exit::data, what + " is not in the manifest");
  const Entry& e = it->second;
  // Every size is checked before memory is taken for it: an edited manifest or a crafted file
  // must not make a reader allocate what it says.
  if (expected_bytes >= 0 && e.bytes != expected_bytes)
    throw Error(Exit::data,
                str(what, " holds ", e.bytes, " bytes where ", expected_bytes, " are needed"));
  const bool zstd = e.file.ends_with(".zst");
  if (!zstd && e.stored != e.bytes)
    throw Error(Exit::data, str(what, ": a raw page of ", e.bytes, " bytes stored in ", e.stored));
  std::vector<uint8_t> file;  // a raw page is its own content
  if (!read_file(dir_ + "/" + e.file, what, e.stored, file))
    throw Error(Exit::data, str(what, ": file '", dir_, "/", e.file, "' is missing"));
  std::vector<uint8_t> out;
  if (!zstd) {
    out = std::move(file);
  } else {
    const unsigned long long size = ZSTD_getFrameContentSize(file.data(), file.size());
    if (size != static_cast<unsigned long long>(e.bytes) ||
        ZSTD_findFrameCompressedSize(file.data(), file.size()) != file.size())
      throw Error(Exit::data, what + ": not a zstd frame of its size");
    out.resize(static_cast<size_t>(e.bytes));
    const size_t m = ZSTD_decompress(out.data(), out.size(), file.data(), file.size());
    if (ZSTD_isError(m) || m != out.size())
      throw Error(Exit::data, what + ": not a zstd frame of its size");
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
  make_directories();
  // The page files reach the disk before the manifest that lists them.
  const int dir_fd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY);
  if (dir_fd < 0 || ::syncfs(dir_fd) != 0) {
    if (dir_fd >= 0) ::close(dir_fd);
    throw Error(Exit::io, str("cannot sync page store '", dir_, "': ", errno_text()));
  }
  ::close(dir_fd);
  write_file_atomically(dir_ + "/manifest.json", text.data(), text.size(), true);
  committed_ = true;
}

void PageStore::make_directories() {
  if (made_directories_) return;  // (put calls it for every page)
  for (const std::string& d : {dir_, dir_ + "/pages"}) {
    if (::mkdir(d.c_str(), 0777) == 0)
      created_.push_back(d);
    else if (errno != EEXIST)
      throw Error(Exit::cant_create, str("cannot create '", d, "': ", errno_text()));
  }
  made_directories_ = true;
}

void PageStore::rollback() noexcept {
  for (const std::string& path : written_) ::unlink(path.c_str());
  written_.clear();
  if (committed_) {
    try {
      if (had_manifest_)
        write_file_atomically(dir_ + "/manifest.json", original_manifest_.data(),
                              original_manifest_.size(), true);
      else
        ::unlink((dir_ + "/manifest.json").c_str());
    } catch (const Error&) {  // best effort: the run fails with its own error anyway
    }
    committed_ = false;
  }
  for (auto d = created_.rbegin(); d != created_.rend(); ++d) ::rmdir(d->c_str());
  created_.clear();
}

std::string PageStore::store_holding(const std::string& path) {
  if (path.empty() || path == "-") return "";
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path parent = fs::weakly_canonical(fs::absolute(path, ec), ec).parent_path();
  if (ec) return "";
  auto is_store = [&](const fs::path& d) {
    return fs::is_regular_file(d / "manifest.json", ec) && fs::is_directory(d / "pages", ec);
  };
  if (is_store(parent)) return parent.string();
  if (parent.filename() == "pages" && is_store(parent.parent_path()))
    return parent.parent_path().string();
  return "";
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
