#include "h5.h"

#include <mutex>

#include "kv/str.h"

namespace kv::h5 {

void init_library() {
  static std::once_flag once;
  std::call_once(once, [] {
    // No clean-up at exit: after a close that failed (disk full, a file size limit), HDF5
    // 1.10's own clean-up crashes on the half-closed file (SIGSEGV in H5F__close_cb, after our
    // error message). Every file is closed or discarded explicitly before then; the kernel
    // releases the rest. Must come before anything else initializes the library.
    H5dont_atexit();
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  });
}

hid_t check(hid_t id, Exit code, const std::string& what) {
  if (id < 0) throw Error(code, what);
  return id;
}
void check(herr_t status, Exit code, const std::string& what) {
  if (status < 0) throw Error(code, what);
}

namespace {
// A 16-bit IEEE-style float: sign bit 15, exponent at 10 (f16) or 7 (bf16). h5py maps the f16
// layout to numpy float16.
hid_t make_half(size_t exp_bits, size_t mant_bits, size_t bias) {
  hid_t t = H5Tcopy(H5T_IEEE_F32LE);
  H5Tset_fields(t, 15, mant_bits, exp_bits, 0, mant_bits);
  H5Tset_size(t, 2);
  H5Tset_ebias(t, bias);
  H5Tlock(t);
  return t;
}
}  // namespace

hid_t file_type(DType t) {
  static const hid_t f16 = make_half(5, 10, 15);
  static const hid_t bf16 = make_half(8, 7, 127);
  switch (t) {
    case DType::f16:
      return f16;
    case DType::bf16:
      return bf16;
    case DType::f32:
      break;
  }
  return H5T_IEEE_F32LE;
}

DType dtype_of(hid_t type, const std::string& what) {
  if (H5Tget_class(type) == H5T_FLOAT && H5Tget_order(type) == H5T_ORDER_LE) {
    if (H5Tequal(type, H5T_IEEE_F32LE) > 0) return DType::f32;
    if (H5Tequal(type, file_type(DType::f16)) > 0) return DType::f16;
    if (H5Tequal(type, file_type(DType::bf16)) > 0) return DType::bf16;
  }
  throw Error(Exit::data, what + " is not stored as little-endian f32, f16 or bf16");
}

bool exists(hid_t loc, const std::string& name) {
  return H5Lexists(loc, name.c_str(), H5P_DEFAULT) > 0;
}

bool has_attr(hid_t obj, const char* name) {
  return H5Aexists(obj, name) > 0;
}

namespace {
void write_attr_raw(hid_t obj, const char* name, hid_t type, hid_t space, const void* data) {
  if (has_attr(obj, name)) H5Adelete(obj, name);
  Handle a(check(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), Exit::io,
                 str("cannot create attribute '", name, "'")),
           H5Aclose);
  check(H5Awrite(a, type, data), Exit::io, str("cannot write attribute '", name, "'"));
}

Handle open_attr(hid_t obj, const char* name, const std::string& where) {
  if (!has_attr(obj, name)) throw Error(Exit::data, str(where, " has no attribute '", name, "'"));
  return Handle(check(H5Aopen(obj, name, H5P_DEFAULT), Exit::data,
                      str(where, ": cannot open attribute '", name, "'")),
                H5Aclose);
}

int64_t attr_elements(hid_t a) {
  Handle space(H5Aget_space(a), H5Sclose);
  return H5Sget_simple_extent_npoints(space);
}
}  // namespace

void write_attr(hid_t obj, const char* name, const std::string& value) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, value.size() + 1);
  H5Tset_strpad(type, H5T_STR_NULLTERM);
  H5Tset_cset(type, H5T_CSET_UTF8);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  write_attr_raw(obj, name, type, space, value.c_str());
}

void write_attr(hid_t obj, const char* name, int64_t value) {
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  write_attr_raw(obj, name, H5T_NATIVE_INT64, space, &value);
}

void write_attr(hid_t obj, const char* name, double value) {
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  write_attr_raw(obj, name, H5T_NATIVE_DOUBLE, space, &value);
}

void write_attr(hid_t obj, const char* name, const std::vector<int32_t>& values) {
  hsize_t n = values.size();
  Handle space(H5Screate_simple(1, &n, nullptr), H5Sclose);
  write_attr_raw(obj, name, H5T_NATIVE_INT32, space, values.data());
}

std::string read_attr_string(hid_t obj, const char* name, const std::string& where) {
  Handle a = open_attr(obj, name, where);
  Handle type(H5Aget_type(a), H5Tclose);
  if (H5Tget_class(type) != H5T_STRING || attr_elements(a) != 1)
    throw Error(Exit::data, str(where, ": attribute '", name, "' is not a string"));
  std::string out;
  if (H5Tis_variable_str(type) > 0) {
    char* p = nullptr;
    Handle mem(H5Tget_native_type(type, H5T_DIR_ASCEND), H5Tclose);
    check(H5Aread(a, mem, &p), Exit::data, str(where, ": cannot read attribute '", name, "'"));
    if (p) out = p;
    H5free_memory(p);
  } else {
    out.resize(H5Tget_size(type));
    check(H5Aread(a, type, out.data()), Exit::data,
          str(where, ": cannot read attribute '", name, "'"));
    out.resize(out.find('\0') == std::string::npos ? out.size() : out.find('\0'));
  }
  return out;
}

int64_t read_attr_int(hid_t obj, const char* name, const std::string& where) {
  Handle a = open_attr(obj, name, where);
  Handle type(H5Aget_type(a), H5Tclose);
  if (H5Tget_class(type) != H5T_INTEGER || attr_elements(a) != 1)
    throw Error(Exit::data, str(where, ": attribute '", name, "' is not an integer"));
  int64_t v = 0;
  check(H5Aread(a, H5T_NATIVE_INT64, &v), Exit::data,
        str(where, ": cannot read attribute '", name, "'"));
  return v;
}

double read_attr_double(hid_t obj, const char* name, const std::string& where) {
  Handle a = open_attr(obj, name, where);
  Handle type(H5Aget_type(a), H5Tclose);
  auto cls = H5Tget_class(type);
  if ((cls != H5T_FLOAT && cls != H5T_INTEGER) || attr_elements(a) != 1)
    throw Error(Exit::data, str(where, ": attribute '", name, "' is not a number"));
  double v = 0;
  check(H5Aread(a, H5T_NATIVE_DOUBLE, &v), Exit::data,
        str(where, ": cannot read attribute '", name, "'"));
  return v;
}

std::vector<int32_t> read_attr_ints(hid_t obj, const char* name, const std::string& where) {
  Handle a = open_attr(obj, name, where);
  Handle type(H5Aget_type(a), H5Tclose);
  if (H5Tget_class(type) != H5T_INTEGER)
    throw Error(Exit::data, str(where, ": attribute '", name, "' is not integers"));
  std::vector<int32_t> v(attr_elements(a));
  check(H5Aread(a, H5T_NATIVE_INT32, v.data()), Exit::data,
        str(where, ": cannot read attribute '", name, "'"));
  return v;
}

}  // namespace kv::h5
