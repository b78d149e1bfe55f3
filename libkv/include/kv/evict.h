// Token eviction: score every entry of a layer (which tokens matter), allocate how many entries
// each KV head keeps (budgets), keep the best and drop the rest. Kept entries are copied out, so
// memory is really freed and head-wise budgets give ragged heads. Formulas and defaults follow
// ../shared/METHODS.md and the papers; man/kv-evict.1 states them for users.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kv/snapshot.h"

namespace kv {

enum class EvictScore { window, h2o, tova, snapkv, knorm, random };
enum class EvictAlloc { uniform, pyramid, adaptive };
enum class GroupAgg { mean, max };  // how the query heads of one KV group combine
enum class PoolKind { avg, max };   // SnapKV's 1-D pooling of the votes

struct EvictOptions {
  EvictScore score = EvictScore::snapkv;
  EvictAlloc alloc = EvictAlloc::uniform;
  int64_t budget = 0;  // entries per head (the mean per head for pyramid and adaptive); or
  double ratio = 0;    // the fraction of each head's entries; exactly one of the two is set
  int sink = -1;       // first entries of each head always kept; -1: 4 for window, else 0
  int recent = -1;     // most recent entries always kept; -1: half the budget for h2o, else 0
  GroupAgg group_agg = GroupAgg::mean;
  PoolKind pool = PoolKind::avg;
  int kernel = 5;      // SnapKV pooling width (odd)
  double beta = 20;    // PyramidKV: the last layer keeps (C - W) / beta beyond the window
  double alpha = 0.2;  // AdaKV: every head keeps at least alpha * budget of its own best
  uint64_t seed = 1;   // random score
};

EvictScore parse_evict_score(const std::string& name);  // Error(Exit::usage) if unknown
EvictAlloc parse_evict_alloc(const std::string& name);
GroupAgg parse_group_agg(const std::string& name);
PoolKind parse_pool(const std::string& name);
const char* evict_score_name(EvictScore s);
const char* evict_alloc_name(EvictAlloc a);

// The token budget per head the options give: --budget, or for the window score without one,
// --sink + --recent; 0 when --ratio sets it.
int64_t evict_budget(const EvictOptions& options);

// Checks the options against a snapshot before any layer is read: the side data the score needs
// (Error(Exit::data) naming the kv-capture option that provides it) and impossible budgets or
// parameters (Error(Exit::usage)).
void check_evict_options(const Header& header, const EvictOptions& options);

// Score of every entry of layer `l` (index = row in the layer), higher = keep. Entries the score
// always keeps (sinks, recent, the observation window) get +inf. Throws Error(Exit::data) if a
// score is NaN (e.g. NaN in attention statistics).
std::vector<float> score_layer(const Header& header, int l, const Layer& layer,
                               const EvictOptions& options);

// Entries each KV head of layer `l` keeps, given the scores. Throws Error(Exit::usage) when a
// head's budget cannot hold the entries the score always keeps.
std::vector<int64_t> allocate_layer(const Header& header, int l, const Layer& layer,
                                    const std::vector<float>& scores, const EvictOptions& options);

// The kept rows of each KV head, in increasing position order.
using Selection = std::vector<std::vector<int64_t>>;

// Scores, allocates and selects: the whole decision for one layer.
Selection select_layer(const Header& header, int l, const Layer& layer,
                       const EvictOptions& options);

// Builds `out` from the kept rows of `in`: k, v (in their stored type), positions and mass are
// copied, side data (window queries, attention statistics, probe queries) is swapped over, so
// `in` must not be used for them afterwards. Buffers of `out` are reused.
void apply_selection(Layer& in, const Selection& kept, Layer& out);

// Evicts a whole in-memory snapshot (for tests and library users; tools stream layers).
Snapshot evict_snapshot(const Snapshot& snap, const EvictOptions& options);

}  // namespace kv
