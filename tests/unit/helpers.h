// Small hand-made snapshots for the unit tests.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "kv/snapshot.h"

namespace kvtest {

// A 2-layer snapshot (4 query heads, 2 KV heads, head_dim 4, 6 tokens) whose values encode
// their coordinates, with ragged heads in layer 1, optional side data and mass.
kv::Snapshot tiny_snapshot(kv::DType dtype, bool side_data, bool ragged);

// One layer with one KV head and one query head of `dim` channels holding every position of a
// sequence of k.size() / dim tokens (f32 keys and values, row-major), and the given probe
// queries ([P, dim]) at the positions right after the sequence. For hand-computed cases.
kv::Snapshot one_head_snapshot(const std::vector<float>& k, const std::vector<float>& v, int dim,
                               const std::vector<float>& probe_q);

// stories260K over 400 prompt tokens of TinyStories, with a 32-query window, attention statistics
// and a 64-token probe (the acceptance setting of the strategy issues); captured once per
// process. Null when the model or the text is not available (KV_MODELS_DIR, KV_DATA_DIR).
const kv::Snapshot* stories_capture();

// The sysexits code a kv::Error thrown by f carries, or 0 when f returns.
int exit_code_of(const std::function<void()>& f);

// Asserts (gtest) that two snapshots hold identical data.
void expect_same(const kv::Snapshot& a, const kv::Snapshot& b);

// A fresh temporary directory, removed at exit.
std::string temp_dir();

}  // namespace kvtest

// One chunk of the online softmax in double, for the kernels' plain-loop emulations: rescales
// the running output o and sum l to the new maximum m over the chunk's scores, adds their
// weights exp(score - m) to l and returns them.
std::vector<double> online_softmax_step(const std::vector<double>& scores, double& m, double& l,
                                        std::vector<double>& o);
