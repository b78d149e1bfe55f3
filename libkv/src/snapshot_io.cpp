#include "kv/snapshot_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "h5.h"
#include "kv/file.h"
#include "kv/offload.h"
#include "kv/page_store.h"
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
    case Kind::none:
      return "none";
    case Kind::zstd:
      return "zstd," + std::to_string(level);
    case Kind::deflate:
      return "deflate," + std::to_string(level);
  }
  return "?";
}

void register_zstd_filter() {
  static const bool ok = H5Zregister(&kv_zstd_filter_class) >= 0;
  if (!ok) throw Error(Exit::software, "cannot register the zstd HDF5 filter");
}

namespace {

void init_hdf5() {
  h5::init_library();
  register_zstd_filter();
}

std::string layer_name(int l) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%03d", l);
  return buf;
}

constexpr size_t kChunkBytes = size_t(1) << 20;  // DESIGN: chunks of 256 KiB to 4 MiB

// Writes an n-D dataset (dims.size() in 1..3) from memory laid out as `type`, with the codec.
// A failed write says why (errno: a full disk, a file size limit), as HDF5's own error does not.
void write_dataset(hid_t loc, const std::string& name, hid_t type, std::vector<hsize_t> dims,
                   const void* data, const Codec& codec) {
  const std::string what = "cannot write dataset '" + name + "'";
  errno = 0;
  auto failed = [&] { return Error(Exit::io, what + (errno ? ": " + errno_text() : "")); };
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
  Handle ds(H5Dcreate2(loc, name.c_str(), type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), H5Dclose);
  if (!ds.valid()) throw failed();
  if (n > 0 && H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) throw failed();
  if (H5Dclose(ds.release()) < 0) throw failed();  // (the close writes what HDF5 held back)
}

void write_tensor(hid_t loc, const std::string& name, const Tensor& t, std::vector<hsize_t> dims,
                  const Codec& codec) {
  write_dataset(loc, name, h5::file_type(t.dtype()), std::move(dims), t.data(), codec);
}

template <class T>
hid_t native_type();
template <>
hid_t native_type<int32_t>() {
  return H5T_NATIVE_INT32;
}
template <>
hid_t native_type<int64_t>() {
  return H5T_NATIVE_INT64;
}
template <>
hid_t native_type<float>() {
  return H5T_NATIVE_FLOAT;
}
template <>
hid_t native_type<uint8_t>() {
  return H5T_NATIVE_UINT8;
}

template <class T>
void write_vector(hid_t loc, const std::string& name, const std::vector<T>& v, const Codec& codec) {
  write_dataset(loc, name, native_type<T>(), {hsize_t(v.size())}, v.data(), codec);
}

void write_string_dataset(hid_t loc, const std::string& name, const std::string& value) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, value.size() + 1);
  H5Tset_strpad(type, H5T_STR_NULLTERM);
  H5Tset_cset(type, H5T_CSET_UTF8);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle ds(
      h5::check(H5Dcreate2(loc, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
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

// --- encoded k and v (kvsnap section 9) ---------------------------------------------------------

hid_t code_file_type(CodeArray::Type t) {
  switch (t) {
    case CodeArray::Type::u8:
      return H5T_STD_U8LE;
    case CodeArray::Type::f16:
      return h5::file_type(DType::f16);
    case CodeArray::Type::f32:
      return H5T_IEEE_F32LE;
    case CodeArray::Type::i32:
      break;
  }
  return H5T_STD_I32LE;
}

// The scheme's parameters as attributes; only those the scheme uses (Encoding::describe).
void write_encoding_attrs(hid_t g, const Encoding& e, bool with_scheme = true) {
  if (e.scheme == "external") {  // the inner scheme's parameters, and where its arrays are
    h5::write_attr(g, "scheme", e.scheme);
    h5::write_attr(g, "inner", e.inner);
    h5::write_attr(g, "store", e.store);
    write_encoding_attrs(g, e.inner_encoding(), false);
    return;
  }
  if (with_scheme) h5::write_attr(g, "scheme", e.scheme);
  if (e.scheme == "uniform" || e.scheme == "kivi") {
    h5::write_attr(g, "bits", int64_t(e.bits));
    h5::write_attr(g, "group", int64_t(e.group));
    h5::write_attr(g, "axis", e.axis);
    h5::write_attr(g, "symmetric", int64_t(e.symmetric));
    h5::write_attr(g, "residual", int64_t(e.residual));
  }
  if (e.scheme == "fp8") {
    h5::write_attr(g, "format", e.fp8_format);
    h5::write_attr(g, "scale", e.scale_scope);
  }
  if (e.scheme == "svd") {
    h5::write_attr(g, "rank", int64_t(e.rank));
    h5::write_attr(g, "energy", e.energy);
    h5::write_attr(g, "factors", e.factors);
    h5::write_attr(g, "pre_rope", int64_t(e.pre_rope));
  }
  if (e.scheme == "kvquant") {
    h5::write_attr(g, "bits", int64_t(e.bits));
    h5::write_attr(g, "axis", e.axis);
    h5::write_attr(g, "outliers", e.outliers);
    h5::write_attr(g, "pre_rope", int64_t(e.pre_rope));
  }
  if (e.scheme == "mikv") {
    h5::write_attr(g, "bits", int64_t(e.bits));
    h5::write_attr(g, "high_bits", int64_t(e.high_bits));
    h5::write_attr(g, "high_share", e.high_share);
    h5::write_attr(g, "group", int64_t(e.group));
    h5::write_attr(g, "axis", e.axis);
  }
  if (e.scheme == "minicache") {
    h5::write_attr(g, "partner", int64_t(e.partner));
    h5::write_attr(g, "dtype", e.dtype);
  }
  if (e.scheme == "paged") {
    h5::write_attr(g, "page", int64_t(e.page_size));
    h5::write_attr(g, "store", e.store);
    h5::write_attr(g, "dtype", e.dtype);
  }
  if (e.hadamard) h5::write_attr(g, "hadamard", int64_t(1));
}

void write_encoded(hid_t layer, const std::string& name, const Encoded& enc, const Codec& codec) {
  Handle g = create_group(layer, name);
  write_encoding_attrs(g, enc.encoding);
  for (const CodeArray& a : enc.arrays)
    write_dataset(g, a.name, code_file_type(a.type), {hsize_t(a.count())}, a.bytes.data(), codec);
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

// Reads a 1-D dataset into v, reusing v's storage (streaming reads refill the same Layer).
template <class T>
void read_vector_into(hid_t loc, const std::string& name, const std::string& where,
                      std::vector<T>& v) {
  Handle ds = open_dataset(loc, name, where);
  auto dims = dataset_dims(ds);
  if (dims.size() != 1) throw Error(Exit::data, where + ": '" + name + "' is not 1-D");
  Handle type(H5Dget_type(ds), H5Tclose);
  auto cls = H5Tget_class(type);
  bool want_float = std::is_floating_point_v<T>;
  if (want_float ? cls != H5T_FLOAT : cls != H5T_INTEGER)
    throw Error(Exit::data, where + ": '" + name + "' has the wrong element type");
  v.resize(dims[0]);
  if (!v.empty())
    h5::check(H5Dread(ds, native_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), Exit::data,
              corrupt(where, name));
}

template <class T>
std::vector<T> read_vector(hid_t loc, const std::string& name, const std::string& where) {
  std::vector<T> v;
  read_vector_into(loc, name, where, v);
  return v;
}

// The bytes of an open snapshot, for reading contiguous datasets directly: the HDF5 sec2
// driver's own file descriptor (pread leaves its file offset alone), or the in-memory image.
struct RawFile {
  int fd = -1;
  const unsigned char* image = nullptr;
  size_t image_size = 0;

  bool usable() const { return fd >= 0 || image; }
  // Copies n bytes at offset into dst; false if the file ends first or the read fails.
  bool read(uint64_t offset, void* dst, size_t n) const {
    if (image) {
      if (offset > image_size || n > image_size - offset) return false;
      std::memcpy(dst, image + offset, n);
      return true;
    }
    auto* p = static_cast<unsigned char*>(dst);
    while (n) {
      ssize_t got = ::pread(fd, p, n, off_t(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) return false;
      p += got;
      offset += uint64_t(got);
      n -= size_t(got);
    }
    return true;
  }
};

// The file offset of ds's values, when they are stored as plain bytes: contiguous layout, no
// filters, no external file, allocated, `bytes` long. H5Dread would return exactly those bytes,
// since we read with memory type = file type (dtype_of accepts only our exact types).
bool contiguous_offset(hid_t ds, size_t bytes, uint64_t& offset) {
  Handle dcpl(H5Dget_create_plist(ds), H5Pclose);
  if (!dcpl.valid() || H5Pget_layout(dcpl) != H5D_CONTIGUOUS || H5Pget_nfilters(dcpl) != 0 ||
      H5Pget_external_count(dcpl) != 0)
    return false;
  const haddr_t addr = H5Dget_offset(ds);
  if (addr == HADDR_UNDEF || H5Dget_storage_size(ds) != hsize_t(bytes)) return false;
  offset = addr;
  return true;
}

// Checked datasets (k and v) are read in blocks, and each block is scanned for NaN/Inf right
// after it lands, while it is still in the CPU's cache: a separate pass over k and v after the
// read cost about half as much again as the read itself. Direct reads (a pread or memcpy each)
// use blocks well inside the 1 MiB L2; HDF5 reads (one H5Dread each, at several microseconds
// per call) use larger ones.
constexpr size_t kDirectBlockBytes = size_t(128) << 10, kHdf5BlockBytes = size_t(1) << 20;

// Reads ds (rank 2: [rows, cols] of dt, stored as dt) into dst and returns how many of its
// values are NaN or Inf.
size_t read_counting_nonfinite(hid_t ds, DType dt, hsize_t rows, hsize_t cols, std::byte* dst,
                               const RawFile& raw, const std::string& what) {
  const size_t esize = kvk::dtype_size(dt), row_bytes = size_t(cols) * esize;
  const size_t total = size_t(rows) * row_bytes;
  size_t bad = 0;
  uint64_t offset = 0;
  if (raw.usable() && contiguous_offset(ds, total, offset)) {
    // Plain bytes in the file: read them without HDF5, whose per-call cost is noticeable at
    // this block size.
    // Large tensors are split between the threads, each reading and scanning a contiguous
    // range: the scan of one block then overlaps the copy of another instead of following it.
    const int64_t n_blocks = int64_t((total + kDirectBlockBytes - 1) / kDirectBlockBytes);
    std::atomic<bool> failed{false};
#pragma omp parallel for schedule(static) reduction(+ : bad) if (total >= (size_t(8) << 20))
    for (int64_t b = 0; b < n_blocks; ++b) {
      const size_t pos = size_t(b) * kDirectBlockBytes,
                   n = std::min(kDirectBlockBytes, total - pos);
      if (!raw.read(offset + pos, dst + pos, n)) {
        failed = true;
        continue;
      }
      bad += kvk::count_nonfinite(dt, dst + pos, n / esize);
    }
    if (failed) throw Error(Exit::data, what);
    return bad;
  }
  // Chunked (compressed) or otherwise stored: HDF5 reads row blocks (hyperslabs) of whole
  // chunks, so that no chunk is decoded twice.
  hsize_t block = std::max<hsize_t>(1, kHdf5BlockBytes / std::max<size_t>(row_bytes, 1));
  {
    Handle dcpl(H5Dget_create_plist(ds), H5Pclose);
    hsize_t chunk[2] = {0, 0};
    if (dcpl.valid() && H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_chunk(dcpl, 2, chunk) == 2 &&
        chunk[0] > 0)
      block = std::max<hsize_t>(1, block / chunk[0]) * chunk[0];
  }
  const hid_t type = h5::file_type(dt);
  Handle fspace(h5::check(H5Dget_space(ds), Exit::data, what), H5Sclose);
  for (hsize_t r0 = 0; r0 < rows; r0 += block) {
    const hsize_t start[2] = {r0, 0}, count[2] = {std::min(block, rows - r0), cols};
    Handle mspace(h5::check(H5Screate_simple(2, count, nullptr), Exit::data, what), H5Sclose);
    h5::check(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, nullptr, count, nullptr),
              Exit::data, what);
    std::byte* out = dst + size_t(r0) * row_bytes;
    h5::check(H5Dread(ds, type, mspace, fspace, H5P_DEFAULT, out), Exit::data, what);
    bad += kvk::count_nonfinite(dt, out, size_t(count[0] * count[1]));
  }
  return bad;
}

// Reads a float dataset of rank >= 1 into t as [product of leading dims, last dim], in its
// stored dtype (memory type = file type: HDF5 converts nothing). `lead` is the expected
// leading dims (ignored when empty). With `nonfinite`, also counts the NaN/Inf values into it
// (reading through `raw` where it can).
void read_tensor(hid_t loc, const std::string& name, const std::string& where, Tensor& t,
                 const std::vector<hsize_t>& lead = {}, size_t* nonfinite = nullptr,
                 const RawFile& raw = {}) {
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
  if (nonfinite) *nonfinite = 0;
  if (!t.size()) return;
  if (nonfinite && dims.size() == 2) {
    *nonfinite = read_counting_nonfinite(
        ds, dt, rows, dims.back(), static_cast<std::byte*>(t.data()), raw, corrupt(where, name));
    return;
  }
  h5::check(H5Dread(ds, h5::file_type(dt), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data()), Exit::data,
            corrupt(where, name));
  if (nonfinite) *nonfinite = kvk::count_nonfinite(dt, t.data(), t.size());
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
    h5::check(H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, &p), Exit::data,
              corrupt(where, name));
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

bool is_encoded(hid_t loc, const std::string& name) {
  H5O_info_t info;
  return h5::exists(loc, name) && H5Oget_info_by_name(loc, name.c_str(), &info, H5P_DEFAULT) >= 0 &&
         info.type == H5O_TYPE_GROUP;
}

// The arrays any scheme may define; other members of an encoded group are ignored (section 2).
// (One per line so that adding a scheme's arrays is a one-line change.)
constexpr const char* kCodeArrayNames[] = {
    "codes",         "scales",         "zeros",         "residual",       // uniform, kivi
    "blocks",                                                             // q8_0, q4_0
    "ranks",         "coeffs",         "basis",                           // svd
    "levels",        "outlier_counts", "outlier_index", "outlier_value",  // kvquant
    "high",          "codes_high",     "scales_high",   "zeros_high",    "codes_low",  // mikv
    "scales_low",    "zeros_low",                                                      //
    "local",         "external",       "ids",           "page_key_min",  "page_key_max",
    "page_key_mean",                            // paged
    "merged",        "norms",          "rows",  // minicache
};

Encoding read_encoding_attrs(hid_t g, const std::string& where) {
  if (!h5::has_attr(g, "scheme")) throw Error(Exit::data, where + " has no attribute 'scheme'");
  Encoding e;
  e.scheme = h5::read_attr_string(g, "scheme", where);
  const auto& known = scheme_names();
  if (e.scheme != "paged" && e.scheme != "minicache" && e.scheme != "external" &&
      (e.scheme == "dense" || std::find(known.begin(), known.end(), e.scheme) == known.end()))
    throw Error(Exit::data,
                str(where, " uses encoding '", e.scheme, "', which this kvtk cannot decode"));
  auto int_attr = [&](const char* n) {
    return h5::has_attr(g, n) ? h5::read_attr_int(g, n, where) : int64_t(0);
  };
  auto string_attr = [&](const char* n) {
    return h5::has_attr(g, n) ? h5::read_attr_string(g, n, where) : std::string();
  };
  auto small_int = [&](const char* n) {
    const int64_t v = int_attr(n);
    if (v < INT32_MIN || v > INT32_MAX)
      throw Error(Exit::data, str(where, ": ", n, " ", v, " is out of range"));
    return int(v);
  };
  e.bits = small_int("bits");
  e.group = small_int("group");
  e.axis = string_attr("axis");
  e.symmetric = int_attr("symmetric") != 0;
  e.residual = small_int("residual");
  e.fp8_format = string_attr("format");
  e.scale_scope = string_attr("scale");
  e.rank = small_int("rank");
  e.energy = h5::has_attr(g, "energy") ? h5::read_attr_double(g, "energy", where) : 0.0;
  e.factors = string_attr("factors");
  e.pre_rope = int_attr("pre_rope") != 0;
  e.hadamard = int_attr("hadamard") != 0;
  e.outliers = h5::has_attr(g, "outliers") ? h5::read_attr_double(g, "outliers", where) : 0.0;
  e.high_bits = small_int("high_bits");
  e.page_size = small_int("page");
  e.store = string_attr("store");
  e.dtype = string_attr("dtype");
  e.partner = h5::has_attr(g, "partner") ? small_int("partner") : -1;
  e.inner = string_attr("inner");
  e.high_share = h5::has_attr(g, "high_share") ? h5::read_attr_double(g, "high_share", where) : 0.0;
  return e;
}

// Reads an encoded k or v; `role` is 'k' or 'v'. Parameters a writer could not have written are
// data errors here (the same check is a usage error in kv-compress).
Encoded read_encoded(hid_t layer, const std::string& name, const std::string& where,
                     const ModelInfo& model) {
  const std::string at = where + ": '" + name + "'";
  Handle g(h5::check(H5Gopen2(layer, name.c_str(), H5P_DEFAULT), Exit::data, at + ": cannot open"),
           H5Gclose);
  Encoded enc;
  enc.encoding = read_encoding_attrs(g, at);
  try {
    check_encoding(enc.encoding, model, name[0]);
  } catch (const Error& e) {
    throw Error(Exit::data, at + ": " + e.what());
  }
  for (const char* array : kCodeArrayNames) {
    if (!h5::exists(g, array)) continue;
    Handle ds = open_dataset(g, array, at);
    auto dims = dataset_dims(ds);
    if (dims.size() != 1) throw Error(Exit::data, str(at, ": '", array, "' is not 1-D"));
    Handle type(H5Dget_type(ds), H5Tclose);
    CodeArray a;
    a.name = array;
    if (H5Tequal(type, H5T_STD_U8LE) > 0)
      a.type = CodeArray::Type::u8;
    else if (H5Tequal(type, H5T_STD_I32LE) > 0)
      a.type = CodeArray::Type::i32;
    else if (H5Tequal(type, H5T_IEEE_F32LE) > 0)
      a.type = CodeArray::Type::f32;
    else if (H5Tequal(type, h5::file_type(DType::f16)) > 0)
      a.type = CodeArray::Type::f16;
    else
      throw Error(Exit::data, str(at, ": '", array, "' is not u8, i32, f16 or f32"));
    a.bytes.resize(size_t(dims[0]) * CodeArray::element_size(a.type));
    if (!a.bytes.empty())
      h5::check(H5Dread(ds, code_file_type(a.type), H5S_ALL, H5S_ALL, H5P_DEFAULT, a.bytes.data()),
                Exit::data, corrupt(at, array));
    enc.arrays.push_back(std::move(a));
  }
  return enc;
}

int64_t storage_size(hid_t loc, const std::string& name) {
  if (!h5::exists(loc, name)) return 0;
  Handle ds(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), H5Dclose);
  return ds.valid() ? int64_t(H5Dget_storage_size(ds)) : 0;
}

// The offset of the HDF5 superblock in p[0, n), or n when there is none.
size_t superblock_offset(const unsigned char* p, size_t n) {
  static const unsigned char sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
  for (size_t off = 0; off + 8 <= n; off = off ? off * 2 : 512)  // superblock at 0, 512, 1024...
    if (std::memcmp(p + off, sig, 8) == 0) return off;
  return n;
}

bool has_hdf5_signature(const unsigned char* p, size_t n) {
  return superblock_offset(p, n) < n;
}

// Where the HDF5 file in p[0, n) ends, by its superblock's base and end-of-file addresses
// (HDF5 File Format Specification, section II.A: versions 0 and 1, then 2 and 3), or 0 when
// that cannot be read (HDF5 itself then judges the file).
uint64_t hdf5_end(const unsigned char* p, size_t n) {
  const size_t sb = superblock_offset(p, n);
  if (sb + 9 > n) return 0;
  const int version = p[sb + 8];
  const size_t sizes = version <= 1 ? sb + 13 : sb + 9;  // size of offsets
  if (sizes >= n) return 0;
  const size_t O = p[sizes];
  if (O != 8 && O != 4) return 0;
  // Base address, then (v0/v1: free-space address; v2/v3: extension address), then the end.
  const size_t base = version == 0 ? sb + 24 : version == 1 ? sb + 28 : sb + 12;
  if (version > 3 || base + 3 * O > n) return 0;
  auto addr = [&](size_t at) {
    uint64_t v = 0;
    for (size_t b = 0; b < O; ++b) v |= uint64_t(p[at + b]) << (8 * b);
    return v;
  };
  return addr(base) + addr(base + 2 * O);
}

// Anonymous memory for whole-file images (pipes in and out), from mmap rather than malloc. It
// grows with mremap (the page tables move, nothing is copied), and its pages are faulted in
// ahead of use with MADV_POPULATE_WRITE: about 0.33 s per GiB here, against 0.55 s for demand
// faults, and it keeps page faults out of read() on a pipe, where they stall the writer.
// Transparent huge pages are deliberately not asked for (MADV_HUGEPAGE): in this VM the huge
// pages a process gets after a few idle seconds come cold from the host, and first touch runs
// at about 0.45 GB/s, 4x slower than with 4 KiB pages; they are fast (6-8 GB/s) only when
// recycled within seconds, as in a benchmark loop.
class MmapBuffer {
 public:
  MmapBuffer() = default;
  MmapBuffer(const MmapBuffer&) = delete;
  MmapBuffer& operator=(const MmapBuffer&) = delete;
  ~MmapBuffer() { reset(); }

  unsigned char* data() const { return data_; }
  size_t capacity() const { return capacity_; }
  size_t populated() const { return populated_; }

  // Makes the capacity at least n bytes (at least doubling it), keeping the contents. The new
  // bytes read as zero. Returns false when out of memory (the buffer is then unchanged).
  bool reserve(size_t n) noexcept {
    if (n <= capacity_) return true;
    size_t cap = std::max({n, 2 * capacity_, size_t(1) << 20});
    if (cap > SIZE_MAX / 2) return false;
    cap = round_to_pages(cap);
    void* p =
        data_ ? ::mremap(data_, capacity_, cap, MREMAP_MAYMOVE)
              : ::mmap(nullptr, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    data_ = static_cast<unsigned char*>(p);
    capacity_ = cap;
    return true;
  }

  // Faults in the pages of [0, n) that are not yet (advisory: pages not populated here fault
  // in when first written).
  void populate(size_t n) noexcept {
    n = std::min(round_to_pages(n), capacity_);
    if (n <= populated_) return;
#ifdef MADV_POPULATE_WRITE
    ::madvise(data_ + populated_, n - populated_, MADV_POPULATE_WRITE);
#endif
    populated_ = n;
  }

  void reset() noexcept {
    if (data_) ::munmap(data_, capacity_);
    data_ = nullptr;
    capacity_ = populated_ = 0;
  }

  size_t size = 0;  // bytes in use: kept by the user of the buffer

 private:
  static size_t round_to_pages(size_t n) {
    static const size_t page = size_t(::sysconf(_SC_PAGESIZE));
    return (n + page - 1) / page * page;
  }

  unsigned char* data_ = nullptr;
  size_t capacity_ = 0, populated_ = 0;
};

// A larger pipe buffer (up to fs.pipe-max-size, 1 MiB by default; best effort) means fewer
// wakeups of the writer and of the reader per byte: a cross-CPU wakeup is the main cost of a
// pipe in a VM (bench/README.md, pipe read 0.67 -> 1.07 of plain with the ends on two CPUs).
void enlarge_pipe(int fd) {
#ifdef F_SETPIPE_SZ
  ::fcntl(fd, F_SETPIPE_SZ, 1 << 20);
#endif
}

// Reads all of fd into buf.
void slurp(int fd, MmapBuffer& buf, const std::string& name) {
  const std::string oom = "out of memory reading " + name;
  constexpr size_t kAhead = size_t(8) << 20;  // pages populated ahead of the reads
  struct stat st {};
  // A regular file (stdin redirected from one) has a known size: one mapping, no growth.
  size_t hint = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) ? size_t(st.st_size) + 1 : 0;
  if (S_ISFIFO(st.st_mode)) enlarge_pipe(fd);
  if (!buf.reserve(std::max(hint, kAhead))) throw Error(Exit::io, oom);
  for (;;) {
    if (buf.size == buf.capacity() && !buf.reserve(buf.size + 1)) throw Error(Exit::io, oom);
    if (buf.populated() < buf.size + kAhead / 2) buf.populate(buf.size + kAhead);
    ssize_t got = ::read(fd, buf.data() + buf.size, buf.capacity() - buf.size);
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
  return static_cast<MmapBuffer*>(udata)->data();
}
void* image_memcpy(void* dest, const void* src, size_t size, H5FD_file_image_op_t, void*) {
  if (dest != src) std::memcpy(dest, src, size);
  return dest;
}
void* image_realloc(void*, size_t, H5FD_file_image_op_t, void*) {
  return nullptr;
}  // read-only
herr_t image_free(void*, H5FD_file_image_op_t, void*) {
  return 0;
}
void* udata_copy(void* udata) {
  return udata;
}
herr_t udata_free(void*) {
  return 0;
}

Handle open_image_readonly(MmapBuffer& image) {
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5FD_file_image_callbacks_t callbacks = {image_malloc, image_memcpy, image_realloc, image_free,
                                           udata_copy,   udata_free,   &image};
  if (H5Pset_fapl_core(fapl, 1 << 20, false) < 0 ||
      H5Pset_file_image_callbacks(fapl, &callbacks) < 0 ||
      H5Pset_file_image(fapl, image.data(), image.size) < 0)
    return Handle();
  return Handle(H5Fopen("kvsnap-image", H5F_ACC_RDONLY, fapl), H5Fclose);
}

// The pipe writer's in-memory file. The core driver allocates and grows its image through these
// callbacks, and at close hands it back (image_free) instead of freeing it, so that finish()
// writes it out without copying it first.
struct ImageSink {
  MmapBuffer buf;
  bool closed = false;  // the driver released the image: the file is closed and complete
};

void* sink_malloc(size_t size, H5FD_file_image_op_t, void* udata) {
  auto& sink = *static_cast<ImageSink*>(udata);
  return sink.buf.reserve(size) ? sink.buf.data() : nullptr;
}
void* sink_realloc(void* ptr, size_t size, H5FD_file_image_op_t, void* udata) {
  auto& sink = *static_cast<ImageSink*>(udata);
  if (ptr && ptr != sink.buf.data()) return nullptr;  // not ours: never happens
  if (!sink.buf.reserve(size)) return nullptr;
  sink.buf.populate(size);
  return sink.buf.data();  // a shrink keeps the capacity
}
herr_t sink_free(void* ptr, H5FD_file_image_op_t op, void* udata) {
  auto& sink = *static_cast<ImageSink*>(udata);
  if (ptr != sink.buf.data()) return -1;
  if (op == H5FD_FILE_IMAGE_OP_FILE_CLOSE) sink.closed = true;
  return 0;  // the memory stays with the sink
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

// Writes the first n bytes of a finished image to fd. A pipe gets the pages themselves
// (vmsplice): the reader copies them out of the pipe, and we skip the copy into it, which is
// half the CPU work of a pipe transfer. The image is never written again (it is unmapped
// right after; the pipe holds its own references to the pages until they are read).
// Anything else, or a kernel without vmsplice, gets write().
void write_image(int fd, const unsigned char* data, size_t n, const std::string& name) {
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode)) {
    enlarge_pipe(fd);
    while (n) {
      iovec iov{const_cast<unsigned char*>(data), n};
      ssize_t put = ::vmsplice(fd, &iov, 1, 0);
      if (put < 0) {
        if (errno == EINTR) continue;
        if (errno == EINVAL || errno == ENOSYS || errno == EBADF) break;  // write() instead
        throw Error(Exit::io, "cannot write " + name + ": " + errno_text());
      }
      data += put;
      n -= size_t(put);
    }
  }
  write_all(fd, data, n, name);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Reader

struct SnapshotReader::Impl {
  std::string path;
  std::string where;  // "'path'" for messages
  ReadOptions options;
  MmapBuffer image;  // whole file when read from a pipe
  RawFile raw;       // the same bytes as `file`, for direct reads of contiguous datasets
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
    if (S_ISDIR(st.st_mode))
      throw Error(Exit::no_input, "cannot open " + where + ": Is a directory");
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
    if (file.valid()) {
      Handle fapl(H5Fget_access_plist(file), H5Pclose);
      void* handle = nullptr;
      if (fapl.valid() && H5Pget_driver(fapl) == H5FD_SEC2 &&
          H5Fget_vfd_handle(file, H5P_DEFAULT, &handle) >= 0 && handle)
        raw.fd = *static_cast<int*>(handle);
    }
  } else {
    // A pipe (stdin, or a FIFO such as <(...)): HDF5 needs random access, so hold it in memory.
    int fd = from_stdin ? 0 : ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw Error(Exit::no_input, "cannot open " + where + ": " + errno_text());
    slurp(fd, image, where);
    if (!from_stdin) ::close(fd);
    bytes = int64_t(image.size);
    if (image.size == 0) throw Error(Exit::data, where + " is empty (expected a kvsnap snapshot)");
    if (!has_hdf5_signature(image.data(), image.size)) throw Error(Exit::data, not_hdf5);
    file = open_image_readonly(image);
    raw.image = image.data();
    raw.image_size = image.size;
    // Bytes after the end the file's superblock gives: a second snapshot concatenated onto the
    // first (`cat a b | tool`) would otherwise be dropped without a word.
    if (const uint64_t end = hdf5_end(image.data(), image.size); end > 0 && end < image.size)
      throw Error(Exit::data,
                  str(where, " holds ", image.size - end, " bytes after the snapshot's end (byte ",
                      end, "): one snapshot at a time"));
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
  if (version.size() != 2)
    throw Error(Exit::data, where + ": format_version must be [major, minor]");
  Header& h = header;
  h.format_major = version[0];
  h.format_minor = version[1];
  if (h.format_major != kFormatMajor)
    throw Error(Exit::data,
                str(where, " has kvsnap format ", version[0], ".", version[1], "; this kvtk reads ",
                    kFormatMajor, ".x", h.format_major > kFormatMajor ? " (upgrade kvtk)" : ""));
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
      h.provenance.push_back(
          {h5::read_attr_string(r, "id", rw), h5::read_attr_string(r, "program", rw),
           h5::read_attr_string(r, "version", rw), h5::read_attr_string(r, "command_line", rw),
           h5::read_attr_string(r, "time", rw), h5::read_attr_string(r, "previous", rw)});
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

const Header& SnapshotReader::header() const {
  return impl_->header;
}
const std::string& SnapshotReader::path() const {
  return impl_->path;
}
int64_t SnapshotReader::file_bytes() const {
  return impl_->bytes;
}

std::string SnapshotReader::codec_name() const {
  if (n_layers() == 0) return "none";
  // Layer 0's k, or the first array of an encoded k: a dataset with elements (empty ones are
  // never filtered).
  std::string path = layer_name(0) + "/k";
  if (is_encoded(impl_->layers, path))
    for (const char* array : kCodeArrayNames)
      if (h5::exists(impl_->layers, path + "/" + array) &&
          storage_size(impl_->layers, path + "/" + array) > 0) {
        path += std::string("/") + array;
        break;
      }
  if (!h5::exists(impl_->layers, path)) return "none";
  Handle ds(H5Dopen2(impl_->layers, path.c_str(), H5P_DEFAULT), H5Dclose);
  if (!ds.valid()) return "none";
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
  read_vector_into(g, "positions", where, out.positions);
  read_vector_into(g, "head_offsets", where, out.head_offsets);
  // NaN/Inf in k and v are counted while they are read (see kDirectBlockBytes), and reported
  // after the structural checks, as validate_layer(check_values) would.
  const bool check_values = !impl_->options.allow_nonfinite;
  size_t k_bad = 0, v_bad = 0;
  // An encoded k or v is decoded after the layer's structure has been validated (decoding
  // indexes its arrays by the head offsets).
  Encoded k_code, v_code;
  out.k_stored.reset();
  out.v_stored.reset();
  for (auto [name, t, enc, code, bad] :
       {std::tuple{"k", &out.k, &out.k_encoding, &k_code, &k_bad},
        std::tuple{"v", &out.v, &out.v_encoding, &v_code, &v_bad}}) {
    if (is_encoded(g, name)) {
      *code = read_encoded(g, name, where, h.model);
      if (code->encoding.scheme == "external") {  // kv-offload's disk tier: fetch the arrays
        try {
          *code = fetch_external(*code);
        } catch (const Error& e) {
          throw Error(e.code(), str(where, ": '", name, "': ", e.what()));
        }
      }
      *enc = code->encoding;
      t->resize(DType::f32, int64_t(out.positions.size()), h.model.head_dim);
    } else {
      *enc = Encoding{};
      read_tensor(g, name, where, *t, {}, check_values ? bad : nullptr, impl_->raw);
    }
  }
  if (h5::exists(g, "mass"))
    read_vector_into(g, "mass", where, out.mass);
  else
    out.mass.clear();
  if (h.has_window())
    read_tensor(g, "window_q", where, out.window_q, {H, h.window_positions.size()});
  else
    out.window_q.clear();
  if (h.has_attn_stats) {
    read_tensor(g, "attn_acc", where, out.attn_acc, {H});
    read_tensor(g, "attn_last", where, out.attn_last, {H});
  } else {
    out.attn_acc.clear();
    out.attn_last.clear();
  }
  if (h.has_probe())
    read_tensor(g, "probe_q", where, out.probe_q, {H, h.probe_tokens.size()});
  else
    out.probe_q.clear();
  try {
    validate_layer(h, l, out, /*check_values=*/false);
  } catch (const Error& e) {
    throw Error(e.code(), impl_->where + ": " + e.what());
  }
  const RowLayout rows{h.model, out.head_offsets, out.positions};
  for (auto [name, t, code, bad] :
       {std::tuple{"k", &out.k, &k_code, &k_bad}, std::tuple{"v", &out.v, &v_code, &v_bad}}) {
    if (code->encoding.dense()) continue;
    try {
      if (code->encoding.scheme == "minicache") {
        // The directions are the partner layer's, an earlier layer stored dense (or paged).
        const int p = code->encoding.partner;
        if (p >= l) throw Error(Exit::data, str("partner layer ", p, " is not an earlier layer"));
        const std::string pname = layer_name(p) + "/" + name;
        if (!h5::exists(impl_->layers, pname))
          throw Error(Exit::data, str("partner layer ", p, " has no dense '", name, "'"));
        Handle pg(H5Gopen2(impl_->layers, layer_name(p).c_str(), H5P_DEFAULT), H5Gclose);
        // The same entries (formats/kvsnap.md 9.3): the same head offsets, row for row.
        if (read_vector<int64_t>(pg, "head_offsets", where) != out.head_offsets)
          throw Error(Exit::data, str("partner layer ", p, " holds other entries"));
        Tensor partner;
        if (is_encoded(pg, name)) {  // paged by kv-offload: dense rows, some in a page store
          const Encoded paged = read_encoded(pg, name, where, h.model);
          if (paged.encoding.scheme != "paged")
            throw Error(Exit::data, str("partner layer ", p, " has no dense '", name, "'"));
          partner.resize(DType::f32, t->rows(), t->cols());
          decode(paged, rows, partner.as<float>());  // rows: equal head offsets, checked above
        } else {
          read_tensor(pg, name, where, partner);
        }
        if (partner.rows() != t->rows() || partner.cols() != t->cols())
          throw Error(Exit::data, str("partner layer ", p, " holds other entries"));
        const std::vector<float> directions = partner.to_f32();
        decode_minicache(*code, t->rows(), int(t->cols()), directions.data(), t->as<float>());
      } else {
        decode(*code, rows, t->as<float>());
      }
    } catch (const Error& e) {  // bad codes are bad data; a page file that cannot be read is not
      const bool unreadable = e.code() == Exit::no_input || e.code() == Exit::io;
      throw Error(unreadable ? e.code() : Exit::data, str(where, ": '", name, "': ", e.what()));
    }
    if (check_values) *bad = kvk::count_nonfinite(DType::f32, t->data(), t->size());
    const Encoding encoding = code->encoding;
    const std::string& scheme = encoding.scheme;
    std::shared_ptr<const Encoded>& stored = name[0] == 'k' ? out.k_stored : out.v_stored;
    if (impl_->options.keep_stored && scheme != "paged")
      stored = std::make_shared<const Encoded>(std::move(*code));
    if (scheme == "paged" || scheme == "minicache") {  // restored to their dense form
      const std::vector<float> values(t->as<float>(), t->as<float>() + t->size());
      const std::string& d = encoding.dtype;
      *t = Tensor::from_f32(d == "f32"    ? DType::f32
                            : d == "bf16" ? DType::bf16
                                          : DType::f16,
                            t->rows(), t->cols(), values.data());
      (name[0] == 'k' ? out.k_encoding : out.v_encoding) = Encoding{};
    }
  }
  if (k_bad || v_bad)
    throw Error(Exit::data,
                str(impl_->where, ": layer ", l, ": ", k_bad ? "k" : "v", " holds ",
                    k_bad ? k_bad : v_bad, " NaN/Inf values (--allow-nonfinite reads it anyway)"));
  if (check_values) {
    try {
      check_side_values(l, out);
    } catch (const Error& e) {
      throw Error(e.code(), impl_->where + ": " + e.what());
    }
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
    if (is_encoded(g, t)) {
      Handle eg(H5Gopen2(g, t, H5P_DEFAULT), H5Gclose);
      (t[0] == 'k' ? s.k_encoding : s.v_encoding) =
          read_encoding_attrs(eg, where + ": '" + t + "'");
      (t[0] == 'k' ? s.k_dtype : s.v_dtype) = DType::f32;  // what readers decode it to
      int64_t local = 0;
      for (const char* array : kCodeArrayNames) {
        if (!h5::exists(eg, array)) continue;
        s.kv_bytes_stored += storage_size(eg, array);
        Handle ds = open_dataset(eg, array, where);
        Handle type(H5Dget_type(ds), H5Tclose);
        auto dims = dataset_dims(ds);
        const int64_t bytes = dims.empty() ? 0 : int64_t(dims[0] * H5Tget_size(type));
        s.kv_bytes_logical += bytes;
        if (std::string(array) == "local") local = bytes;
      }
      // What kv-offload moved out: a paged tensor's other rows, an external one's object.
      const Encoding& e = t[0] == 'k' ? s.k_encoding : s.v_encoding;
      if (e.scheme == "paged") {
        const int64_t all = s.entries * impl_->header.model.head_dim *
                            int64_t(kvk::dtype_size(dense_dtype(e.dtype)));
        s.kv_bytes_in_store += std::max<int64_t>(0, all - local);
      } else if (e.scheme == "external") {
        const std::vector<uint8_t> ids = read_vector<uint8_t>(eg, "ids", where);
        const auto& entries = PageStore::open_for_reading(e.store)->entries();
        if (ids.size() == 32)
          if (const auto it = entries.find(PageStore::id_from_bytes(ids.data()));
              it != entries.end())
            s.kv_bytes_in_store += it->second.bytes;
      }
      continue;
    }
    Handle ds = open_dataset(g, t, where);
    Handle type(H5Dget_type(ds), H5Tclose);
    (t[0] == 'k' ? s.k_dtype : s.v_dtype) = h5::dtype_of(type, where + ": '" + t + "'");
    s.kv_bytes_stored += storage_size(g, t);
    auto dims = dataset_dims(ds);
    int64_t n = int64_t(H5Tget_size(type));
    for (hsize_t d : dims) n *= int64_t(d);
    s.kv_bytes_logical += n;
  }
  s.has_mass = h5::exists(g, "mass");
  for (const char* t :
       {"positions", "head_offsets", "mass", "window_q", "attn_acc", "attn_last", "probe_q"})
    s.other_bytes_stored += storage_size(g, t);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Writer

struct SnapshotWriter::Impl {
  std::string target;
  std::string renamed_over;  // what the temporary file replaces: target, or the file it links to
  int64_t kv_bytes = 0;      // k and v written so far, before the codec (kv_bytes_written)
  std::string temp_path;     // named regular output: written here, renamed by finish()
  int direct_fd = -1;        // stdout or a non-regular file: the image is written here by finish()
  bool owns_fd = false;
  Header header;
  WriteOptions options;
  std::unique_ptr<ImageSink> image;  // the in-memory file for direct_fd (outlives `file`)
  Handle file, layers;
  int next_layer = 0;
  bool finished = false;

  void open_output();
  void write_header();
  void write_layer_data(int l, const Layer& layer);
  void discard();
};

// File-space alignment for large objects in codec-none files: datasets of 64 KiB or more start
// on a 4 KiB boundary. A read then copies from page-aligned page-cache pages (or an image
// buffer) into 64-byte aligned Tensor storage, which runs about twice as fast as a copy between
// differently aligned addresses. It costs under 4 KiB per large dataset; compressed chunks are
// not aligned (nothing would gain).
constexpr hsize_t kAlignThreshold = 64 << 10, kAlignment = 4096;

void SnapshotWriter::Impl::open_output() {
  const std::string where = target == "-" ? std::string("stdout") : "'" + target + "'";
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  if (options.codec.kind == Codec::Kind::none)
    h5::check(H5Pset_alignment(fapl, kAlignThreshold, kAlignment), Exit::software,
              "cannot set the HDF5 alignment");
  if (const std::string store = PageStore::store_holding(target); !store.empty())
    throw Error(Exit::usage, "output " + where + " is inside the page store '" + store +
                                 "'; write it elsewhere");
  if (!options.force && same_file(options.input_path, target))
    throw Error(Exit::usage, "output " + where +
                                 " is the input file; choose another name "
                                 "(or --force to replace it)");
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
    if (direct_fd < 0)
      throw Error(Exit::cant_create, "cannot create " + where + ": " + errno_text());
    owns_fd = true;
    if (isatty(direct_fd) && !options.force)
      throw Error(Exit::usage, "refusing to write a binary snapshot to a terminal (or --force)");
  }
  if (direct_fd >= 0) {
    // HDF5 needs to seek: build the file in memory (in a buffer we own, see ImageSink), write it
    // out in finish(). The driver asks for its image in steps of 1 MiB and zero-fills each new
    // step before writing into it; the buffer itself grows by doubling.
    image = std::make_unique<ImageSink>();
    H5FD_file_image_callbacks_t callbacks = {sink_malloc, image_memcpy, sink_realloc, sink_free,
                                             udata_copy,  udata_free,   image.get()};
    if (H5Pset_fapl_core(fapl, size_t(1) << 20, false) < 0 ||
        H5Pset_file_image_callbacks(fapl, &callbacks) < 0)
      throw Error(Exit::software, "cannot set up an in-memory HDF5 file");
    file = Handle(H5Fcreate("kvsnap-in-memory.h5", H5F_ACC_TRUNC, H5P_DEFAULT, fapl), H5Fclose);
    if (!file.valid()) throw Error(Exit::software, "cannot create an in-memory HDF5 file");
    return;
  }
  renamed_over = rename_target(target);
  std::string dir = ".", base = renamed_over;
  if (auto slash = renamed_over.rfind('/'); slash != std::string::npos) {
    dir = slash == 0 ? "/" : renamed_over.substr(0, slash);
    base = renamed_over.substr(slash + 1);
  }
  // The temporary file must be created by HDF5 itself (H5F_ACC_EXCL: O_CREAT|O_EXCL), never
  // reopened with O_TRUNC: ext4 (auto_da_alloc) starts writeback of the whole file inside
  // close() after a truncate, about 0.25 s per GiB. mkstemp() picks a free random name and tells
  // why the directory is unusable; its empty file is removed at once and HDF5 creates the name
  // afresh (mode 0666 & ~umask, as for any new file). If another process takes the name in
  // between, try another one. The name is registered as soon as mkstemp has chosen it, so that a
  // signal removes it (register_temp_file), until finish() renames it or discard() removes it.
  for (int attempt = 0;; ++attempt) {
    std::string templ = dir + "/." + base + ".tmpXXXXXX";
    int fd = ::mkstemp(templ.data());
    if (fd < 0) throw Error(Exit::cant_create, "cannot create " + where + ": " + errno_text());
    register_temp_file(templ);
    ::close(fd);
    ::unlink(templ.c_str());
    hid_t id = H5Fcreate(templ.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl);
    if (id >= 0) {
      file = Handle(id, H5Fclose);
      temp_path = templ;
      return;
    }
    unregister_temp_file(templ);  // HDF5 did not create it: whatever is there is not ours
    struct stat taken {};
    if (attempt < 3 && ::lstat(templ.c_str(), &taken) == 0) continue;  // lost a race
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
  image.reset();
  if (!temp_path.empty()) {
    ::unlink(temp_path.c_str());
    unregister_temp_file(temp_path);
  }
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
  } catch (const Error& e) {
    impl_->discard();
    if (e.code() != Exit::io) throw;
    throw Error(Exit::io,
                str(path == "-" ? std::string("stdout") : "'" + path + "'", ": ", e.what()));
  } catch (...) {
    impl_->discard();
    throw;
  }
}

SnapshotWriter::~SnapshotWriter() {
  if (!impl_->finished) impl_->discard();
}

namespace {

// Calls emit(name, dense, stored, fresh) for k then v as the writer stores them, exactly one of
// the three set: a dense tensor as its values, kv-offload's stored tensors as they are, or the
// arrays encoded here (mikv ranks rows by the layer's attention statistics), which emit may
// hand to recycle().
template <class Emit>
void layer_as_written(const Header& h, int l, const Layer& layer, Emit&& emit) {
  RowLayout rows{h.model, layer.head_offsets, layer.positions};
  std::vector<float> importance;
  if (layer.k_encoding.scheme == "mikv" || layer.v_encoding.scheme == "mikv") {
    importance = entry_importance(h.model, layer.head_offsets, layer.positions, layer.attn_acc);
    rows.importance = importance.data();
  }
  for (auto [name, t, enc] : {std::tuple{"k", &layer.k, &layer.k_encoding},
                              std::tuple{"v", &layer.v, &layer.v_encoding}}) {
    if (const auto& stored = name[0] == 'k' ? layer.k_stored : layer.v_stored) {
      emit(name, nullptr, stored.get(), nullptr);  // already encoded (kv-offload's pages)
      continue;
    }
    if (enc->dense()) {
      emit(name, t, nullptr, nullptr);
      continue;
    }
    check_encoding(*enc, h.model, name[0]);
    try {
      Encoded coded = encode(*enc, *t, rows);
      emit(name, nullptr, nullptr, &coded);
    } catch (const Error& e) {
      throw Error(e.code(), str("layer ", l, ": '", name, "': ", e.what()));
    }
  }
}

}  // namespace

int64_t kv_bytes_as_written(const Header& header, const Layer& layer) {
  int64_t bytes = 0;
  layer_as_written(
      header, -1, layer,
      [&](const char*, const Tensor* dense, const Encoded* stored, Encoded* fresh) {
        bytes += dense ? int64_t(dense->bytes()) : stored ? stored->bytes() : fresh->bytes();
        if (fresh) recycle(std::move(*fresh));
      });
  return bytes;
}

void SnapshotWriter::Impl::write_layer_data(int l, const Layer& layer) {
  Impl& w = *this;
  const Header& h = w.header;
  Handle g = create_group(w.layers, layer_name(l));
  const Codec& codec = w.options.codec;
  const auto D = hsize_t(h.model.head_dim), H = hsize_t(h.model.n_q_heads);
  const auto N = hsize_t(layer.entries());
  write_vector(g, "positions", layer.positions, codec);
  write_vector(g, "head_offsets", layer.head_offsets, codec);
  layer_as_written(
      h, l, layer,
      [&](const char* name, const Tensor* dense, const Encoded* stored, Encoded* fresh) {
        kv_bytes += dense ? int64_t(dense->bytes()) : stored ? stored->bytes() : fresh->bytes();
        if (dense) return write_tensor(g, name, *dense, {N, D}, codec);
        write_encoded(g, name, stored ? *stored : *fresh, codec);
        if (fresh) recycle(std::move(*fresh));
      });
  if (!layer.mass.empty()) write_vector(g, "mass", layer.mass, codec);
  if (h.has_window())
    write_tensor(g, "window_q", layer.window_q, {H, hsize_t(h.window_positions.size()), D}, codec);
  if (h.has_attn_stats) {
    write_tensor(g, "attn_acc", layer.attn_acc, {H, hsize_t(h.n_tokens)}, codec);
    write_tensor(g, "attn_last", layer.attn_last, {H, hsize_t(h.n_tokens)}, codec);
  }
  if (h.has_probe())
    write_tensor(g, "probe_q", layer.probe_q, {H, hsize_t(h.probe_tokens.size()), D}, codec);
}

int64_t SnapshotWriter::kv_bytes_written() const {
  return impl_->kv_bytes;
}

void SnapshotWriter::write_layer(const Layer& layer) {
  Impl& w = *impl_;
  const Header& h = w.header;
  if (w.next_layer >= h.model.n_layers)
    throw Error(Exit::software, str("more layers written than the header's ", h.model.n_layers));
  const int l = w.next_layer;
  validate_layer(h, l, layer, /*check_values=*/false);
  try {
    w.write_layer_data(l, layer);
  } catch (const Error& e) {
    if (e.code() != Exit::io) throw;
    const std::string where = w.target == "-" ? std::string("stdout") : "'" + w.target + "'";
    throw Error(Exit::io, str(where, ": layer ", l, ": ", e.what()));
  }
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
    // The flush writes everything and releases HDF5's unused allocation blocks, so the end of
    // allocated space (what H5Fget_file_image reports without a buffer) is the file's size;
    // the close then hands the complete image back to w.image (nothing is written after the
    // flush, and the superblock records that size as its end of file).
    h5::check(H5Fflush(w.file, H5F_SCOPE_GLOBAL), Exit::io, "cannot finish " + where);
    const ssize_t size = H5Fget_file_image(w.file, nullptr, 0);
    if (size <= 0) throw Error(Exit::io, "cannot finish " + where);
    if (H5Fclose(w.file.release()) < 0) throw Error(Exit::io, "cannot finish " + where);
    if (!w.image->closed || size_t(size) > w.image->buf.capacity())
      throw Error(Exit::software, "cannot finish " + where + ": the in-memory file is incomplete");
    write_image(w.direct_fd, w.image->buf.data(), size_t(size), where);
    w.image.reset();
    if (w.owns_fd) ::close(w.direct_fd);
    w.direct_fd = -1;
  } else {
    errno = 0;  // HDF5's error stack says "write failed"; errno says why
    if (H5Fclose(w.file.release()) < 0)
      throw Error(Exit::io, "cannot write " + where + (errno ? ": " + errno_text() : ""));
    if (::rename(w.temp_path.c_str(), w.renamed_over.c_str()) != 0)
      throw Error(Exit::cant_create, "cannot create " + where + ": " + errno_text());
    unregister_temp_file(w.temp_path);
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
