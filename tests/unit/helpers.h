// Small hand-made snapshots for the unit tests.
#pragma once
#include <string>

#include "kv/snapshot.h"

namespace kvtest {

// A 2-layer snapshot (4 query heads, 2 KV heads, head_dim 4, 6 tokens) whose values encode
// their coordinates, with ragged heads in layer 1, optional side data and mass.
kv::Snapshot tiny_snapshot(kv::DType dtype, bool side_data, bool ragged);

// Asserts (gtest) that two snapshots hold identical data.
void expect_same(const kv::Snapshot& a, const kv::Snapshot& b);

// A fresh temporary directory, removed at exit.
std::string temp_dir();

}  // namespace kvtest
