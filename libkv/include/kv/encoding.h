// Encodings of a layer's k or v: how the [N, D] values are stored (formats/kvsnap.md section 9;
// formulas in man/kv-compress.1). Every scheme works per KV head on the head's rows
// [off[h], off[h+1]) and stores packed codes, so the bytes on disk shrink for real:
//  - uniform: b-bit integer groups (quant.h) along a token's channels (axis "token") or along a
//    channel's tokens (axis "channel"), the most recent `residual` rows of each head kept dense;
//  - kivi: uniform with KIVI's layout, keys per channel and values per token;
//  - q8_0, q4_0: llama.cpp's blocks over each head's row-major values;
//  - fp8: e4m3 or e5m2 with one f32 scale per tensor or per head;
//  - svd: per head truncated SVD, X ~ A B^T with A [n, r] and B [D, r];
//  - kvquant: KVQuant-style non-uniform levels fitted by 1-D k-means, keys per channel (before
//    RoPE), values per token (scaled by their largest magnitude, levels shared per head), with
//    the values outside each vector's central quantiles kept exact in a sparse list;
//  - mikv: MiKV-style mixed precision, the rows that received the most attention (attention
//    statistics) at high_bits, the others at bits, both uniform along tokens;
//  - minicache: written by kv-merge -m minicache only: of a pair of adjacent layers, the later
//    one stores, for each merged row, only its norm (the direction is the earlier layer's row),
//    and retained rows as they are; readers give back the dense tensor;
//  - paged: written by kv-offload only: dense rows, some of whose pages live in a page store on
//    disk. Readers fetch them and give back the dense tensor in its dtype, with a dense
//    encoding, so rewriting a paged snapshot restores it;
//  - external: written by kv-offload only: an encoded tensor (any scheme above but paged) moved
//    whole into a page store as one object; readers fetch it and give back the inner encoding.

// Hadamard rotation (rows times H_D / sqrt(D)) may precede uniform, kivi, q8_0, q4_0 and fp8;
// decoding undoes it. svd may factorize keys before RoPE (un-rotated with the positions).
//
// Tools see decoded values: SnapshotReader decodes an encoded k or v into an f32 Tensor and keeps
// its Encoding in the Layer; SnapshotWriter encodes a Layer whose Encoding is not dense. So a tool
// that transforms a cache (kv-evict, kv-merge) keeps its encoding by re-encoding what it keeps.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kv/tensor.h"

namespace kv {

struct ModelInfo;

struct Encoding {
  std::string scheme = "dense";  // dense, uniform, kivi, q8_0, q4_0, fp8, svd, kvquant, mikv
  int bits = 0;                  // uniform, kivi, mikv: 2, 3, 4 or 8; kvquant: 2, 3 or 4
  int group = 0;                 // uniform, kivi, mikv: values per f16 scale (and zero)
  bool symmetric = false;        // uniform: no zero point
  std::string axis;              // uniform, kivi: "token" (a row's channels) or "channel"
  int residual = 0;              // uniform, kivi: most recent rows of each head kept dense (f16)
  bool hadamard = false;         // uniform, kivi, q8_0, q4_0, fp8: rotate rows first
  std::string fp8_format;        // fp8: "e4m3" or "e5m2"
  std::string scale_scope;       // fp8: "tensor" or "head"
  int rank = 0;                  // svd: rank per head (capped by the head's rows and D), or 0
  double energy = 0;             // svd, when rank = 0: smallest rank keeping this share of sum s^2
  std::string factors;           // svd: "f16" or "f32"
  bool pre_rope = false;         // svd, kvquant on keys: encode un-rotated keys
  double outliers = 0;           // kvquant: share of each vector's values kept exact (sparse)
  int high_bits = 0;             // mikv: bits of the important rows (`bits`: the others)
  double high_share = 0;         // mikv: share of each head's rows kept at high_bits
  int page_size = 0;             // paged: entries per page
  std::string store;             // paged: the page store directory (kv/page_store.h)
  std::string dtype;             // paged, minicache: the dense dtype of the rows
  int partner = -1;              // minicache: the earlier layer holding the shared directions
  std::string inner;             // external: the scheme of the tensor in the store (the other
                                 // fields are that scheme's, plus `store`)

  bool dense() const { return scheme == "dense"; }
  // external: the encoding of the tensor in the store.
  Encoding inner_encoding() const;
  // "kivi bits=2 group=32 axis=channel residual=128": scheme and the parameters it uses.
  std::string describe() const;
  bool operator==(const Encoding&) const = default;
};

// The scheme names this kvtk knows, and each one's defaults for k ("k") or v ("v"): uniform 4-bit
// asymmetric groups of 32 along tokens; kivi 2-bit, group 32, residual 128, keys per channel and
// values per token; fp8 e4m3 with a scale per head; svd keeping 99% of the energy, f16 factors;
// kvquant 3-bit, 1% outliers, keys before RoPE; mikv 20% of rows at 8 bits, the rest at 2,
// groups of 32 along tokens.
// Throws Error(Exit::usage) for an unknown name.
Encoding default_encoding(const std::string& scheme, char role);
// The dtype a paged encoding's `dtype` names: "f32", "bf16", else f16.
DType dense_dtype(const std::string& name);
const std::vector<std::string>& scheme_names();

// Throws Error(Exit::usage) naming the parameter unless `e` can encode [*, D] heads of `model`:
// bits in {2,3,4,8}, group >= 1 (on axis token, min(group, D) must divide D), residual >= 0,
// rank in [0, D], energy in (0, 1] when rank is 0, hadamard only with D a power of two, pre_rope
// only for svd keys, known fp8 format and scale scope.
void check_encoding(const Encoding& e, const ModelInfo& model, char role);

// One named array of an encoded tensor, stored as a 1-D HDF5 dataset of its type.
struct CodeArray {
  enum class Type : uint8_t { u8, f16, f32, i32 } type = Type::u8;
  std::string name;
  std::vector<uint8_t> bytes;  // little-endian elements
  static size_t element_size(Type t) { return t == Type::u8 ? 1 : t == Type::f16 ? 2 : 4; }
  int64_t count() const { return int64_t(bytes.size() / element_size(type)); }
};

struct Encoded {
  Encoding encoding;
  std::vector<CodeArray> arrays;
  int64_t bytes() const;  // sum of the arrays' bytes
};

// Everything but the values that encoding and decoding need: the layer's row layout, its
// positions (for pre-RoPE keys) and the model (head_dim, RoPE).
struct RowLayout {
  const ModelInfo& model;
  const std::vector<int64_t>& head_offsets;
  const std::vector<int32_t>& positions;
  const float* importance = nullptr;  // [N], mikv's encoder: attention each entry received
};

// What mikv ranks entries by: the attention each received from the query heads of its KV head,
// summed over later prompt queries (attn_acc, as H2O). Throws Error(Exit::data) when the layer
// has no attention statistics.
std::vector<float> entry_importance(const ModelInfo& model, const std::vector<int64_t>& offsets,
                                    const std::vector<int32_t>& positions, const Tensor& attn_acc);

// Encodes x [N, D] (N = head_offsets.back()). Throws Error(Exit::data) for NaN/Inf or values a
// scheme cannot represent, Error(Exit::usage) for parameters check_encoding rejects.
// x is f32, f16 or bf16, [N, D]: encoders read it in tiles, never as a whole f32 copy.
Encoded encode(const Encoding& e, const Tensor& x, const RowLayout& rows);
Encoded encode(const Encoding& e, const float* x, const RowLayout& rows);
// Hands the arrays' storage back for reuse by later encodes (a streaming writer encodes layer
// after layer of about the same size); `enc` is left empty.
void recycle(Encoded&& enc);

// minicache (kv-merge -m minicache) decodes against its partner layer's same tensor, `partner`
// [N, D] f32: merged rows are the partner's direction at their own norm.
void decode_minicache(const Encoded& enc, int64_t n_rows, int dim, const float* partner,
                      float* out);

// The heads of a layer's k and v as views into their arrays for kvk::attend_head_kivi2, when
// both are 2-bit uniform codes as KIVI lays them out (kivi, or uniform with the same choices):
// keys grouped along the rows per channel and values along the channels per row, in groups of
// 32, not rotated, with one residual; empty otherwise. The views live as long as k and v.
// Throws Error(Exit::data) like decode when an array is missing or has the wrong length.
std::vector<kvk::Kivi2Head> kivi2_heads(const Encoded& k, const Encoded& v, const RowLayout& rows);

// Decodes into out [N, D]. Throws Error(Exit::data) naming the array when an array is missing or
// has the wrong length for the layout, or a per-head value (rank) is out of range.
void decode(const Encoded& enc, const RowLayout& rows, float* out);

// In-place fast Walsh-Hadamard transform of one row, scaled by 1/sqrt(n) so that it is orthogonal
// and its own inverse; n must be a power of two.
void hadamard_rotate(float* x, int n);

}  // namespace kv
