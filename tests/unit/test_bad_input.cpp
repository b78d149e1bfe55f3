// Bad input is reported with the right sysexits code and a message naming the problem; nothing
// is left behind by a failed write.
#include <gtest/gtest.h>

#include <hdf5.h>
#include <cstring>

#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>

#include "helpers.h"
#include "kv/error.h"
#include "kv/snapshot_io.h"

namespace fs = std::filesystem;
using kv::DType;
using kv::Exit;

namespace {

std::string write_tiny(const std::string& name) {
  const std::string path = kvtest::temp_dir() + "/" + name;
  kv::write_snapshot(path, kvtest::tiny_snapshot(DType::f16, true, true));
  return path;
}

// Opens `path` read-write with HDF5 and lets `edit` damage it.
void patch(const std::string& path, const std::function<void(hid_t)>& edit) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  edit(f);
  H5Fclose(f);
}

template <class T>
void overwrite(hid_t f, const char* dataset, hid_t type, const std::vector<T>& values) {
  hid_t ds = H5Dopen2(f, dataset, H5P_DEFAULT);
  ASSERT_GE(ds, 0) << dataset;
  ASSERT_GE(H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), 0);
  H5Dclose(ds);
}

// Reads every layer; returns the error (or fails the test if there is none).
kv::Error read_error(const std::string& path, kv::ReadOptions options = {}) {
  try {
    kv::read_snapshot(path, options);
  } catch (const kv::Error& e) {
    return e;
  }
  ADD_FAILURE() << "no error reading " << path;
  return kv::Error(Exit::ok, "");
}

void expect_error(const std::string& path, Exit code, const std::string& needle) {
  kv::Error e = read_error(path);
  EXPECT_EQ(int(e.code()), int(code)) << e.what();
  EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "one line: " << e.what();
}

}  // namespace

TEST(BadInput, MissingFileIs66) {
  expect_error(kvtest::temp_dir() + "/nope.kv.h5", Exit::no_input, "No such file or directory");
}

TEST(BadInput, DirectoryIs66) {
  expect_error(kvtest::temp_dir(), Exit::no_input, "Is a directory");
}

TEST(BadInput, NotHdf5Is65) {
  const std::string path = kvtest::temp_dir() + "/text.kv.h5";
  std::ofstream(path) << "once upon a time\n";
  expect_error(path, Exit::data, "is not an HDF5 file");
}

TEST(BadInput, EmptyFileIs65) {
  const std::string path = kvtest::temp_dir() + "/empty.kv.h5";
  std::ofstream{path};
  expect_error(path, Exit::data, "is not an HDF5 file");
}

TEST(BadInput, Hdf5ButNotKvsnapIs65) {
  const std::string path = kvtest::temp_dir() + "/other.h5";
  hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  H5Fclose(f);
  expect_error(path, Exit::data, "not a kvsnap snapshot");
}

TEST(BadInput, FutureFormatVersionIs65) {
  const std::string path = write_tiny("future.kv.h5");
  patch(path, [](hid_t f) {
    hid_t a = H5Aopen(f, "format_version", H5P_DEFAULT);
    int32_t v[2] = {2, 0};
    H5Awrite(a, H5T_NATIVE_INT32, v);
    H5Aclose(a);
  });
  expect_error(path, Exit::data, "format 2.0; this kvtk reads 1.x (upgrade kvtk)");
}

TEST(BadInput, TruncatedFileIs65) {
  const std::string path = write_tiny("whole.kv.h5"), cut = kvtest::temp_dir() + "/cut.kv.h5";
  for (double fraction : {0.9, 0.5, 0.1}) {
    fs::copy_file(path, cut, fs::copy_options::overwrite_existing);
    fs::resize_file(cut, uintmax_t(double(fs::file_size(path)) * fraction));
    kv::Error e = read_error(cut);
    EXPECT_EQ(int(e.code()), 65) << fraction << ": " << e.what();
    EXPECT_NE(std::string(e.what()).find("truncated or corrupt"), std::string::npos) << e.what();
  }
}

TEST(BadInput, OffsetsOutOfOrderIs65) {
  const std::string path = write_tiny("order.kv.h5");
  patch(path, [](hid_t f) {
    overwrite<int64_t>(f, "layers/001/head_offsets", H5T_NATIVE_INT64, {0, 5, 3});
  });
  expect_error(path, Exit::data, "layer 1: head_offsets");
}

TEST(BadInput, OffsetsDecreasingInsideIs65) {
  const std::string path = write_tiny("decr.kv.h5");
  // Ends right (7) but head 1 would start before head 0 ends.
  patch(path, [](hid_t f) {
    overwrite<int64_t>(f, "layers/001/head_offsets", H5T_NATIVE_INT64, {0, 8, 7});
  });
  expect_error(path, Exit::data, "layer 1");
}

TEST(BadInput, OffsetPastTheEndInTheMiddleIs65) {
  // Regression (fuzz.snapshot_reader): a middle offset past the end, the last one right.
  const std::string path = write_tiny("middle.kv.h5");
  patch(path, [](hid_t f) {
    overwrite<int64_t>(f, "layers/001/head_offsets", H5T_NATIVE_INT64, {0, 100, 7});
  });
  expect_error(path, Exit::data, "layer 1: head_offsets decrease at head 1");
}

TEST(BadInput, OffsetsOutOfRangeIs65) {
  const std::string path = write_tiny("range.kv.h5");
  patch(path, [](hid_t f) {
    overwrite<int64_t>(f, "layers/000/head_offsets", H5T_NATIVE_INT64, {0, 6, 99});
  });
  expect_error(path, Exit::data, "head_offsets must start at 0 and end at 12");
}

TEST(BadInput, PositionsOutOfRangeIs65) {
  const std::string path = write_tiny("pos.kv.h5");
  patch(path, [](hid_t f) {
    overwrite<int32_t>(f, "layers/001/positions", H5T_NATIVE_INT32, {0, 2, 6, 1, 3, 4, 5});
  });
  expect_error(path, Exit::data, "position 6 is outside [0, 6)");
}

TEST(BadInput, PositionsNotIncreasingIs65) {
  const std::string path = write_tiny("dup.kv.h5");
  patch(path, [](hid_t f) {
    overwrite<int32_t>(f, "layers/001/positions", H5T_NATIVE_INT32, {0, 2, 2, 1, 3, 4, 5});
  });
  expect_error(path, Exit::data, "not strictly increasing");
}

TEST(BadInput, NonFiniteValuesAre65UnlessAllowed) {
  const std::string path = write_tiny("nan.kv.h5");
  patch(path, [](hid_t f) {
    // Layer 0 k is f16 [12, 4]: put a NaN (0x7e00) and an Inf (0x7c00) in it.
    std::vector<uint16_t> k(48, 0x3c00);
    k[5] = 0x7e00;
    k[40] = 0xfc00;
    hid_t ds = H5Dopen2(f, "layers/000/k", H5P_DEFAULT);
    hid_t type = H5Dget_type(ds);
    H5Dwrite(ds, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, k.data());
    H5Tclose(type);
    H5Dclose(ds);
  });
  expect_error(path, Exit::data, "layer 0: k holds 2 NaN/Inf values");
  kv::ReadOptions allow;
  allow.allow_nonfinite = true;
  EXPECT_NO_THROW(kv::read_snapshot(path, allow));
}

TEST(BadInput, NonFiniteSideDataIs65UnlessAllowed) {
  // The side data feeds scores and kv-eval's metrics: a NaN there would bend them silently.
  for (const char* name : {"window_q", "attn_acc", "attn_last", "probe_q"}) {
    kv::Snapshot snap = kvtest::tiny_snapshot(DType::f16, true, false);
    kv::Layer& layer = snap.layers[1];
    kv::Tensor& t = std::string(name) == "window_q"    ? layer.window_q
                    : std::string(name) == "attn_acc"  ? layer.attn_acc
                    : std::string(name) == "attn_last" ? layer.attn_last
                                                       : layer.probe_q;
    std::vector<float> x = t.to_f32();
    ASSERT_GT(x.size(), 1u) << name;
    x[1] = std::numeric_limits<float>::quiet_NaN();
    t = kv::Tensor::from_f32(t.dtype(), t.rows(), t.cols(), x.data());
    const std::string path = kvtest::temp_dir() + "/nan_side.kv.h5";
    kv::write_snapshot(path, snap);
    expect_error(path, Exit::data, std::string("layer 1: ") + name + " holds 1 NaN/Inf values");
    kv::ReadOptions allow;
    allow.allow_nonfinite = true;
    EXPECT_NO_THROW(kv::read_snapshot(path, allow)) << name;
  }
}

TEST(BadInput, NonFiniteF32AndBf16Detected) {
  for (DType t : {DType::f32, DType::bf16}) {
    kv::Snapshot snap = kvtest::tiny_snapshot(t, false, false);
    std::vector<float> v = snap.layers[1].v.to_f32();
    v[3] = std::numeric_limits<float>::infinity();
    snap.layers[1].v = kv::Tensor::from_f32(t, snap.layers[1].v.rows(), 4, v.data());
    const std::string path = kvtest::temp_dir() + "/nan2.kv.h5";
    kv::write_snapshot(path, snap);
    expect_error(path, Exit::data, "layer 1: v holds 1 NaN/Inf values");
  }
}

TEST(BadInput, WrongShapeIs65) {
  const std::string path = write_tiny("shape.kv.h5");
  patch(path, [](hid_t f) {
    H5Ldelete(f, "layers/000/v", H5P_DEFAULT);
    hsize_t dims[2] = {12, 3};
    hid_t space = H5Screate_simple(2, dims, nullptr);
    hid_t ds =
        H5Dcreate2(f, "layers/000/v", H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    std::vector<float> zeros(36, 0.0f);
    H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, zeros.data());
    H5Dclose(ds);
    H5Sclose(space);
  });
  expect_error(path, Exit::data, "v has shape [12, 3], expected [12, 4]");
}

// Replaces layer 0's k by a group with the given scheme attribute and no arrays.
void replace_k_by_group(const std::string& path, const char* scheme) {
  patch(path, [scheme](hid_t f) {
    H5Ldelete(f, "layers/000/k", H5P_DEFAULT);
    hid_t g = H5Gcreate2(f, "layers/000/k", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, std::strlen(scheme) + 1);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(g, "scheme", type, space, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, type, scheme);
    H5Aclose(a);
    H5Sclose(space);
    H5Tclose(type);
    H5Gclose(g);
  });
}

TEST(BadInput, UnknownEncodingIsNamed) {
  const std::string path = write_tiny("enc.kv.h5");
  replace_k_by_group(path, "wavelet");
  expect_error(path, Exit::data, "uses encoding 'wavelet', which this kvtk cannot decode");
}

TEST(BadInput, EncodingWithoutItsParametersOrArraysIs65) {
  const std::string path = write_tiny("kivi.kv.h5");
  replace_k_by_group(path, "kivi");  // no bits: a writer cannot have written it
  expect_error(path, Exit::data, "'k': scheme kivi: bits 0 is not 2, 3, 4 or 8");
  const std::string q8 = write_tiny("q8.kv.h5");
  replace_k_by_group(q8, "q8_0");
  expect_error(q8, Exit::data, "encoding 'q8_0' lacks its array 'blocks'");
}

TEST(BadInput, MissingLayerIs65) {
  const std::string path = write_tiny("nolayer.kv.h5");
  patch(path, [](hid_t f) { H5Ldelete(f, "layers/001", H5P_DEFAULT); });
  expect_error(path, Exit::data, "layer 1 is missing");
}

TEST(BadInput, TokensLengthMismatchIs65) {
  const std::string path = write_tiny("tok.kv.h5");
  patch(path, [](hid_t f) {
    hid_t a = H5Aopen(f, "n_tokens", H5P_DEFAULT);
    int64_t n = 7;
    H5Awrite(a, H5T_NATIVE_INT64, &n);
    H5Aclose(a);
  });
  expect_error(path, Exit::data, "tokens has 6 ids but n_tokens is 7");
}

TEST(BadOutput, UnwritableOutputIs73AndLeavesNothing) {
  kv::Snapshot snap = kvtest::tiny_snapshot(DType::f16, false, false);
  try {
    kv::write_snapshot(kvtest::temp_dir() + "/no/such/dir/out.kv.h5", snap);
    ADD_FAILURE() << "no error";
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), 73) << e.what();
    EXPECT_NE(std::string(e.what()).find("No such file or directory"), std::string::npos)
        << e.what();
  }
}

TEST(BadOutput, OutputEqualToInputRefusedUnlessForced) {
  const std::string path = write_tiny("same.kv.h5");
  kv::Snapshot snap = kv::read_snapshot(path);
  kv::WriteOptions w;
  w.input_path = path;
  try {
    kv::write_snapshot(path, snap, w);
    ADD_FAILURE() << "no error";
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), 64);
    EXPECT_NE(std::string(e.what()).find("is the input file"), std::string::npos);
  }
  EXPECT_NO_THROW(kv::read_snapshot(path));  // input untouched
  w.force = true;
  EXPECT_NO_THROW(kv::write_snapshot(path, snap, w));
  kvtest::expect_same(snap, kv::read_snapshot(path));
}

TEST(BadOutput, InvalidLayerIsRefusedAndNothingIsLeft) {
  kv::Snapshot snap = kvtest::tiny_snapshot(DType::f16, false, false);
  snap.layers[1].head_offsets = {0, 7, 12};
  snap.layers[1].positions[7] = 0;  // fine
  snap.layers[1].positions[3] = 0;  // head 0 no longer increasing
  const std::string dir = kvtest::temp_dir() + "/invalid";
  fs::create_directories(dir);
  EXPECT_THROW(kv::write_snapshot(dir + "/x.kv.h5", snap), kv::Error);
  EXPECT_TRUE(fs::is_empty(dir));
}
