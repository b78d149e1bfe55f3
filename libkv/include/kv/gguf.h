// GGUF v2/v3 reader: header, metadata key/values, tensor infos, memory-mapped tensor data, and
// dequantization of the common weight types. Every length, count and offset read from the file
// is checked against the file's size before use (the file is untrusted; a fuzzer runs on it).
// GgufWriter writes GGUF v3 files (models for tests and benchmarks).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

namespace kv {

// ggml tensor types (values as in ggml.h). Other ids that ggml defines (IQ*, TQ*, I8..I64, F64,
// MXFP4, ...) have a layout in gguf.cpp's table too, so files holding them parse; they are only
// missing from this enum because nothing in kvtk names them.
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  BF16 = 30,
};
// "f32", "q4_K", ... or "type N" for an id ggml does not define (that string lives in a
// thread-local buffer, valid until the next such call on the same thread).
const char* ggml_type_name(GgmlType t);
// Values per block and bytes per block of any type ggml defines; false for an unknown id.
bool ggml_type_layout(GgmlType t, int64_t* block_values, int64_t* block_bytes);
// Whether dequantize() supports the type: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K.
bool ggml_type_dequantizable(GgmlType t);

// GGUF metadata value types (values as in the GGUF spec).
enum class GgufType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};
const char* gguf_type_name(GgufType t);  // "uint32", "string", ... or "?"

// One metadata value. Arrays hold a homogeneous list of scalars, strings or arrays. Unsigned
// integers are held as uint64_t, signed ones as int64_t, floats as double; `type` keeps the type
// the file used (and `elem_type` an array's element type, known even when it is empty).
struct GgufValue {
  using Array = std::vector<GgufValue>;
  std::variant<uint64_t, int64_t, double, bool, std::string, Array> v;
  GgufType type = GgufType::UINT64;
  GgufType elem_type = GgufType::UINT8;  // arrays only
  // Checked accessors: throw Error(Exit::data) naming `key` when the type does not fit.
  int64_t as_int(const std::string& key) const;   // any integer type that fits in int64
  double as_float(const std::string& key) const;  // floats and integers
  bool as_bool(const std::string& key) const;
  const std::string& as_string(const std::string& key) const;
  const Array& as_array(const std::string& key) const;
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the contiguous (fastest) dimension
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;  // relative to the start of the data section
  uint64_t bytes = 0;
  const uint8_t* data = nullptr;  // into the mapping
  int64_t elements() const;
};

class GgufFile {
 public:
  // Maps and parses `path`; throws Error(66) if unreadable, Error(65) if malformed.
  explicit GgufFile(const std::string& path);
  // Parses an in-memory image (not copied; must outlive this object). For tests and fuzzing.
  GgufFile(const uint8_t* data, size_t size, const std::string& name);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  bool has(const std::string& key) const { return metadata_.count(key) != 0; }
  const GgufValue& get(const std::string& key) const;  // Error(65) "missing metadata 'key'"
  const GgufTensor* find_tensor(const std::string& name) const;  // null if absent
  const std::string& name() const { return name_; }
  // Absolute file offset of the data section (tensor offsets are relative to it).
  uint64_t data_offset() const { return data_offset_; }

 private:
  void parse(const uint8_t* data, size_t size);
  std::string name_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensor> tensors_;
};

// Dequantizes `n` values (a multiple of the type's block size) starting at `src` into dst.
// Throws Error(Exit::data) for a type kvtk does not support.
void dequantize(GgmlType type, const void* src, float* dst, int64_t n);
// Dequantizes a whole tensor into a new vector (Error(Exit::data) naming the tensor for an
// unsupported type).
std::vector<float> dequantize(const GgufTensor& t);

// Builds a GGUF v3 file (alignment 32) in memory and writes it. Metadata keeps the order keys
// were first set (setting a key again replaces its value); tensor data is copied and laid out
// in the order added, each padded to the alignment. Misuse (a duplicate tensor name, a byte
// count that does not match the dims and type) throws Error(Exit::software).
class GgufWriter {
 public:
  void set_uint32(const std::string& key, uint32_t v);
  void set_int32(const std::string& key, int32_t v);
  void set_float32(const std::string& key, float v);
  void set_uint64(const std::string& key, uint64_t v);
  void set_bool(const std::string& key, bool v);
  void set_string(const std::string& key, const std::string& v);
  void set_strings(const std::string& key, const std::vector<std::string>& v);
  void set_float32s(const std::string& key, const std::vector<float>& v);
  void set_int32s(const std::string& key, const std::vector<int32_t>& v);

  // `dims` in ggml order (dims[0] contiguous); `data` holds the tensor's `bytes` raw bytes.
  void add_tensor(const std::string& name, const std::vector<int64_t>& dims, GgmlType type,
                  const void* data, size_t bytes);

  // The whole file image.
  std::vector<uint8_t> bytes() const;
  // Writes to a temporary file beside `path`, then renames it over `path`.
  // Error(73) if it cannot be created, Error(74) if writing fails.
  void write(const std::string& path) const;

  static constexpr uint64_t alignment = 32;

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> dims;
    GgmlType type;
    std::vector<uint8_t> data;
  };
  void set(const std::string& key, std::vector<uint8_t> typed_value);
  std::vector<std::pair<std::string, std::vector<uint8_t>>> kv_;  // key, type id + value bytes
  std::vector<Tensor> tensors_;
};

}  // namespace kv
