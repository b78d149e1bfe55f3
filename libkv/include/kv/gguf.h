// GGUF v2/v3 reader: header, metadata key/values, tensor infos, memory-mapped tensor data, and
// dequantization of the common weight types. Every length, count and offset read from the file
// is checked against the file's size before use (the file is untrusted; a fuzzer runs on it).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

namespace kv {

// ggml tensor types (values as in ggml.h).
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};
const char* ggml_type_name(GgmlType t);  // "f32", "q4_K", ... or "type N"
// Values per block and bytes per block; false for types kvtk cannot dequantize.
bool ggml_type_layout(GgmlType t, int64_t* block_values, int64_t* block_bytes);

// One metadata value. Arrays hold a homogeneous list of scalars or strings.
struct GgufValue {
  using Array = std::vector<GgufValue>;
  std::variant<uint64_t, int64_t, double, bool, std::string, Array> v;
  // Checked accessors: throw Error(Exit::data) naming `key` when the type does not fit.
  int64_t as_int(const std::string& key) const;
  double as_float(const std::string& key) const;
  bool as_bool(const std::string& key) const;
  const std::string& as_string(const std::string& key) const;
  const Array& as_array(const std::string& key) const;
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the contiguous (fastest) dimension
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;        // relative to the start of the data section
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

 private:
  void parse(const uint8_t* data, size_t size);
  std::string name_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensor> tensors_;
};

// Dequantizes `n` values (a multiple of the type's block size) starting at `src` into dst.
// Throws Error(Exit::data) for a type kvtk does not support.
void dequantize(GgmlType type, const void* src, float* dst, int64_t n);

}  // namespace kv
