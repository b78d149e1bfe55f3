// Thin RAII and helpers over the HDF5 C API, private to libkv. Every failing call becomes a
// kv::Error with a message naming the object; HDF5's own error stack is silenced.
#pragma once
#include <hdf5.h>

#include <string>
#include <vector>

#include "kv/error.h"
#include "kv/tensor.h"

namespace kv::h5 {

// Owns one hid_t and closes it with the right H5*close.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  Handle(Handle&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = -1; }
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      closer_ = o.closer_;
      o.id_ = -1;
    }
    return *this;
  }
  ~Handle() { reset(); }
  void reset() {
    if (id_ >= 0 && closer_) closer_(id_);
    id_ = -1;
  }
  hid_t get() const { return id_; }
  // Gives up ownership, for closing by hand where the close status matters.
  hid_t release() {
    hid_t id = id_;
    id_ = -1;
    return id;
  }
  operator hid_t() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_ = -1;
  Closer closer_ = nullptr;
};

// Prepares HDF5 for this process (idempotent; before any other HDF5 call): no automatic error
// printing, and no clean-up at exit (see h5.cpp).
void init_library();

// Returns `id` if >= 0, else throws Error(code, what).
hid_t check(hid_t id, Exit code, const std::string& what);
void check(herr_t status, Exit code, const std::string& what);

// The file types used for each dtype: f16 as h5py lays it out, bf16 alike with 8 exponent bits.
hid_t file_type(DType t);  // owned by the module, do not close
// Maps a dataset's float type to a DType; throws if it is not one of ours.
DType dtype_of(hid_t type, const std::string& what);

bool exists(hid_t loc, const std::string& name);

// Attributes.
void write_attr(hid_t obj, const char* name, const std::string& value);
void write_attr(hid_t obj, const char* name, int64_t value);
void write_attr(hid_t obj, const char* name, double value);
void write_attr(hid_t obj, const char* name, const std::vector<int32_t>& values);
std::string read_attr_string(hid_t obj, const char* name, const std::string& where);
int64_t read_attr_int(hid_t obj, const char* name, const std::string& where);
double read_attr_double(hid_t obj, const char* name, const std::string& where);
std::vector<int32_t> read_attr_ints(hid_t obj, const char* name, const std::string& where);
bool has_attr(hid_t obj, const char* name);

}  // namespace kv::h5
