// GGUF reader, writer and dequantization. See kv/gguf.h.
//
// The file is untrusted input: every count, length, dimension and offset is checked against the
// bytes that remain before it is used, and a count is compared with what those bytes could hold
// at the least before anything is allocated for it, so a hostile header cannot make us allocate
// gigabytes or read past the mapping. The fuzz target tests/fuzz/fuzz_gguf.cpp exercises this.
#include "kv/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <type_traits>

#include "kv/error.h"
#include "kv/file.h"
#include "kvk/ops.h"

namespace kv {

static_assert(std::endian::native == std::endian::little,
              "the GGUF reader and writer assume a little-endian host");

// ---------------------------------------------------------------------------------------------
// Type tables

namespace {

struct TypeInfo {
  uint32_t id;
  const char* name;
  int64_t block_values;
  int64_t block_bytes;
};

// Every type ggml defines, with its block layout (ggml.c's type_traits). Ids 4, 5, 31-33 and
// 36-38 were removed from ggml and are unknown here, like any id not listed. Q8_1 is 36 bytes
// (f16 d, f16 s, 32 int8) as in ggml; it is an intermediate type never found in model files.
constexpr TypeInfo kTypes[] = {
    {0, "f32", 1, 4},         {1, "f16", 1, 2},         {2, "q4_0", 32, 18},
    {3, "q4_1", 32, 20},      {6, "q5_0", 32, 22},      {7, "q5_1", 32, 24},
    {8, "q8_0", 32, 34},      {9, "q8_1", 32, 36},      {10, "q2_K", 256, 84},
    {11, "q3_K", 256, 110},   {12, "q4_K", 256, 144},   {13, "q5_K", 256, 176},
    {14, "q6_K", 256, 210},   {15, "q8_K", 256, 292},   {16, "iq2_xxs", 256, 66},
    {17, "iq2_xs", 256, 74},  {18, "iq3_xxs", 256, 98}, {19, "iq1_s", 256, 50},
    {20, "iq4_nl", 32, 18},   {21, "iq3_s", 256, 110},  {22, "iq2_s", 256, 82},
    {23, "iq4_xs", 256, 136}, {24, "i8", 1, 1},         {25, "i16", 1, 2},
    {26, "i32", 1, 4},        {27, "i64", 1, 8},        {28, "f64", 1, 8},
    {29, "iq1_m", 256, 56},   {30, "bf16", 1, 2},       {34, "tq1_0", 256, 54},
    {35, "tq2_0", 256, 66},   {39, "mxfp4", 32, 17},    {40, "nvfp4", 64, 36},
    {41, "q1_0", 128, 18},
};

const TypeInfo* type_info(GgmlType t) {
  for (const TypeInfo& i : kTypes)
    if (i.id == uint32_t(t)) return &i;
  return nullptr;
}

std::string str(uint64_t v) {
  return std::to_string(v);
}

// A key or tensor name from the file, fit for a one-line message: control bytes become \xNN
// and very long names are cut.
std::string printable(const std::string& s) {
  constexpr size_t kMax = 96;
  std::string out;
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      char hex[5];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
    } else {
      out += char(c);
    }
  }
  if (s.size() > kMax) out += "...";
  return out;
}

std::string dims_text(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Bytes a metadata value of type `t` occupies at the least; 0 for an unknown type.
uint64_t min_value_bytes(uint32_t t) {
  switch (GgufType(t)) {
    case GgufType::UINT8:
    case GgufType::INT8:
    case GgufType::BOOL:
      return 1;
    case GgufType::UINT16:
    case GgufType::INT16:
      return 2;
    case GgufType::UINT32:
    case GgufType::INT32:
    case GgufType::FLOAT32:
      return 4;
    case GgufType::UINT64:
    case GgufType::INT64:
    case GgufType::FLOAT64:
      return 8;
    case GgufType::STRING:
      return 8;  // u64 length
    case GgufType::ARRAY:
      return 12;  // u32 element type + u64 count
  }
  return 0;
}

}  // namespace

const char* ggml_type_name(GgmlType t) {
  if (const TypeInfo* i = type_info(t)) return i->name;
  thread_local std::string unknown;
  unknown = "type " + str(uint32_t(t));
  return unknown.c_str();
}

bool ggml_type_layout(GgmlType t, int64_t* block_values, int64_t* block_bytes) {
  const TypeInfo* i = type_info(t);
  if (!i) return false;
  if (block_values) *block_values = i->block_values;
  if (block_bytes) *block_bytes = i->block_bytes;
  return true;
}

bool ggml_type_dequantizable(GgmlType t) {
  switch (t) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16:
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q4_K:
    case GgmlType::Q6_K:
      return true;
    default:
      return false;
  }
}

const char* gguf_type_name(GgufType t) {
  static const char* const names[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                      "int32",  "float32", "bool",   "string", "array",
                                      "uint64", "int64",   "float64"};
  return uint32_t(t) < std::size(names) ? names[uint32_t(t)] : "?";
}

// ---------------------------------------------------------------------------------------------
// GgufValue

namespace {
[[noreturn]] void wrong_type(const GgufValue& v, const std::string& key, const char* wanted) {
  throw Error(Exit::data,
              "metadata '" + printable(key) + "' is " + gguf_type_name(v.type) + ", not " + wanted);
}
}  // namespace

int64_t GgufValue::as_int(const std::string& key) const {
  if (const auto* u = std::get_if<uint64_t>(&v)) {
    if (*u > uint64_t(std::numeric_limits<int64_t>::max()))
      throw Error(Exit::data,
                  "metadata '" + printable(key) + "' value " + str(*u) + " is out of range");
    return int64_t(*u);
  }
  if (const auto* i = std::get_if<int64_t>(&v)) return *i;
  wrong_type(*this, key, "an integer");
}

double GgufValue::as_float(const std::string& key) const {
  if (const auto* d = std::get_if<double>(&v)) return *d;
  if (const auto* u = std::get_if<uint64_t>(&v)) return double(*u);
  if (const auto* i = std::get_if<int64_t>(&v)) return double(*i);
  wrong_type(*this, key, "a number");
}

bool GgufValue::as_bool(const std::string& key) const {
  if (const auto* b = std::get_if<bool>(&v)) return *b;
  wrong_type(*this, key, "a bool");
}

const std::string& GgufValue::as_string(const std::string& key) const {
  if (const auto* s = std::get_if<std::string>(&v)) return *s;
  wrong_type(*this, key, "a string");
}

const GgufValue::Array& GgufValue::as_array(const std::string& key) const {
  if (const auto* a = std::get_if<Array>(&v)) return *a;
  wrong_type(*this, key, "an array");
}

int64_t GgufTensor::elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;  // the parser checked that this does not overflow
  return n;
}

// ---------------------------------------------------------------------------------------------
// Parsing

namespace {

// Arrays of arrays are legal; deeper nesting than this is only seen in hostile files, where
// unbounded recursion would overflow the stack.
constexpr int kMaxArrayDepth = 8;

// Bounds-checked little-endian cursor over the file image. `where` names what is being read,
// for the truncation message.
class Reader {
 public:
  Reader(const uint8_t* p, size_t n, const std::string& file) : p_(p), n_(n), file_(file) {}

  size_t pos() const { return pos_; }
  uint64_t remaining() const { return n_ - pos_; }
  std::string where;

  [[noreturn]] void fail(const std::string& problem) const {
    throw Error(Exit::data, "'" + file_ + "': " + problem);
  }
  void need(uint64_t bytes) const {
    if (bytes > remaining())
      throw Error(Exit::data, "'" + file_ + "' is truncated (the file ends at byte " + str(n_) +
                                  ", inside " + where + ")");
  }
  template <class T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string string() {
    const uint64_t len = get<uint64_t>();
    if (len > remaining())
      fail("string of " + str(len) + " bytes in " + where + " runs past the end of the file (" +
           str(remaining()) + " bytes left; truncated?)");
    std::string s(reinterpret_cast<const char*>(p_ + pos_), size_t(len));
    pos_ += size_t(len);
    return s;
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  const std::string& file_;
};

GgufValue read_value(Reader& r, uint32_t type, int depth) {
  GgufValue out;
  out.type = GgufType(type);
  switch (GgufType(type)) {
    case GgufType::UINT8:
      out.v = uint64_t(r.get<uint8_t>());
      break;
    case GgufType::INT8:
      out.v = int64_t(r.get<int8_t>());
      break;
    case GgufType::UINT16:
      out.v = uint64_t(r.get<uint16_t>());
      break;
    case GgufType::INT16:
      out.v = int64_t(r.get<int16_t>());
      break;
    case GgufType::UINT32:
      out.v = uint64_t(r.get<uint32_t>());
      break;
    case GgufType::INT32:
      out.v = int64_t(r.get<int32_t>());
      break;
    case GgufType::UINT64:
      out.v = r.get<uint64_t>();
      break;
    case GgufType::INT64:
      out.v = r.get<int64_t>();
      break;
    case GgufType::FLOAT32:
      out.v = double(r.get<float>());
      break;
    case GgufType::FLOAT64:
      out.v = r.get<double>();
      break;
    case GgufType::BOOL: {
      const uint8_t b = r.get<uint8_t>();
      if (b > 1) r.fail(r.where + " has bool value " + str(b) + " (must be 0 or 1)");
      out.v = b == 1;
      break;
    }
    case GgufType::STRING:
      out.v = r.string();
      break;
    case GgufType::ARRAY: {
      if (depth >= kMaxArrayDepth)
        r.fail(r.where + " nests arrays more than " + str(kMaxArrayDepth) + " levels deep");
      const uint32_t elem = r.get<uint32_t>();
      const uint64_t min_bytes = min_value_bytes(elem);
      if (min_bytes == 0) r.fail(r.where + " is an array of unknown value type " + str(elem));
      out.elem_type = GgufType(elem);
      const uint64_t count = r.get<uint64_t>();
      // Checked before reserving: each element takes at least min_bytes of the file.
      if (count > r.remaining() / min_bytes)
        r.fail(r.where + " has an array count " + str(count) + " that the remaining " +
               str(r.remaining()) + " bytes cannot hold (truncated or corrupt)");
      GgufValue::Array a;
      a.reserve(size_t(count));
      for (uint64_t i = 0; i < count; ++i) a.push_back(read_value(r, elem, depth + 1));
      out.v = std::move(a);
      break;
    }
    default:
      r.fail(r.where + " has unknown value type " + str(type));
  }
  return out;
}

}  // namespace

GgufFile::GgufFile(const std::string& path) : name_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(Exit::no_input, "cannot open '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw Error(Exit::no_input, "cannot open '" + path + "': " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(Exit::no_input,
                "cannot open '" + path +
                    "': " + (S_ISDIR(st.st_mode) ? "Is a directory" : "not a regular file"));
  }
  if (st.st_size == 0) {  // mmap refuses length 0
    ::close(fd);
    throw Error(Exit::data, "'" + path + "' is not a GGUF file (it is empty)");
  }
  map_size_ = size_t(st.st_size);
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int e = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw Error(Exit::no_input, "cannot map '" + path + "': " + std::strerror(e));
  }
  try {
    parse(static_cast<const uint8_t*>(map_), map_size_);
  } catch (...) {
    ::munmap(map_, map_size_);  // the destructor does not run when a constructor throws
    map_ = nullptr;
    throw;
  }
}

GgufFile::GgufFile(const uint8_t* data, size_t size, const std::string& name) : name_(name) {
  parse(data, size);
}

GgufFile::~GgufFile() {
  if (map_) ::munmap(map_, map_size_);
}

const GgufValue& GgufFile::get(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end())
    throw Error(Exit::data, "'" + name_ + "': missing metadata '" + printable(key) + "'");
  return it->second;
}

const GgufTensor* GgufFile::find_tensor(const std::string& name) const {
  for (const GgufTensor& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

void GgufFile::parse(const uint8_t* data, size_t size) {
  Reader r(data, size, name_);
  if (size < 4 || std::memcmp(data, "GGUF", 4) != 0)
    throw Error(Exit::data, "'" + name_ + "' is not a GGUF file (bad magic)");
  r.get<uint32_t>();
  r.where = "the header";
  version_ = r.get<uint32_t>();
  if (version_ != 2 && version_ != 3) {
    // Big-endian GGUF files exist (s390x); their version reads byte-swapped here.
    const uint32_t swapped = __builtin_bswap32(version_);
    r.fail("unsupported GGUF version " + str(version_) +
           (swapped == 2 || swapped == 3 ? " (a big-endian file?)" : ""));
  }
  const uint64_t n_tensors = r.get<uint64_t>();
  const uint64_t n_kv = r.get<uint64_t>();

  // Smallest possible encodings: a key/value is a length, a type and one byte; a tensor info is
  // a name length, n_dims, one dim, a type and an offset.
  constexpr uint64_t kMinKv = 8 + 4 + 1, kMinTensor = 8 + 4 + 8 + 4 + 8;
  if (n_kv > r.remaining() / kMinKv)
    r.fail("metadata count " + str(n_kv) + " is more than the file can hold (corrupt header?)");
  if (n_tensors > r.remaining() / kMinTensor)
    r.fail("tensor count " + str(n_tensors) + " is more than the file can hold (corrupt header?)");

  for (uint64_t i = 0; i < n_kv; ++i) {
    r.where = "metadata entry #" + str(i);
    std::string key = r.string();
    if (key.empty()) r.fail("metadata entry #" + str(i) + " has an empty key");
    r.where = "metadata '" + printable(key) + "'";
    const uint32_t type = r.get<uint32_t>();
    GgufValue value = read_value(r, type, 0);
    if (!metadata_.emplace(key, std::move(value)).second)
      r.fail("duplicate metadata key '" + printable(key) + "'");
  }

  if (auto it = metadata_.find("general.alignment"); it != metadata_.end()) {
    const GgufValue& a = it->second;
    uint64_t v = 0;
    std::string shown;
    if (const auto* u = std::get_if<uint64_t>(&a.v)) {
      v = *u;
      shown = str(*u);
    } else if (const auto* i = std::get_if<int64_t>(&a.v)) {
      v = *i > 0 ? uint64_t(*i) : 0;
      shown = std::to_string(*i);
    } else {
      r.fail(std::string("general.alignment is ") + gguf_type_name(a.type) + ", not an integer");
    }
    // At most 2^31: larger alignments are never meant, and the bound keeps the arithmetic
    // below free of overflow.
    if (v == 0 || (v & (v - 1)) != 0 || v > (uint64_t(1) << 31))
      r.fail("general.alignment " + shown + " is not a power of two up to 2^31");
    alignment_ = uint64_t(v);
  }

  if (n_tensors > r.remaining() / kMinTensor)
    r.fail("tensor count " + str(n_tensors) + " is more than the rest of the file can hold");
  tensors_.reserve(size_t(n_tensors));
  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensor t;
    r.where = "tensor info #" + str(i);
    t.name = r.string();
    if (t.name.empty()) r.fail("tensor info #" + str(i) + " has an empty name");
    r.where = "tensor info '" + printable(t.name) + "'";
    const std::string what = "tensor '" + printable(t.name) + "'";
    const uint32_t n_dims = r.get<uint32_t>();
    if (n_dims < 1 || n_dims > 4)
      r.fail(what + " has " + str(n_dims) + " dimensions (GGUF allows 1 to 4)");
    int64_t elements = 1;
    bool overflow = false;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim = r.get<uint64_t>();
      if (dim == 0) r.fail(what + " has a zero dimension");
      if (dim > uint64_t(std::numeric_limits<int64_t>::max()))
        r.fail(what + " has dimension " + str(dim) + ", too large");
      t.dims.push_back(int64_t(dim));
      overflow |= __builtin_mul_overflow(elements, int64_t(dim), &elements);
    }
    if (overflow) r.fail(what + " has dims " + dims_text(t.dims) + " whose product overflows");
    const uint32_t type = r.get<uint32_t>();
    t.type = GgmlType(type);
    int64_t block_values = 0, block_bytes = 0;
    if (!ggml_type_layout(t.type, &block_values, &block_bytes))
      r.fail(what + " has unknown type id " + str(type));
    if (t.dims[0] % block_values != 0)
      r.fail(what + " of type " + ggml_type_name(t.type) +
             " has dims[0] = " + str(uint64_t(t.dims[0])) + ", not a multiple of the block size " +
             str(uint64_t(block_values)));
    int64_t bytes = 0;
    if (__builtin_mul_overflow(elements / block_values, block_bytes, &bytes))
      r.fail(what + " has dims " + dims_text(t.dims) + " whose byte size overflows");
    t.bytes = uint64_t(bytes);
    t.offset = r.get<uint64_t>();
    if (!names.insert(t.name).second) r.fail("duplicate tensor name '" + printable(t.name) + "'");
    tensors_.push_back(std::move(t));
  }

  // The data section starts at the first multiple of the alignment after the tensor infos. With
  // no tensors the file may end before that point.
  data_offset_ = (uint64_t(r.pos()) + alignment_ - 1) / alignment_ * alignment_;
  for (GgufTensor& t : tensors_) {
    if (t.offset % alignment_ != 0)
      r.fail("tensor '" + printable(t.name) + "' offset " + str(t.offset) +
             " is not a multiple of the alignment " + str(alignment_));
    const uint64_t end = size;
    if (data_offset_ > end || t.offset > end - data_offset_ ||
        t.bytes > end - data_offset_ - t.offset) {
      // Absolute position when it is representable, else the relative offset as stored.
      uint64_t abs = 0;
      const bool fits = !__builtin_add_overflow(data_offset_, t.offset, &abs);
      r.fail("tensor '" + printable(t.name) + "' data (offset " +
             (fits ? str(abs) : "data + " + str(t.offset)) + ", " + str(t.bytes) +
             " bytes) runs past the end of the file (truncated?)");
    }
    t.data = data + data_offset_ + t.offset;
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantization (block layouts as ggml's ggml-common.h; arithmetic as ggml-quants.c's
// dequantize_row_*, in the same order, so results match ggml bit for bit without FMA
// contraction).

namespace {

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return kvk::f16_to_f32(h);
}

// Q8_0: f16 d, int8 q[32]; x = d * q.
void dequant_q8_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const auto* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = float(q[j]) * d;
}

// Q4_0: f16 d, 16 bytes; the low nibbles are values 0..15, the high nibbles 16..31;
// x = (q - 8) * d.
void dequant_q4_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const uint8_t* q = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = float(int(q[j] & 0x0F) - 8) * d;
    y[j + 16] = float(int(q[j] >> 4) - 8) * d;
  }
}

// Q4_K: f16 d, f16 dmin, 12 bytes of packed 6-bit (scale, min) pairs for 8 sub-blocks of 32,
// 128 bytes of nibbles. Sub-block j: x = d * scale_j * q - dmin * min_j. Sub-blocks 2i and 2i+1
// share 32 bytes of qs: 2i takes the low nibbles, 2i+1 the high ones.
// Scales: for j < 4, scale = s[j] & 63 and min = s[j+4] & 63; for j >= 4 the low four bits come
// from s[j+4] (scale: low nibble, min: high nibble) and the top two bits from the spare top bits
// of s[j-4] (scale) and s[j] (min).
void q4_k_scale_min(int j, const uint8_t* s, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = uint8_t((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
    *min = uint8_t((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

void dequant_q4_k(const uint8_t* b, float* y) {
  const float d = load_f16(b), dmin = load_f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0; j < 8; j += 2, q += 32) {
    uint8_t sc, m;
    q4_k_scale_min(j, scales, &sc, &m);
    const float d1 = d * float(sc), m1 = dmin * float(m);
    q4_k_scale_min(j + 1, scales, &sc, &m);
    const float d2 = d * float(sc), m2 = dmin * float(m);
    for (int l = 0; l < 32; ++l) *y++ = d1 * float(q[l] & 0x0F) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * float(q[l] >> 4) - m2;
  }
}

// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one per 16 values), f16 d.
// Each half of 128 values uses 64 bytes of ql, 32 of qh and 8 scales: for l in 0..31,
//   value l      = ql[l]    low nibble | qh[l] bits 0-1 << 4
//   value l + 32 = ql[l+32] low nibble | qh[l] bits 2-3 << 4
//   value l + 64 = ql[l]    high nibble | qh[l] bits 4-5 << 4
//   value l + 96 = ql[l+32] high nibble | qh[l] bits 6-7 << 4
// each minus 32, times d * scale of its group of 16.
void dequant_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = load_f16(b + 208);
  for (int half = 0; half < 2; ++half, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = int((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = int((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = int((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = int((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * float(sc[is]) * float(q1);
      y[l + 32] = d * float(sc[is + 2]) * float(q2);
      y[l + 64] = d * float(sc[is + 4]) * float(q3);
      y[l + 96] = d * float(sc[is + 6]) * float(q4);
    }
  }
}

template <class Fn>
void per_block(const void* src, float* dst, int64_t blocks, int64_t block_values,
               int64_t block_bytes, Fn fn) {
  const auto* s = static_cast<const uint8_t*>(src);
#pragma omp parallel for schedule(static) if (blocks > 16384)
  for (int64_t i = 0; i < blocks; ++i) fn(s + i * block_bytes, dst + i * block_values);
}

// 16-bit floats: the kernels' vector path wants 2-byte aligned input; a GGUF with alignment 1
// (legal) or an in-memory image can place a tensor at an odd address.
void dequant_16bit(kvk::DType t, const void* src, float* dst, int64_t n) {
  if (reinterpret_cast<uintptr_t>(src) % 2 == 0) {
    kvk::cpu_ops().to_f32(t, src, dst, size_t(n));
    return;
  }
  const auto* s = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, s + 2 * i, 2);
    dst[i] = t == kvk::DType::f16 ? kvk::f16_to_f32(h) : kvk::bf16_to_f32(h);
  }
}

}  // namespace

void dequantize(GgmlType type, const void* src, float* dst, int64_t n) {
  int64_t bv = 0, bb = 0;
  if (!ggml_type_dequantizable(type) || !ggml_type_layout(type, &bv, &bb))
    throw Error(Exit::data, std::string("cannot dequantize tensor type ") + ggml_type_name(type) +
                                " (kvtk supports f32, f16, bf16, q8_0, q4_0, q4_K, q6_K)");
  if (n < 0 || n % bv != 0)
    throw Error(Exit::data, "cannot dequantize " + std::to_string(n) + " values of type " +
                                ggml_type_name(type) + ": not a multiple of its block size " +
                                std::to_string(bv));
  if (n == 0) return;
  const int64_t blocks = n / bv;
  switch (type) {
    case GgmlType::F32:
      std::memcpy(dst, src, size_t(n) * 4);
      break;
    case GgmlType::F16:
      dequant_16bit(kvk::DType::f16, src, dst, n);
      break;
    case GgmlType::BF16:
      dequant_16bit(kvk::DType::bf16, src, dst, n);
      break;
    case GgmlType::Q8_0:
      per_block(src, dst, blocks, bv, bb, dequant_q8_0);
      break;
    case GgmlType::Q4_0:
      per_block(src, dst, blocks, bv, bb, dequant_q4_0);
      break;
    case GgmlType::Q4_K:
      per_block(src, dst, blocks, bv, bb, dequant_q4_k);
      break;
    case GgmlType::Q6_K:
      per_block(src, dst, blocks, bv, bb, dequant_q6_k);
      break;
    default:
      break;  // excluded by ggml_type_dequantizable above
  }
}

std::vector<float> dequantize(const GgufTensor& t) {
  if (!ggml_type_dequantizable(t.type))
    throw Error(Exit::data, "tensor '" + printable(t.name) + "' has type " +
                                ggml_type_name(t.type) +
                                ", which kvtk cannot dequantize (it supports f32, f16, bf16, q8_0, "
                                "q4_0, q4_K, q6_K)");
  std::vector<float> out(size_t(t.elements()));
  dequantize(t.type, t.data, out.data(), t.elements());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writer

namespace {

template <class T>
void put(std::vector<uint8_t>& out, T v) {
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}

void put_string(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

template <class T>
std::vector<uint8_t> scalar(GgufType type, T v) {
  std::vector<uint8_t> out;
  put<uint32_t>(out, uint32_t(type));
  put<T>(out, v);
  return out;
}

template <class T>
std::vector<uint8_t> array(GgufType elem, const std::vector<T>& v) {
  std::vector<uint8_t> out;
  put<uint32_t>(out, uint32_t(GgufType::ARRAY));
  put<uint32_t>(out, uint32_t(elem));
  put<uint64_t>(out, v.size());
  for (const T& x : v) {
    if constexpr (std::is_same_v<T, std::string>)
      put_string(out, x);
    else
      put<T>(out, x);
  }
  return out;
}

}  // namespace

void GgufWriter::set(const std::string& key, std::vector<uint8_t> typed_value) {
  if (key.empty()) throw Error(Exit::software, "GgufWriter: empty metadata key");
  for (auto& [k, v] : kv_)
    if (k == key) {
      v = std::move(typed_value);
      return;
    }
  kv_.emplace_back(key, std::move(typed_value));
}

void GgufWriter::set_uint32(const std::string& key, uint32_t v) {
  set(key, scalar(GgufType::UINT32, v));
}
void GgufWriter::set_int32(const std::string& key, int32_t v) {
  set(key, scalar(GgufType::INT32, v));
}
void GgufWriter::set_float32(const std::string& key, float v) {
  set(key, scalar(GgufType::FLOAT32, v));
}
void GgufWriter::set_uint64(const std::string& key, uint64_t v) {
  set(key, scalar(GgufType::UINT64, v));
}
void GgufWriter::set_bool(const std::string& key, bool v) {
  set(key, scalar(GgufType::BOOL, uint8_t(v)));
}
void GgufWriter::set_string(const std::string& key, const std::string& v) {
  std::vector<uint8_t> out;
  put<uint32_t>(out, uint32_t(GgufType::STRING));
  put_string(out, v);
  set(key, std::move(out));
}
void GgufWriter::set_strings(const std::string& key, const std::vector<std::string>& v) {
  set(key, array(GgufType::STRING, v));
}
void GgufWriter::set_float32s(const std::string& key, const std::vector<float>& v) {
  set(key, array(GgufType::FLOAT32, v));
}
void GgufWriter::set_int32s(const std::string& key, const std::vector<int32_t>& v) {
  set(key, array(GgufType::INT32, v));
}

void GgufWriter::add_tensor(const std::string& name, const std::vector<int64_t>& dims,
                            GgmlType type, const void* data, size_t bytes) {
  const std::string what = "GgufWriter: tensor '" + name + "'";
  if (name.empty()) throw Error(Exit::software, "GgufWriter: empty tensor name");
  for (const Tensor& t : tensors_)
    if (t.name == name)
      throw Error(Exit::software, "GgufWriter: duplicate tensor name '" + name + "'");
  if (dims.empty() || dims.size() > 4)
    throw Error(Exit::software,
                what + " has " + std::to_string(dims.size()) + " dims (1 to 4 allowed)");
  int64_t bv = 0, bb = 0;
  if (!ggml_type_layout(type, &bv, &bb))
    throw Error(Exit::software, what + " has unknown type id " + std::to_string(uint32_t(type)));
  int64_t elements = 1;
  for (int64_t d : dims)
    if (d <= 0 || __builtin_mul_overflow(elements, d, &elements))
      throw Error(Exit::software, what + " has invalid dims " + dims_text(dims));
  if (dims[0] % bv != 0)
    throw Error(Exit::software, what + " of type " + ggml_type_name(type) +
                                    " needs dims[0] a multiple of " + std::to_string(bv));
  if (uint64_t(elements / bv) * uint64_t(bb) != bytes)
    throw Error(Exit::software, what + " has " + std::to_string(bytes) + " bytes; dims " +
                                    dims_text(dims) + " of type " + ggml_type_name(type) +
                                    " need " +
                                    std::to_string(uint64_t(elements / bv) * uint64_t(bb)));
  const auto* p = static_cast<const uint8_t*>(data);
  tensors_.push_back({name, dims, type, std::vector<uint8_t>(p, p + bytes)});
}

std::vector<uint8_t> GgufWriter::bytes() const {
  auto pad = [](std::vector<uint8_t>& out) {
    out.resize((out.size() + alignment - 1) / alignment * alignment, 0);
  };
  std::vector<uint8_t> out{'G', 'G', 'U', 'F'};
  put<uint32_t>(out, 3);
  put<uint64_t>(out, tensors_.size());
  put<uint64_t>(out, kv_.size());
  for (const auto& [key, value] : kv_) {
    put_string(out, key);
    out.insert(out.end(), value.begin(), value.end());
  }
  uint64_t offset = 0;
  for (const Tensor& t : tensors_) {
    put_string(out, t.name);
    put<uint32_t>(out, uint32_t(t.dims.size()));
    for (int64_t d : t.dims) put<uint64_t>(out, uint64_t(d));
    put<uint32_t>(out, uint32_t(t.type));
    put<uint64_t>(out, offset);
    offset += (t.data.size() + alignment - 1) / alignment * alignment;
  }
  pad(out);
  for (const Tensor& t : tensors_) {
    out.insert(out.end(), t.data.begin(), t.data.end());
    pad(out);  // as ggml and gguf-py do, also after the last tensor
  }
  return out;
}

void GgufWriter::write(const std::string& path) const {
  const std::vector<uint8_t> image = bytes();
  write_file_atomically(path, image.data(), image.size());
}

}  // namespace kv
