// Reading and writing kvsnap files (HDF5), one layer at a time.
//
// Paths: "-" means stdin/stdout. HDF5 needs a seekable file, so a pipe is held whole in memory:
// stdin is read into a buffer and opened as an HDF5 file image; stdout output is built with the
// core driver and written out by finish(). Named outputs are written to a temporary file beside
// the target and renamed by finish(), so a failure never leaves a partial file behind; outputs
// that are not regular files (/dev/null, FIFOs) are written directly, like stdout.
#pragma once
#include <memory>
#include <string>

#include "kv/snapshot.h"

namespace kv {

// Lossless HDF5 filter applied to the big datasets (k, v, side data), after a byte shuffle.
struct Codec {
  enum class Kind { none, zstd, deflate } kind = Kind::none;
  int level = 0;
  // "none", "zstd", "zstd,19", "deflate", "deflate,6"; throws Error(Exit::usage).
  static Codec parse(const std::string& spec);
  std::string str() const;
};

// The zstd filter id registered with The HDF Group, with the public plugin's parameters.
constexpr int kZstdFilterId = 32015;
// Registers the zstd filter with the HDF5 library of this process (idempotent).
void register_zstd_filter();

struct ReadOptions {
  bool allow_nonfinite = false;  // accept NaN/Inf in k and v
  // Also hand over each encoded k or v as stored (Layer::k_stored, v_stored; an external one as
  // fetched from its store; not a paged one, which reads back dense), so that a tool passing
  // layers through unchanged (kv-offload) writes them back byte for byte.
  bool keep_stored = false;
};

// Storage facts of one layer, read from metadata only.
struct LayerStorage {
  int64_t entries = 0;
  std::vector<int64_t> head_offsets;
  DType k_dtype = DType::f16, v_dtype = DType::f16;
  Encoding k_encoding, v_encoding;  // dense, or the scheme (k_dtype is then f32, as decoded)
  int64_t kv_bytes_stored = 0;      // k and v as stored in the file (after any codec)
  int64_t kv_bytes_logical = 0;     // k and v before the codec (dense values or encoded arrays)
  int64_t other_bytes_stored = 0;   // positions, offsets, mass, side data
  // k and v held in a page store rather than the file (kv-offload's disk tier): the rows of
  // paged tensors' external pages, external objects' bytes, as the store's manifest gives them.
  int64_t kv_bytes_in_store = 0;
  bool has_mass = false;
};

class SnapshotReader {
 public:
  explicit SnapshotReader(const std::string& path, ReadOptions options = {});
  ~SnapshotReader();
  SnapshotReader(const SnapshotReader&) = delete;
  SnapshotReader& operator=(const SnapshotReader&) = delete;

  const Header& header() const;
  int n_layers() const { return header().model.n_layers; }
  const std::string& path() const;
  int64_t file_bytes() const;      // size of the file or image
  std::string codec_name() const;  // codec of layer 0's k ("none" for contiguous)

  // Reads and validates layer l into `out`, reusing its buffers.
  void read_layer(int l, Layer& out);
  LayerStorage layer_storage(int l);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct WriteOptions {
  Codec codec;
  bool force = false;      // allow writing to a terminal, or over the input file
  std::string input_path;  // the input, to refuse overwriting it ("" if none)
};

class SnapshotWriter {
 public:
  // Validates the header and opens the output; layers must then be written in order 0..L-1.
  SnapshotWriter(const std::string& path, const Header& header, WriteOptions options = {});
  ~SnapshotWriter();  // without finish(): discards everything, leaves no file behind
  SnapshotWriter(const SnapshotWriter&) = delete;
  SnapshotWriter& operator=(const SnapshotWriter&) = delete;

  void write_layer(const Layer& layer);
  // The bytes of k and v written so far, before the codec (as kv_bytes_as_written counts them).
  int64_t kv_bytes_written() const;
  // Closes the file and makes it visible (rename, or write the image to stdout).
  void finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The bytes of a layer's k and v as SnapshotWriter would store them, before any codec: dense
// values in their dtype, or the arrays of their encoding (encoded here, as the writer does).
int64_t kv_bytes_as_written(const Header& header, const Layer& layer);

Snapshot read_snapshot(const std::string& path, ReadOptions options = {});
void write_snapshot(const std::string& path, const Snapshot& snap, WriteOptions options = {});

}  // namespace kv
