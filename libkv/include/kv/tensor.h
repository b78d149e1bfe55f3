// A dense row-major 2-D array of f32/f16/bf16 with reusable storage: streaming tools read layer
// after layer into the same Tensor, so buffers are allocated (and page-faulted) once.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "kvk/ops.h"

namespace kv {

using kvk::DType;

class Tensor {
 public:
  // Storage alignment in bytes. Copies from the page cache (and memcpy in general) run at about
  // half speed when source and destination differ in alignment mod 32/64; snapshot datasets are
  // page-aligned in the file, so reads land at full speed only in 64-byte aligned storage.
  static constexpr size_t kAlignment = 64;

  Tensor() = default;
  Tensor(DType dtype, int64_t rows, int64_t cols) { resize(dtype, rows, cols); }
  Tensor(const Tensor& o) { *this = o; }
  Tensor& operator=(const Tensor& o) {
    if (this != &o) {
      resize(o.dtype_, o.rows_, o.cols_);
      if (o.bytes()) std::memcpy(data_.get(), o.data_.get(), o.bytes());
    }
    return *this;
  }
  // A moved-from Tensor is empty with no storage (so a later resize allocates again).
  Tensor(Tensor&& o) noexcept { *this = std::move(o); }
  Tensor& operator=(Tensor&& o) noexcept {
    if (this != &o) {
      data_ = std::move(o.data_);
      capacity_ = std::exchange(o.capacity_, 0);
      dtype_ = o.dtype_;
      rows_ = std::exchange(o.rows_, 0);
      cols_ = std::exchange(o.cols_, 0);
    }
    return *this;
  }

  // Sets the shape; contents are unspecified afterwards. Storage is kept when it is big enough.
  void resize(DType dtype, int64_t rows, int64_t cols) {
    size_t need = size_t(rows) * size_t(cols) * kvk::dtype_size(dtype);
    if (need > capacity_) {
      data_.reset(static_cast<std::byte*>(::operator new[](need, std::align_val_t(kAlignment))));
      capacity_ = need;
    }
    dtype_ = dtype;
    rows_ = rows;
    cols_ = cols;
  }
  void clear() { rows_ = cols_ = 0; }

  DType dtype() const { return dtype_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  size_t size() const { return size_t(rows_) * size_t(cols_); }
  size_t bytes() const { return size() * kvk::dtype_size(dtype_); }
  bool empty() const { return size() == 0; }
  void* data() { return data_.get(); }
  const void* data() const { return data_.get(); }
  template <class T>
  T* as() {
    return reinterpret_cast<T*>(data_.get());
  }
  template <class T>
  const T* as() const {
    return reinterpret_cast<const T*>(data_.get());
  }

  // The whole tensor as f32, through the given backend's conversion.
  std::vector<float> to_f32(const kvk::Ops& ops = kvk::cpu_ops()) const;
  // Fills from f32 values, converting to `dtype` (round to nearest even).
  static Tensor from_f32(DType dtype, int64_t rows, int64_t cols, const float* values);

  bool same_contents(const Tensor& o) const {
    if (empty() && o.empty()) return rows_ == o.rows_ && cols_ == o.cols_;
    return dtype_ == o.dtype_ && rows_ == o.rows_ && cols_ == o.cols_ &&
           (bytes() == 0 || std::memcmp(data_.get(), o.data_.get(), bytes()) == 0);
  }

 private:
  struct AlignedDelete {
    void operator()(std::byte* p) const noexcept {
      ::operator delete[](p, std::align_val_t(kAlignment));
    }
  };
  std::unique_ptr<std::byte[], AlignedDelete> data_;
  size_t capacity_ = 0;
  DType dtype_ = DType::f32;
  int64_t rows_ = 0, cols_ = 0;
};

}  // namespace kv
