// A directory of page files with a manifest: where kv-offload's disk tier puts the pages it
// moves out of a snapshot (man/kv-offload.1, formats/kvsnap.md section 9, scheme "paged").
//
// Pages are content-addressed: a page's id is the SHA-256 (hex) of its bytes, so equal pages are
// stored once and a page read back is checked against its id. Each page file and the manifest
// are written to a temporary name and renamed into place, the manifest last (after the file
// system is synced), so a process killed mid-write leaves the previous manifest (or none) and
// never a torn one; files the manifest does not list are ignored.
//
// Layout: DIR/manifest.json and DIR/pages/<id>.raw or <id>.zst (one zstd frame).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace kv {

class PageStore {
 public:
  struct Entry {
    std::string file;    // relative to the store directory
    int64_t bytes = 0;   // page bytes
    int64_t stored = 0;  // file bytes
  };

  // Opens the store in `dir`, reading its manifest if there is one. With `writable`, checks that
  // the store can be written (or made): Error(Exit::cant_create) naming it otherwise; the
  // directories are made by the first put or commit, so a run refused before then leaves none.
  // A manifest that does not parse is Error(Exit::data), one that cannot be read Exit::no_input.
  PageStore(std::string dir, bool writable);

  // The store in `dir` opened read-only, shared: readers of a paged or external snapshot fetch
  // from it once per tensor of every layer, and a tiered cache's manifest lists ~10^5 pages, so
  // it is parsed once per process and again only when manifest.json is replaced (another inode,
  // size, modification or change time). Errors as the constructor's; thread-safe (one parse at a
  // time: readers wait for a store being parsed).
  static std::shared_ptr<const PageStore> open_for_reading(const std::string& dir);

  // Adds a page (zstd-compressed when asked) and returns its id; a page already stored is not
  // written again.
  std::string put(const void* data, size_t n, bool zstd);
  // The page's bytes; Error(Exit::data) naming the page when the manifest lacks it, its size is
  // not `expected_bytes` (when >= 0), its file is missing or of another size, or its content
  // does not hash to its id; Error(Exit::no_input) when its file cannot be read. Sizes are
  // checked before anything is allocated for them.
  std::vector<uint8_t> get(const std::string& id, int64_t expected_bytes = -1) const;
  // Syncs the page files, then writes the manifest (temporary file, fsync, rename).
  void commit();
  // Undoes this object's writes after a failed run: removes the page files it added, puts back
  // the manifest it found (or none) if it committed, and removes the directories it made. The
  // store is then as it was when opened. Never throws.
  void rollback() noexcept;

  const std::string& dir() const { return dir_; }
  // The ids put() returned since the store was opened (written now or already stored).
  const std::set<std::string>& put_ids() const { return put_ids_; }

  // The page store directory that `path` (a file about to be written) would land in, its
  // manifest or one of its page files, or "" if none: writing there would break the store and
  // every snapshot that references it. A store is a directory holding manifest.json and pages/.
  static std::string store_holding(const std::string& path);

  // Ids as snapshots hold them: 32 raw bytes, for the 64 hex digits of a SHA-256.
  static void append_id_bytes(const std::string& id, std::vector<uint8_t>& out);
  static std::string id_from_bytes(const uint8_t* bytes);
  const std::map<std::string, Entry>& entries() const { return entries_; }

 private:
  void make_directories();

  std::string dir_;
  std::map<std::string, Entry> entries_;
  // For rollback: what this object changed.
  bool had_manifest_ = false, committed_ = false, made_directories_ = false;
  std::string original_manifest_;
  std::vector<std::string> written_, created_;
  std::set<std::string> put_ids_;
};

}  // namespace kv
