// Paged caches and query-aware fetch (the system level of the survey, made measurable on a
// snapshot; man/kv-offload.1 states the rules for users):
//  - pages: each KV head's entries, in stored order, cut into pages of P entries (the last page
//    shorter), each with Quest's per-channel key minimum and maximum and a mean key (landmark);
//  - a link model (bandwidth, latency) for what fetching pages from a slower tier costs;
//  - simulate: for each probe query, score each head's pages (Quest's bound or the landmark dot
//    product), attend only to the top pages within a token budget (sink and recent pages
//    always), fetch the missing ones into a fast tier with LRU replacement, and count pages,
//    bytes, hits, stall time and the attention-output error against the full cache.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kv/encoding.h"
#include "kv/snapshot.h"

namespace kv {

// The pages of one layer: head h owns pages [head_pages[h], head_pages[h+1]); page i covers the
// layer's rows [first[i], first[i] + rows[i]).
struct PageTable {
  int page_size = 0;
  int dim = 0;
  std::vector<int64_t> head_pages;                // [H_kv + 1]
  std::vector<int64_t> first, rows;               // [pages]
  std::vector<float> key_min, key_max, key_mean;  // [pages, dim]: over the page's keys

  int64_t pages() const { return int64_t(first.size()); }
};

// Pages of `page_size` entries (16..256, else Error(Exit::usage)) over a layer whose keys are
// decoded to k32 ([N, dim] f32).
PageTable build_pages(const Layer& layer, const std::vector<float>& k32, int dim, int page_size);
PageTable build_pages(const std::vector<int64_t>& head_offsets, const std::vector<float>& k32,
                      int dim, int page_size);

// Quest's bound for query q on page i: sum_c max(q_c m_c, q_c M_c), at least q . k for every key
// of the page (computed in double and rounded up, so the inequality holds in float too).
double quest_bound(const PageTable& pages, int64_t page, const float* q);
// The landmark score: q . mean key of the page.
double landmark_score(const PageTable& pages, int64_t page, const float* q);

// A link between two tiers: time = latency + bytes / bandwidth per transfer.
struct Link {
  std::string name;
  double gbps = 0;        // GB/s (1e9 bytes per second)
  double latency_us = 0;  // per transfer
  // "pcie5", "c2c", "nvme" (documented defaults) or "GBPS,LATENCY_US"; Error(Exit::usage).
  static Link parse(const std::string& spec);
  double seconds(double bytes) const {
    return bytes > 0 ? latency_us * 1e-6 + bytes / (gbps * 1e9) : 0;
  }
};

struct SimulateOptions {
  int page_size = 16;
  int64_t budget = 0;           // tokens attended per KV head per step (whole pages), > 0
  int sink_pages = 1;           // first pages of each head, always attended
  int recent_pages = 1;         // last pages of each head, always attended
  std::string score = "quest";  // quest | landmark
  int64_t fast_capacity = 0;    // tokens per KV head the fast tier holds (0: the budget)
  Link link = Link::parse("pcie5");
  bool attention_error = true;  // false: only pages, fetches and stalls (no attention computed)
};

// Totals over layers, heads and steps (per_step: the same, one entry per probe step).
struct SimulateStats {
  int64_t steps = 0, rows = 0;  // probe steps; (layer, query head, step) rows of the error
  double rel_error = 0;         // sum over rows of ||o_sel - o_full|| / ||o_full||
  int64_t pages_selected = 0, pages_hit = 0, pages_fetched = 0;
  double bytes_fetched = 0, stall_seconds = 0;
  int64_t tokens_attended = 0;
  SimulateStats& operator+=(const SimulateStats& o);
};

// Throws Error(Exit::usage) for impossible options against the header: budget < 1 or below the
// always-attended pages (sinks + recent) at this page size, a fast tier smaller than the
// budget, unknown score, page size outside 16..256. Error(Exit::data) without a probe.
void check_simulate_options(const Header& header, const SimulateOptions& o);

// One layer: every probe step in order, the fast tier starting with each head's sink and most
// recent pages. `per_step` (size P) accumulates each step's figures.
SimulateStats simulate_layer(const Header& header, const Layer& layer, const SimulateOptions& o,
                             std::vector<SimulateStats>& per_step);

// ---- tiers
// ---------------------------------------------------------------------------------------

// One tier of `kv-offload tier`: NAME:CAPACITY (bytes, with an optional K, M, G, KiB, MiB or
// GiB suffix) for a memory tier, or disk:DIR (unlimited) / disk:DIR:CAPACITY for the page store.
struct Tier {
  std::string name;
  int64_t capacity = -1;  // bytes; -1: unlimited
  std::string dir;        // disk tiers: the page store directory
  bool disk() const { return !dir.empty(); }
  static Tier parse(const std::string& spec);  // Error(Exit::usage)
};

// One page of a cache as placement sees it.
struct PlacedPage {
  int layer = 0;
  int64_t page = 0;     // index in the layer's page table
  int64_t bytes = 0;    // k and v rows as stored
  double heat = 0;      // the placement policy's key: hotter pages go to faster tiers
  bool always = false;  // a sink or recent page: always in the first tier
  int tier = -1;
};

// Places pages into the tiers, fastest first: the sink and recent pages into the first tier
// (Error(Exit::usage) if they do not fit), then the others by decreasing heat (ties: earlier
// layer, then earlier page), each into the first tier that still has room. Error(Exit::usage)
// when the tiers cannot hold the cache.
void place_pages(std::vector<PlacedPage>& pages, const std::vector<Tier>& tiers);

// A layer tensor (dense, [N, D]) as the "paged" encoding: pages flagged in `external` (one flag
// per page, pages of `page_size` in head order) go to the store, the others stay in the array.
// For keys, each page's metadata goes along (page_key_min, page_key_max, page_key_mean: f32
// [pages, D], as PageTable holds them).
Encoded page_out(const Tensor& x, const std::vector<int64_t>& head_offsets, int page_size,
                 const std::vector<uint8_t>& external, class PageStore& store, bool zstd,
                 bool keys);

// An encoded tensor (any scheme but paged) as one object in the store, for the disk tier: the
// "external" encoding, whose `ids` array names the object. Encodings group values across tokens
// (channel groups, per-head factors and levels, outlier lists), so their codes are not cut into
// token pages; the object holds the arrays exactly as stored, so restoring gives them back
// byte for byte.
Encoded put_external(const Encoded& enc, class PageStore& store, bool zstd);
// The encoded tensor an "external" one names. Error(Exit::data) naming the object when the store
// lacks it, its bytes do not hash to its id, or they are not an encoded tensor.
Encoded fetch_external(const Encoded& external);
// The object's bytes as the encoded tensor they hold (`id` names it in errors, `inner` is the
// encoding given to it): the parser fetch_external uses, exposed for the robustness tests.
Encoded parse_external_object(const std::vector<uint8_t>& blob, const std::string& id,
                              const Encoding& inner);

// ---- prefix sharing ---------------------------------------------------------------------------

// Each page's prefix id, as serving engines' prefix caches name blocks: the SHA-256 (hex) of the
// previous page's id (empty for a head's first page) and the token ids at the page's positions
// (little-endian int32). Caches of the same model whose token sequences share a prefix give the
// pages of that prefix equal ids, head by head. One id per page of the layer, in page order.
std::vector<std::string> page_prefix_ids(const Header& header, const Layer& layer, int page_size);

}  // namespace kv
