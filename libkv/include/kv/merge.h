// Token merging: instead of dropping the entries an eviction score does not keep, fold them into
// kept entries. A merged entry carries a mass (the tokens it stands for) and attention adds
// log(mass) to its logit (formats/kvsnap.md), so it weighs like the tokens it replaced.
#pragma once
#include "kv/evict.h"

namespace kv {

struct MergeOptions {
  EvictOptions select;  // which entries stay (the same scores and budgets as kv-evict)
  double tau = 0.0;     // nearest: cosine below which a dropped entry is simply dropped
};

// `nearest` (D2O / pivot style): after the selection, every dropped entry joins the kept entry
// of its KV head whose key is most similar (cosine), if that similarity is at least `tau`; the
// kept entry becomes the mass-weighted mean of the keys and of the values it absorbed, and its
// mass their total mass. Others are dropped. Output like apply_selection (side data swapped
// over), with `mass` always written; k and v keep their stored type.
void merge_nearest(const Header& header, int l, Layer& in, const MergeOptions& options, Layer& out);

// A whole in-memory snapshot (tests, library users).
Snapshot merge_snapshot(const Snapshot& snap, const MergeOptions& options);

}  // namespace kv
