#include "kv/snapshot_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "h5.h"
#include "kv/str.h"
#include "zstd_filter.h"

namespace kv {

using h5::Handle;

// ---------------------------------------------------------------------------------------------
// Codecs

Codec Codec::parse(const std::string& spec) {
  Codec c;
  std::string name = spec.substr(0, spec.find(','));
  bool has_level = spec.find(',') != std::string::npos;
  int level = 0;
  if (has_level) {
    std::string lv = spec.substr(spec.find(',') + 1);
    char* end = nullptr;
    long v = std::strtol(lv.c_str(), &end, 10);
    if (lv.empty() || *end) throw Error(Exit::usage, "codec level '" + lv + "' is not an integer");
    level = int(v);
  }
  if (name == "none" && !has_level) {
    c.kind = Kind::none;
  } else if (name == "zstd") {
    c.kind = Kind::zstd;
    c.level = has_level ? level : 3;
    if (c.level < 1 || c.level > 22) throw Error(Exit::usage, "zstd level must be 1..22");
  } else if (name == "deflate") {
    c.kind = Kind::deflate;
    c.level = has_level ? level : 6;
    if (c.level < 0 || c.level > 9) throw Error(Exit::usage, "deflate level must be 0..9");
  } else {
    throw Error(Exit::usage,
                "unknown codec '" + spec + "' (expected none, zstd[,LEVEL] or deflate[,LEVEL])");
  }
  return c;
}

std::string Codec::str() const {
  switch (kind) {
    case Kind::none: return "none";
    case Kind::zstd: return "zstd," + std::to_string(level);
    case Kind::deflate: return "deflate," + std::to_string(level);
  }
  return "?";
}

void register_zstd_filter() {
  static const bool ok = H5Zregister(&kv_zstd_filter_class) >= 0;
  if (!ok) throw Error(Exit::software, "cannot register the zstd HDF5 filter");
}

namespace {

void init_hdf5() {
  h5::silence_errors();
  register_zstd_filter();
}

std::string layer_name(int l) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%03d", l);
  return buf;
}

constexpr size_t kChunkBytes = size_t(1) << 20;  // DESIGN: chunks of 256 KiB to 4 MiB

// Writes an n-D dataset (dims.size() in 1..3) from memory laid out as `type`, with the codec.
void write_dataset(hid_t loc, const std::string& name, hid_t type, std::vector<hsize_t> dims,
                   const void* data, const Codec& codec) {
  const std::string what = "cannot write dataset '" + name + "'";
  Handle space(h5::check(H5Screate_simple(int(dims.size()), dims.data(), nullptr), Exit::io, what),
               H5Sclose);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_obj_track_times(dcpl, false);  // identical inputs give byte-identical files
  hsize_t n = 1;
  for (hsize_t d : dims) n *= d;
  if (codec.kind != Codec::Kind::none && n > 0) {
    // Chunks span whole rows (the leading dimension is split), about kChunkBytes each.
    size_t row_bytes = H5Tget_size(type);
    for (size_t i = 1; i < dims.size(); ++i) row_bytes *= dims[i];
    std::vector<hsize_t> chunk = dims;
    chunk[0] = std::clamp<hsize_t>(kChunkBytes / std::max<size_t>(row_bytes, 1), 1, dims[0]);
    H5Pset_chunk(dcpl, int(chunk.size()), chunk.data());
    H5Pset_shuffle(dcpl);
    if (codec.kind == Codec::Kind::zstd) {
      unsigned level = unsigned(codec.level);
      h5::check(H5Pset_filter(dcpl, kZstdFilterId, H5Z_FLAG_MANDATORY, 1, &level), Exit::software,
                "cannot set the zstd filter");
    } else {
      H5Pset_deflate(dcpl, unsigned(codec.level));
    }
  }
  Handle ds(h5::check(H5Dcreate2(loc, name.c_str(), type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT),
                      Exit::io, what),
            H5Dclose);
  if (n > 0) h5::check(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), Exit::io, what);
}

void write_tensor(hid_t loc, const std::string& name, const Tensor& t, std::vector<hsize_t> dims,
                  const Codec& codec) {
  write_dataset(loc, name, h5::file_type(t.dtype()), std::move(dims), t.data(), codec);
}

template <class T>
hid_t native_type();
template <>
hid_t native_type<int32_t>() { return H5T_NATIVE_INT32; }
template <>
hid_t native_type<int64_t>() { return H5T_NATIVE_INT64; }
template <>
hid_t native_type<float>() { return H5T_NATIVE_FLOAT; }

template <class T>
void write_vector(hid_t loc, const std::string& name, const std::vector<T>& v,
                  const Codec& codec) {
  write_dataset(loc, name, native_type<T>(), {hsize_t(v.size())}, v.data(), codec);
}

void write_string_dataset(hid_t loc, const std::string& name, const std::string& value) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, value.size() + 1);
  H5Tset_strpad(type, H5T_STR_NULLTERM);
  H5Tset_cset(type, H5T_CSET_UTF8);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle ds(h5::check(H5Dcreate2(loc, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT,
                                 H5P_DEFAULT),
                      Exit::io, "cannot write '" + name + "'"),
            H5Dclose);
  h5::check(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, value.c_str()), Exit::io,
            "cannot write '" + name + "'");
}

Handle create_group(hid_t loc, const std::string& name) {
  return Handle(h5::check(H5Gcreate2(loc, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                          Exit::io, "cannot create group '" + name + "'"),
                H5Gclose);
}

// --- reading -----------------------------------------------------------------------------------

Handle open_dataset(hid_t loc, const std::string& name, const std::string& where) {
  if (!h5::exists(loc, name)) throw Error(Exit::data, where + " has no '" + name + "'");
  H5O_info_t info;
  if (H5Oget_info_by_name(loc, name.c_str(), &info, H5P_DEFAULT) < 0 ||
      info.type != H5O_TYPE_DATASET) {
    Handle g(H5Gopen2(loc, name.c_str(), H5P_DEFAULT), H5Gclose);
    if (g.valid() && h5::has_attr(g, "scheme"))
      throw Error(Exit::data, where + ": '" + name + "' uses encoding '" +
                                  h5::read_attr_string(g, "scheme", where) +
                                  "', which this kvtk cannot decode");
    throw Error(Exit::data, where + ": '" + name + "' is not a dataset");
  }
  return Handle(h5::check(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), Exit::data,
                          where + ": cannot open '" + name + "'"),
                H5Dclose);
}

std::vector<hsize_t> dataset_dims(hid_t ds) {
  Handle space(H5Dget_space(ds), H5Sclose);
  int rank = H5Sget_simple_extent_ndims(space);
  std::vector<hsize_t> dims(std::max(rank, 0));
  if (rank > 0) H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  return dims;
}

std::string corrupt(const std::string& where, const std::string& name) {
  return "cannot read '" + name + "' of " + where + ": file truncated or corrupt";
}

template <class T>
std::vector<T> read_vector(hid_t loc, const std::string& name, const std::string& where) {
  Handle ds = open_dataset(loc, name, where);
  auto dims = dataset_dims(ds);
  if (dims.size() != 1) throw Error(Exit::data, where + ": '" + name + "' is not 1-D");
  Handle type(H5Dget_type(ds), H5Tclose);
  auto cls = H5Tget_class(type);
  bool want_float = std::is_floating_point_v<T>;
  if (want_float ? cls != H5T_FLOAT : cls != H5T_INTEGER)
    throw Error(Exit::data, where + ": '" + name + "' has the wrong element type");
  std::vector<T> v(dims[0]);
  if (!v.empty())
    h5::check(H5Dread(ds, native_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), Exit::data,
              corrupt(where, name));
  return v;
}

// Reads a float dataset of rank >= 1 into t as [product of leading dims, last dim], in its
// stored dtype (memory type = file type: HDF5 converts nothing). `lead` is the expected
// leading dims (ignored when empty).
void read_tensor(hid_t loc, const std::string& name, const std::string& where, Tensor& t,
                 const std::vector<hsize_t>& lead = {}) {
  Handle ds = open_dataset(loc, name, where);
  auto dims = dataset_dims(ds);
  if (dims.size() < 2)
    throw Error(Exit::data, str(where, ": '", name, "' has rank ", dims.size(), ", expected 2+"));
  if (!lead.empty() && !std::equal(lead.begin(), lead.end(), dims.begin(), dims.end() - 1))
    throw Error(Exit::data, str(where, ": '", name, "' has unexpected leading dimensions"));
  Handle type(H5Dget_type(ds), H5Tclose);
  DType dt = h5::dtype_of(type, where + ": '" + name + "'");
  hsize_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  t.resize(dt, int64_t(rows), int64_t(dims.back()));
  if (t.size())
    h5::check(H5Dread(ds, h5::file_type(dt), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data()),
              Exit::data, corrupt(where, name));
}

std::string read_string_dataset(hid_t loc, const std::string& name, const std::string& where) {
  Handle ds = open_dataset(loc, name, where);
  Handle type(H5Dget_type(ds), H5Tclose);
  Handle space(H5Dget_space(ds), H5Sclose);
  if (H5Tget_class(type) != H5T_STRING || H5Sget_simple_extent_npoints(space) != 1)
    throw Error(Exit::data, where + ": '" + name + "' is not a single string");
  std::string out;
  if (H5Tis_variable_str(type) > 0) {  // as h5py writes str by default
    char* p = nullptr;
    Handle mem(H5Tget_native_type(type, H5T_DIR_ASCEND), H5Tclose);
    h5::check(H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, &p), Exit::data, corrupt(where, name));
    if (p) out = p;
    H5free_memory(p);
    return out;
  }
  out.assign(H5Tget_size(type), '\0');
  h5::check(H5Dread(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()), Exit::data,
            corrupt(where, name));
  out.resize(std::min(out.size(), out.find('\0')));
  return out;
}

int64_t storage_size(hid_t loc, const std::string& name) {
  if (!h5::exists(loc, name)) return 0;
  Handle ds(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), H5Dclose);
  return ds.valid() ? int64_t(H5Dget_storage_size(ds)) : 0;
}

bool has_hdf5_signature(const unsigned char* p, size_t n) {
  static const unsigned char sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
  for (size_t off = 0; off + 8 <= n; off = off ? off * 2 : 512)  // superblock at 0, 512, 1024...
    if (std::memcmp(p + off, sig, 8) == 0) return true;
  return false;
}

// Reads all of fd into a malloc'd buffer (realloc of large blocks is mremap, not a copy).
struct MallocBuffer {
  unsigned char* data = nullptr;
  size_t size = 0;
  ~MallocBuffer() { std::free(data); }
};

void slurp(int fd, MallocBuffer& buf, const std::string& name) {
  size_t cap = size_t(1) << 20;
  buf.data = static_cast<unsigned char*>(std::malloc(cap));
  for (;;) {
    if (buf.size == cap) {
      cap *= 2;
      auto* grown = static_cast<unsigned char*>(std::realloc(buf.data, cap));
      if (!grown) throw Error(Exit::io, "out of memory reading " + name);
      buf.data = grown;
    }
    ssize_t got = ::read(fd, buf.data + buf.size, cap - buf.size);
    if (got == 0) break;
    if (got < 0) {
      if (errno == EINTR) continue;
      throw Error(Exit::io, "cannot read " + name + ": " + errno_text());
    }
    buf.size += size_t(got);
  }
}

// Opens a read-only HDF5 file on an in-memory image without copying it: the core driver's
// image callbacks hand out `image` itself and never free it (the caller keeps it alive longer
// than the file). H5LTopen_file_image does the same but leaks its bookkeeping in HDF5 1.10.
void* image_malloc(size_t, H5FD_file_image_op_t, void* udata) {
  return static_cast<MallocBuffer*>(udata)->data;
}
void* image_memcpy(void* dest, const void* src, size_t size, H5FD_file_image_op_t, void*) {
  if (dest != src) std::memcpy(dest, src, size);
  return dest;
}
void* image_realloc(void*, size_t, H5FD_file_image_op_t, void*) { return nullptr; }  // read-only
herr_t image_free(void*, H5FD_file_image_op_t, void*) { return 0; }
void* udata_copy(void* udata) { return udata; }
herr_t udata_free(void*) { return 0; }

Handle open_image_readonly(MallocBuffer& image) {
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5FD_file_image_callbacks_t callbacks = {image_malloc, image_memcpy, image_realloc, image_free,
                                           udata_copy,   udata_free,   &image};
  if (H5Pset_fapl_core(fapl, 1 << 20, false) < 0 ||
      H5Pset_file_image_callbacks(fapl, &callbacks) < 0 ||
      H5Pset_file_image(fapl, image.data, image.size) < 0)
    return Handle();
  return Handle(H5Fopen("kvsnap-image", H5F_ACC_RDONLY, fapl), H5Fclose);
}

void write_all(int fd, const void* data, size_t n, const std::string& name) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (n) {
    ssize_t put = ::write(fd, p, n);
    if (put < 0) {
      if (errno == EINTR) continue;
      throw Error(Exit::io, "cannot write " + name + ": " + errno_text());
    }
    p += put;
    n -= size_t(put);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Reader

struct SnapshotReader::Impl {
  std::string path;
  std::string where;  // "'path'" for messages
  ReadOptions options;
  MallocBuffer image;  // whole file when read from a pipe
  int64_t bytes = 0;
  Handle file, layers;
  Header header;

  void open();
  void read_header();
};

void SnapshotReader::Impl::open() {
  const bool from_stdin = path == "-";
  where = from_stdin ? std::string("stdin") : "'" + path + "'";
  struct stat st {};
  bool regular = false;
  if (from_stdin) {
    if (isatty(0))
      throw Error(Exit::usage,
                  "refusing to read a snapshot from a terminal; give a FILE or pipe one in");
  } else {
    if (::stat(path.c_str(), &st) != 0)
      throw Error(Exit::no_input, "cannot open " + where + ": " + errno_text());
    if (S_ISDIR(st.st_mode)) throw Error(Exit::no_input, "cannot open " + where + ": Is a directory");
    if (::access(path.c_str(), R_OK) != 0)
      throw Error(Exit::no_input, "cannot open " + where + ": " + errno_text());
    regular = S_ISREG(st.st_mode);
  }
  const std::string not_hdf5 = where + " is not an HDF5 file (expected a kvsnap snapshot)";
  const std::string broken = where + " is truncated or corrupt (HDF5 cannot open it)";
  if (regular) {
    bytes = st.st_size;
    if (H5Fis_hdf5(path.c_str()) <= 0) {
      unsigned char head[8] = {};
      int fd = ::open(path.c_str(), O_RDONLY);
      ssize_t got = fd >= 0 ? ::read(fd, head, 8) : 0;
      if (fd >= 0) ::close(fd);
      // A valid signature that HDF5 rejects means the rest of the file is damaged.
      throw Error(Exit::data, got == 8 && has_hdf5_signature(head, 8) ? broken : not_hdf5);
    }
    file = Handle(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  } else {
    // A pipe (stdin, or a FIFO such as <(...)): HDF5 needs random access, so hold it in memory.
    int fd = from_stdin ? 0 : ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw Error(Exit::no_input, "cannot open " + where + ": " + errno_text());
    slurp(fd, image, where);
    if (!from_stdin) ::close(fd);
    bytes = int64_t(image.size);
    if (image.size == 0) throw Error(Exit::data, where + " is empty (expected a kvsnap snapshot)");
    if (!has_hdf5_signature(image.data, image.size)) throw Error(Exit::data, not_hdf5);
    file = open_image_readonly(image);
  }
  if (!file.valid()) throw Error(Exit::data, broken);
  read_header();
}

void SnapshotReader::Impl::read_header() {
  hid_t f = file;
  if (!h5::has_attr(f, "format"))
    throw Error(Exit::data, where + " is HDF5 but not a kvsnap snapshot (no 'format' attribute)");
  std::string format = h5::read_attr_string(f, "format", where);
  if (format != "kvsnap")
    throw Error(Exit::data, where + " is HDF5 but not a kvsnap snapshot (format '" + format + "')");
  auto version = h5::read_attr_ints(f, "format_version", where);
  if (version.size() != 2) throw Error(Exit::data, where + ": format_version must be [major, minor]");
  Header& h = header;
  h.format_major = version[0];
  h.format_minor = version[1];
  if (h.format_major != kFormatMajor)
    throw Error(Exit::data, str(where, " has kvsnap format ", version[0], ".", version[1],
                                "; this kvtk reads ", kFormatMajor, ".x",
                                h.format_major > kFormatMajor ? " (upgrade kvtk)" : ""));
  ModelInfo& m = h.model;
  m.arch = h5::read_attr_string(f, "model_arch", where);
  m.name = h5::read_attr_string(f, "model_name", where);
  m.file_sha256 = h5::read_attr_string(f, "model_sha256", where);
  m.n_layers = int(h5::read_attr_int(f, "n_layers", where));
  m.n_q_heads = int(h5::read_attr_int(f, "n_q_heads", where));
  m.n_kv_heads = int(h5::read_attr_int(f, "n_kv_heads", where));
  m.head_dim = int(h5::read_attr_int(f, "head_dim", where));
  m.context_length = int(h5::read_attr_int(f, "context_length", where));
  m.rope_theta = h5::read_attr_double(f, "rope_theta", where);
  m.rope_dims = int(h5::read_attr_int(f, "rope_dims", where));
  m.rope_style = h5::read_attr_string(f, "rope_style", where);
  m.key_rope = h5::read_attr_string(f, "key_rope", where);
  h.n_tokens = h5::read_attr_int(f, "n_tokens", where);
  if (h5::has_attr(f, "history")) h.history = h5::read_attr_string(f, "history", where);
  h.tokens = read_vector<int32_t>(f, "tokens", where);
  if (h5::exists(f, "text")) h.text = read_string_dataset(f, "text", where);
  if (h5::exists(f, "window"))
    h.window_positions = read_vector<int32_t>(f, "window/positions", where);
  h.has_attn_stats = h5::exists(f, "attn_stats");
  if (h5::exists(f, "probe")) {
    h.probe_tokens = read_vector<int32_t>(f, "probe/tokens", where);
    h.probe_positions = read_vector<int32_t>(f, "probe/positions", where);
    if (h5::exists(f, "probe/logits")) read_tensor(f, "probe/logits", where, h.probe_logits);
  }
  if (h5::exists(f, "provenance")) {
    Handle g(H5Gopen2(f, "provenance", H5P_DEFAULT), H5Gclose);
    // Records are 000, 001, ... in order; anything else in the group is ignored.
    for (int i = 0;; ++i) {
      std::string name = layer_name(i);
      if (!h5::exists(g, name)) break;
      Handle r(H5Gopen2(g, name.c_str(), H5P_DEFAULT), H5Gclose);
      const std::string rw = where + " provenance/" + name;
      h.provenance.push_back({h5::read_attr_string(r, "id", rw), h5::read_attr_string(r, "program", rw),
                              h5::read_attr_string(r, "version", rw),
                              h5::read_attr_string(r, "command_line", rw),
                              h5::read_attr_string(r, "time", rw),
                              h5::read_attr_string(r, "previous", rw)});
    }
  }
  try {
    validate_header(h);
  } catch (const Error& e) {
    throw Error(e.code(), where + ": " + e.what());
  }
  if (!h5::exists(f, "layers")) throw Error(Exit::data, where + " has no 'layers' group");
  layers = Handle(H5Gopen2(f, "layers", H5P_DEFAULT), H5Gclose);
}

SnapshotReader::SnapshotReader(const std::string& path, ReadOptions options)
    : impl_(std::make_unique<Impl>()) {
  init_hdf5();
  impl_->path = path;
  impl_->options = options;
  impl_->open();
}

SnapshotReader::~SnapshotReader() = default;

const Header& SnapshotReader::header() const { return impl_->header; }
const std::string& SnapshotReader::path() const { return impl_->path; }
int64_t SnapshotReader::file_bytes() const { return impl_->bytes; }

std::string SnapshotReader::codec_name() const {
  if (n_layers() == 0 || !h5::exists(impl_->layers, layer_name(0) + "/k")) return "none";
  Handle ds(H5Dopen2(impl_->layers, (layer_name(0) + "/k").c_str(), H5P_DEFAULT), H5Dclose);
  Handle dcpl(H5Dget_create_plist(ds), H5Pclose);
  for (int i = 0, n = H5Pget_nfilters(dcpl); i < n; ++i) {
    unsigned flags = 0, cd[4] = {};
    size_t ncd = 4;
    H5Z_filter_t id = H5Pget_filter2(dcpl, unsigned(i), &flags, &ncd, cd, 0, nullptr, nullptr);
    if (id == kZstdFilterId) return "zstd," + std::to_string(ncd ? cd[0] : 3);
    if (id == H5Z_FILTER_DEFLATE) return "deflate," + std::to_string(ncd ? cd[0] : 6);
  }
  return "none";
}

void SnapshotReader::read_layer(int l, Layer& out) {
  const Header& h = impl_->header;
  if (l < 0 || l >= h.model.n_layers)
    throw Error(Exit::usage, str("layer ", l, " does not exist (", impl_->where, " has ",
                                 h.model.n_layers, " layers)"));
  const std::string name = layer_name(l);
  const std::string where = str(impl_->where, " layer ", l);
  if (!h5::exists(impl_->layers, name))
    throw Error(Exit::data, where + " is missing (truncated or incomplete snapshot)");
  Handle g(h5::check(H5Gopen2(impl_->layers, name.c_str(), H5P_DEFAULT), Exit::data,
                     where + ": cannot open"),
           H5Gclose);
  const auto H = hsize_t(h.model.n_q_heads);
  out.positions = read_vector<int32_t>(g, "positions", where);
  out.head_offsets = read_vector<int64_t>(g, "head_offsets", where);
  read_tensor(g, "k", where, out.k);
  read_tensor(g, "v", where, out.v);
  out.mass = h5::exists(g, "mass") ? read_vector<float>(g, "mass", where) : std::vector<float>{};
  if (h.has_window()) read_tensor(g, "window_q", where, out.window_q, {H, h.window_positions.size()});
  else out.window_q.clear();
  if (h.has_attn_stats) {
    read_tensor(g, "attn_acc", where, out.attn_acc, {H});
    read_tensor(g, "attn_last", where, out.attn_last, {H});
  } else {
    out.attn_acc.clear();
    out.attn_last.clear();
  }
  if (h.has_probe()) read_tensor(g, "probe_q", where, out.probe_q, {H, h.probe_tokens.size()});
  else out.probe_q.clear();
  try {
    validate_layer(h, l, out, !impl_->options.allow_nonfinite);
  } catch (const Error& e) {
    throw Error(e.code(), impl_->where + ": " + e.what());
  }
}

LayerStorage SnapshotReader::layer_storage(int l) {
  const std::string name = layer_name(l);
  const std::string where = str(impl_->where, " layer ", l);
  if (l < 0 || l >= n_layers() || !h5::exists(impl_->layers, name))
    throw Error(Exit::data, where + " is missing (truncated or incomplete snapshot)");
  Handle g(H5Gopen2(impl_->layers, name.c_str(), H5P_DEFAULT), H5Gclose);
  LayerStorage s;
  s.head_offsets = read_vector<int64_t>(g, "head_offsets", where);
  s.entries = s.head_offsets.empty() ? 0 : s.head_offsets.back();
  for (const char* t : {"k", "v"}) {
    Handle ds = open_dataset(g, t, where);
    Handle type(H5Dget_type(ds), H5Tclose);
    (t[0] == 'k' ? s.k_dtype : s.v_dtype) = h5::dtype_of(type, where + ": '" + t + "'");
    s.kv_bytes_stored += storage_size(g, t);
  }
  s.has_mass = h5::exists(g, "mass");
  for (const char* t : {"positions", "head_offsets", "mass", "window_q", "attn_acc", "attn_last", "probe_q"})
    s.other_bytes_stored += storage_size(g, t);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Writer

struct SnapshotWriter::Impl {
  std::string target;
  std::string temp_path;  // named regular output: written here, renamed by finish()
  int direct_fd = -1;     // stdout or a non-regular file: the image is written here by finish()
  bool owns_fd = false;
  Header header;
  WriteOptions options;
  Handle file, layers;
  int next_layer = 0;
  bool finished = false;

  void open_output();
  void write_header();
  void discard();
};

void SnapshotWriter::Impl::open_output() {
  const std::string where = target == "-" ? std::string("stdout") : "'" + target + "'";
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  struct stat st {};
  bool exists = target != "-" && ::stat(target.c_str(), &st) == 0;
  if (target == "-") {
    if (isatty(1) && !options.force)
      throw Error(Exit::usage,
                  "refusing to write a binary snapshot to a terminal; use -o FILE or a pipe "
                  "(or --force)");
    direct_fd = 1;
  } else if (exists && !S_ISREG(st.st_mode)) {
    direct_fd = ::open(target.c_str(), O_WRONLY);
    if (direct_fd < 0) throw Error(Exit::cant_create, "cannot create " + where + ": " + errno_text());
    owns_fd = true;
    if (isatty(direct_fd) && !options.force)
      throw Error(Exit::usage, "refusing to write a binary snapshot to a terminal (or --force)");
  }
  if (direct_fd >= 0) {
    // HDF5 needs to seek: build the file in memory, write it out in finish().
    H5Pset_fapl_core(fapl, 64 << 20, false);
    file = Handle(H5Fcreate("kvsnap-in-memory.h5", H5F_ACC_TRUNC, H5P_DEFAULT, fapl), H5Fclose);
    if (!file.valid()) throw Error(Exit::software, "cannot create an in-memory HDF5 file");
    return;
  }
  if (exists && !options.force && !options.input_path.empty() && options.input_path != "-") {
    struct stat in {};
    if (::stat(options.input_path.c_str(), &in) == 0 && in.st_dev == st.st_dev &&
        in.st_ino == st.st_ino)
      throw Error(Exit::usage, "output " + where + " is the input file; choose another name "
                               "(or --force to replace it)");
  }
  std::string dir = ".", base = target;
  if (auto slash = target.rfind('/'); slash != std::string::npos) {
    dir = slash == 0 ? "/" : target.substr(0, slash);
    base = target.substr(slash + 1);
  }
  std::string templ = dir + "/." + base + ".tmpXXXXXX";
  int fd = ::mkstemp(templ.data());
  if (fd < 0) throw Error(Exit::cant_create, "cannot create " + where + ": " + errno_text());
  ::close(fd);
  temp_path = templ;
  file = Handle(H5Fcreate(temp_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl), H5Fclose);
  if (!file.valid()) {
    ::unlink(temp_path.c_str());
    temp_path.clear();
    throw Error(Exit::cant_create, "cannot create " + where);
  }
}

void SnapshotWriter::Impl::write_header() {
  const Header& h = header;
  const ModelInfo& m = h.model;
  hid_t f = file;
  const Codec& codec = options.codec;
  h5::write_attr(f, "format", std::string("kvsnap"));
  h5::write_attr(f, "format_version", std::vector<int32_t>{kFormatMajor, kFormatMinor});
  h5::write_attr(f, "model_arch", m.arch);
  h5::write_attr(f, "model_name", m.name);
  h5::write_attr(f, "model_sha256", m.file_sha256);
  h5::write_attr(f, "n_layers", int64_t(m.n_layers));
  h5::write_attr(f, "n_q_heads", int64_t(m.n_q_heads));
  h5::write_attr(f, "n_kv_heads", int64_t(m.n_kv_heads));
  h5::write_attr(f, "head_dim", int64_t(m.head_dim));
  h5::write_attr(f, "context_length", int64_t(m.context_length));
  h5::write_attr(f, "rope_theta", m.rope_theta);
  h5::write_attr(f, "rope_dims", int64_t(m.rope_dims));
  h5::write_attr(f, "rope_style", m.rope_style);
  h5::write_attr(f, "key_rope", m.key_rope);
  h5::write_attr(f, "n_tokens", h.n_tokens);
  if (!h.history.empty()) h5::write_attr(f, "history", h.history);
  write_vector(f, "tokens", h.tokens, codec);
  if (!h.text.empty()) write_string_dataset(f, "text", h.text);
  if (h.has_window()) {
    Handle g = create_group(f, "window");
    write_vector(g, "positions", h.window_positions, codec);
  }
  if (h.has_attn_stats) create_group(f, "attn_stats");
  if (h.has_probe()) {
    Handle g = create_group(f, "probe");
    write_vector(g, "tokens", h.probe_tokens, codec);
    write_vector(g, "positions", h.probe_positions, codec);
    if (!h.probe_logits.empty())
      write_tensor(g, "logits", h.probe_logits,
                   {hsize_t(h.probe_logits.rows()), hsize_t(h.probe_logits.cols())}, codec);
  }
  if (!h.provenance.empty()) {
    Handle g = create_group(f, "provenance");
    for (size_t i = 0; i < h.provenance.size(); ++i) {
      const Provenance& p = h.provenance[i];
      Handle r = create_group(g, layer_name(int(i)));
      h5::write_attr(r, "id", p.id);
      h5::write_attr(r, "program", p.program);
      h5::write_attr(r, "version", p.version);
      h5::write_attr(r, "command_line", p.command_line);
      h5::write_attr(r, "time", p.time);
      h5::write_attr(r, "previous", p.previous);
    }
  }
  layers = create_group(f, "layers");
}

void SnapshotWriter::Impl::discard() {
  layers.reset();
  file.reset();
  if (!temp_path.empty()) ::unlink(temp_path.c_str());
  temp_path.clear();
  if (owns_fd && direct_fd >= 0) ::close(direct_fd);
  direct_fd = -1;
}

SnapshotWriter::SnapshotWriter(const std::string& path, const Header& header, WriteOptions options)
    : impl_(std::make_unique<Impl>()) {
  init_hdf5();
  validate_header(header);
  impl_->target = path;
  impl_->header = header;
  impl_->options = options;
  try {
    impl_->open_output();
    impl_->write_header();
  } catch (...) {
    impl_->discard();
    throw;
  }
}

SnapshotWriter::~SnapshotWriter() {
  if (!impl_->finished) impl_->discard();
}

void SnapshotWriter::write_layer(const Layer& layer) {
  Impl& w = *impl_;
  const Header& h = w.header;
  if (w.next_layer >= h.model.n_layers)
    throw Error(Exit::software, str("more layers written than the header's ", h.model.n_layers));
  const int l = w.next_layer;
  validate_layer(h, l, layer, /*check_values=*/false);
  Handle g = create_group(w.layers, layer_name(l));
  const Codec& codec = w.options.codec;
  const auto D = hsize_t(h.model.head_dim), H = hsize_t(h.model.n_q_heads);
  const auto N = hsize_t(layer.entries());
  write_vector(g, "positions", layer.positions, codec);
  write_vector(g, "head_offsets", layer.head_offsets, codec);
  write_tensor(g, "k", layer.k, {N, D}, codec);
  write_tensor(g, "v", layer.v, {N, D}, codec);
  if (!layer.mass.empty()) write_vector(g, "mass", layer.mass, codec);
  if (h.has_window())
    write_tensor(g, "window_q", layer.window_q, {H, hsize_t(h.window_positions.size()), D}, codec);
  if (h.has_attn_stats) {
    write_tensor(g, "attn_acc", layer.attn_acc, {H, hsize_t(h.n_tokens)}, codec);
    write_tensor(g, "attn_last", layer.attn_last, {H, hsize_t(h.n_tokens)}, codec);
  }
  if (h.has_probe())
    write_tensor(g, "probe_q", layer.probe_q, {H, hsize_t(h.probe_tokens.size()), D}, codec);
  ++w.next_layer;
}

void SnapshotWriter::finish() {
  Impl& w = *impl_;
  const std::string where = w.target == "-" ? std::string("stdout") : "'" + w.target + "'";
  if (w.next_layer != w.header.model.n_layers)
    throw Error(Exit::software, str("only ", w.next_layer, " of ", w.header.model.n_layers,
                                    " layers were written to ", where));
  w.layers.reset();
  if (w.direct_fd >= 0) {
    h5::check(H5Fflush(w.file, H5F_SCOPE_GLOBAL), Exit::io, "cannot finish " + where);
    ssize_t size = H5Fget_file_image(w.file, nullptr, 0);
    if (size < 0) throw Error(Exit::io, "cannot finish " + where);
    MallocBuffer image;
    image.data = static_cast<unsigned char*>(std::malloc(size_t(size)));
    image.size = size_t(size);
    if (H5Fget_file_image(w.file, image.data, image.size) != size)
      throw Error(Exit::io, "cannot finish " + where);
    w.file.reset();
    write_all(w.direct_fd, image.data, image.size, where);
    if (w.owns_fd) ::close(w.direct_fd);
    w.direct_fd = -1;
  } else {
    if (H5Fclose(w.file.release()) < 0) throw Error(Exit::io, "cannot write " + where);
    mode_t mask = ::umask(0);
    ::umask(mask);
    ::chmod(w.temp_path.c_str(), 0666 & ~mask);
    if (::rename(w.temp_path.c_str(), w.target.c_str()) != 0)
      throw Error(Exit::cant_create, "cannot create " + where + ": " + errno_text());
    w.temp_path.clear();
  }
  w.finished = true;
}

// ---------------------------------------------------------------------------------------------

Snapshot read_snapshot(const std::string& path, ReadOptions options) {
  SnapshotReader reader(path, options);
  Snapshot snap;
  snap.header = reader.header();
  snap.layers.resize(size_t(reader.n_layers()));
  for (int l = 0; l < reader.n_layers(); ++l) reader.read_layer(l, snap.layers[size_t(l)]);
  return snap;
}

void write_snapshot(const std::string& path, const Snapshot& snap, WriteOptions options) {
  SnapshotWriter writer(path, snap.header, options);
  for (const Layer& layer : snap.layers) writer.write_layer(layer);
  writer.finish();
}

}  // namespace kv
