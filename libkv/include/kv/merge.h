// Token merging: instead of dropping the entries an eviction score does not keep, fold them into
// kept entries. A merged entry carries a mass (the tokens it stands for) and attention adds
// log(mass) to its logit (formats/kvsnap.md), so it weighs like the tokens it replaced.
#pragma once
#include <string>

#include "kv/evict.h"

namespace kv {

enum class MergeMethod { nearest, cam, cluster };
MergeMethod parse_merge_method(const std::string& name);  // Error(Exit::usage) if unknown

struct MergeOptions {
  MergeMethod method = MergeMethod::nearest;
  EvictOptions select;  // which entries stay (the same scores and budgets as kv-evict)
  double tau = 0.0;     // nearest: cosine below which a dropped entry is simply dropped;
                        // cluster: neighbouring keys' cosine that joins them in one set
};

// `nearest` (D2O / pivot style): after the selection, every dropped entry joins the kept entry
// of its KV head whose key is most similar (cosine), if that similarity is at least `tau`; the
// kept entry becomes the mass-weighted mean of the keys and of the values it absorbed, and its
// mass their total mass. Others are dropped. Output like apply_selection (side data swapped
// over), with `mass` always written; k and v keep their stored type.
void merge_nearest(const Header& header, int l, Layer& in, const MergeOptions& options, Layer& out);

// `cam` (CaM-style): after the selection (score h2o, tova or snapkv, else Error(Exit::usage)),
// every dropped entry merges into its position neighbour, the next kept entry of its KV head
// (the last kept one if none follows), with weight w = clamp(s_i / s_j, 0, 1) of its mass, s the
// selection scores (an always-kept neighbour's +inf counts as the smallest finite kept score):
// the neighbour's value becomes the weighted mean of its own and the absorbed values, its mass
// grows by w m_i, and its key stays its own.
void merge_cam(const Header& header, int l, Layer& in, const MergeOptions& options, Layer& out);

// `cluster` (KVMerger-style): each KV head's entries, in position order, form sets of maximal
// runs whose neighbouring keys have cosine >= tau; in a set holding kept entries, the kept entry
// with the highest score is the pivot and every dropped member merges into it with Gaussian
// weight exp(-|k_i - k_p|^2 / (2 s^2)), s^2 the set's mean squared key distance to the pivot
// (keys and values alike, mass-weighted). Dropped members of sets without a kept entry are
// dropped.
void merge_cluster(const Header& header, int l, Layer& in, const MergeOptions& options, Layer& out);

// The method options.method names.
void merge_layer(const Header& header, int l, Layer& in, const MergeOptions& options, Layer& out);

// `heads`: the GQA paper's mean-pool conversion: KV heads [g*r, (g+1)*r) (r = H_kv / groups)
// become head g, entry by entry; out_header gets n_kv_heads = groups (query heads unchanged, so
// the group size grows). The merged heads must hold the same positions and masses
// (Error(Exit::usage)), and groups must divide H_kv (Error(Exit::usage)).
void merge_heads(const Header& in_header, const Layer& in, int groups, Header& out_header,
                 Layer& out);

// `minicache` (MiniCache): layers la and la + 1, holding the same entries (Error(Exit::usage)
// otherwise), share each row's direction where their rows agree: for k and for v, rows whose
// cosine is at least tau get e = SLERP(a/|a|, b/|b|, t); layer la keeps |a| e (in place, dense),
// layer la + 1 keeps only |b| (b.k_stored / b.v_stored: the "minicache" encoding, so the bytes
// shrink) and its other rows as they are. Readers give layer la + 1 back as |b| e.
struct MinicacheStats {
  int64_t rows = 0, merged = 0;  // over k and v
};
MinicacheStats merge_minicache_pair(const Header& header, int la, Layer& a, Layer& b, double tau,
                                    double t);

// A whole in-memory snapshot (tests, library users): options.method for every layer.
Snapshot merge_snapshot(const Snapshot& snap, const MergeOptions& options);

}  // namespace kv
