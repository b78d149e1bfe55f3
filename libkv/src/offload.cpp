#include "kv/offload.h"

#include <strings.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <numeric>

#include "kv/attention.h"
#include "kv/error.h"
#include "kv/page_store.h"
#include "kv/sha256.h"
#include "kv/str.h"

namespace kv {

PageTable build_pages(const Layer& layer, const std::vector<float>& k32, int dim, int page_size) {
  return build_pages(layer.head_offsets, k32, dim, page_size);
}

PageTable build_pages(const std::vector<int64_t>& head_offsets, const std::vector<float>& k32,
                      int dim, int page_size) {
  if (page_size < 16 || page_size > 256)
    throw Error(Exit::usage, str("page size ", page_size, " is outside 16..256"));
  PageTable t;
  t.page_size = page_size;
  t.dim = dim;
  t.head_pages.push_back(0);
  const int H = int(head_offsets.size()) - 1;
  for (int h = 0; h < H; ++h) {
    for (int64_t r = head_offsets[h]; r < head_offsets[h + 1]; r += page_size) {
      const int64_t n = std::min<int64_t>(page_size, head_offsets[h + 1] - r);
      t.first.push_back(r);
      t.rows.push_back(n);
      std::vector<float> mn(k32.begin() + r * dim, k32.begin() + (r + 1) * dim), mx = mn;
      std::vector<double> sum(static_cast<size_t>(dim), 0.0);
      for (int64_t i = r; i < r + n; ++i)
        for (int c = 0; c < dim; ++c) {
          const float v = k32[size_t(i * dim + c)];
          mn[size_t(c)] = std::min(mn[size_t(c)], v);
          mx[size_t(c)] = std::max(mx[size_t(c)], v);
          sum[size_t(c)] += v;
        }
      t.key_min.insert(t.key_min.end(), mn.begin(), mn.end());
      t.key_max.insert(t.key_max.end(), mx.begin(), mx.end());
      for (double s : sum) t.key_mean.push_back(float(s / double(n)));
    }
    t.head_pages.push_back(t.pages());
  }
  return t;
}

double quest_bound(const PageTable& pages, int64_t page, const float* q) {
  const float* mn = pages.key_min.data() + page * pages.dim;
  const float* mx = pages.key_max.data() + page * pages.dim;
  double b = 0;
  for (int c = 0; c < pages.dim; ++c) b += std::max(double(q[c]) * mn[c], double(q[c]) * mx[c]);
  // Each term is exact in double and at least q_c k_c for every key; the sum is rounded, so add
  // its worst-case rounding to stay a bound of the exactly computed dot products.
  return b + std::fabs(b) * 1e-12 + 1e-30;
}

double landmark_score(const PageTable& pages, int64_t page, const float* q) {
  const float* m = pages.key_mean.data() + page * pages.dim;
  double s = 0;
  for (int c = 0; c < pages.dim; ++c) s += double(q[c]) * m[c];
  return s;
}

Link Link::parse(const std::string& spec) {
  // Defaults and sources in man/kv-offload.1 (section LINKS).
  if (spec == "pcie5") return {"pcie5", 50.0, 10.0};
  if (spec == "c2c") return {"c2c", 400.0, 2.0};
  if (spec == "nvme") return {"nvme", 6.0, 80.0};
  const auto comma = spec.find(',');
  char* end = nullptr;
  if (comma != std::string::npos) {
    const double gbps = std::strtod(spec.c_str(), &end);
    const bool first_ok = end == spec.c_str() + comma;
    const double lat = std::strtod(spec.c_str() + comma + 1, &end);
    // At least 1 kB/s: a tinier (or denormal) rate makes every transfer time infinite.
    if (first_ok && *end == '\0' && gbps >= 1e-6 && std::isfinite(gbps) && lat >= 0 &&
        std::isfinite(lat))
      return {spec, gbps, lat};
  }
  throw Error(Exit::usage,
              str("link '", spec, "' is not pcie5, c2c, nvme or GBPS,LATENCY_US (e.g. 25,5)"));
}

SimulateStats& SimulateStats::operator+=(const SimulateStats& o) {
  steps = std::max(steps, o.steps);
  rows += o.rows;
  rel_error += o.rel_error;
  pages_selected += o.pages_selected;
  pages_hit += o.pages_hit;
  pages_fetched += o.pages_fetched;
  bytes_fetched += o.bytes_fetched;
  stall_seconds += o.stall_seconds;
  tokens_attended += o.tokens_attended;
  return *this;
}

void check_simulate_options(const Header& header, const SimulateOptions& o) {
  if (o.page_size < 16 || o.page_size > 256)
    throw Error(Exit::usage, str("--page ", o.page_size, " is outside 16..256"));
  if (o.score != "quest" && o.score != "landmark")
    throw Error(Exit::usage, str("--score '", o.score, "' is not quest or landmark"));
  if (o.sink_pages < 0 || o.recent_pages < 0)
    throw Error(Exit::usage, "--sink-pages and --recent-pages cannot be negative");
  // In 64 bits: two page counts near INT_MAX must not wrap into a budget that fits.
  const int64_t always = (int64_t(o.sink_pages) + int64_t(o.recent_pages)) * o.page_size;
  if (o.budget < o.page_size)
    throw Error(Exit::usage,
                str("--budget ", o.budget, " is below one page of ", o.page_size, " tokens"));
  if (o.budget < always)
    throw Error(Exit::usage,
                str("--budget ", o.budget, " cannot hold the ", o.sink_pages, " sink and ",
                    o.recent_pages, " recent pages of ", o.page_size, " tokens (", always, ")"));
  if (o.fast_capacity && o.fast_capacity < o.budget)
    throw Error(Exit::usage, str("--fast-capacity ", o.fast_capacity,
                                 " cannot hold the attended budget of ", o.budget, " tokens"));
  if (!header.has_probe())
    throw Error(Exit::data, "simulate needs probe queries (kv-capture --probe N)");
}

namespace {

// One KV head's fast tier: pages with the step they were last used, least recent evicted.
struct FastTier {
  int64_t capacity = 0;             // pages
  std::vector<int64_t> page, used;  // parallel
  bool holds(int64_t p) const { return std::find(page.begin(), page.end(), p) != page.end(); }
  void touch(int64_t p, int64_t step) {
    const auto it = std::find(page.begin(), page.end(), p);
    if (it != page.end()) {
      used[size_t(it - page.begin())] = step;
    } else {
      page.push_back(p);
      used.push_back(step);
    }
  }
  // Evicts least recently used pages not used at `step` until within capacity.
  void trim(int64_t step) {
    while (int64_t(page.size()) > capacity) {
      size_t victim = page.size();
      for (size_t i = 0; i < page.size(); ++i)
        if (used[i] < step && (victim == page.size() || used[i] < used[victim] ||
                               (used[i] == used[victim] && page[i] < page[victim])))
          victim = i;
      if (victim == page.size()) return;  // everything is in use this step
      page.erase(page.begin() + std::ptrdiff_t(victim));
      used.erase(used.begin() + std::ptrdiff_t(victim));
    }
  }
};

}  // namespace

SimulateStats simulate_layer(const Header& header, const Layer& layer, const SimulateOptions& o,
                             std::vector<SimulateStats>& per_step) {
  const ModelInfo& m = header.model;
  const int D = m.head_dim, G = m.group_size(), H = m.n_kv_heads;
  const int64_t steps = int64_t(header.probe_tokens.size());
  per_step.resize(size_t(steps));
  const std::vector<float> k32 = layer.k.to_f32(), v32 = layer.v.to_f32(),
                           q32 = layer.probe_q.to_f32();
  const PageTable pages = build_pages(layer, k32, D, o.page_size);
  // The reference: attention over the whole cache (unless only the fetches are asked for).
  const std::vector<float> full =
      o.attention_error ? layer_attention(m, layer, layer.probe_q, header.probe_positions)
                        : std::vector<float>();
  const double entry_bytes =
      double(D) * double(kvk::dtype_size(layer.k.dtype()) + kvk::dtype_size(layer.v.dtype()));
  const int64_t budget_pages = o.budget / o.page_size;
  const int64_t capacity_pages = (o.fast_capacity ? o.fast_capacity : o.budget) / o.page_size;
  // Heads are independent: each one's figures per step, summed in head order afterwards (so the
  // totals do not depend on the thread count).
  std::vector<SimulateStats> head_steps(size_t(H) * size_t(steps));
#pragma omp parallel for schedule(dynamic)
  for (int h = 0; h < H; ++h) {
    std::vector<float> k_sel, v_sel, mass_sel, q(size_t(G) * D), weights, out(size_t(G) * D);
    std::vector<int32_t> pos_sel;
    const int64_t p0 = pages.head_pages[h], np = pages.head_pages[h + 1] - p0;
    auto always = [&](int64_t i) { return i < o.sink_pages || i >= np - o.recent_pages; };
    FastTier fast;
    fast.capacity = capacity_pages;
    // After prefill the fast tier holds the sink pages and the most recent pages.
    for (int64_t i = 0; i < std::min<int64_t>(np, o.sink_pages); ++i) fast.touch(p0 + i, -1);
    for (int64_t i = np - 1; i >= 0 && int64_t(fast.page.size()) < capacity_pages; --i)
      fast.touch(p0 + i, -1);
    for (int64_t step = 0; step < steps; ++step) {
      for (int g = 0; g < G; ++g)
        std::copy_n(q32.begin() + ((h * G + g) * steps + step) * D, D, q.begin() + g * D);
      // Scores of the pages that are not always attended: the best over the group's queries.
      std::vector<std::pair<double, int64_t>> ranked;
      std::vector<int64_t> chosen;
      for (int64_t i = 0; i < np; ++i) {
        if (always(i)) {
          chosen.push_back(i);
          continue;
        }
        double s = -std::numeric_limits<double>::infinity();
        for (int g = 0; g < G; ++g)
          s = std::max(s, o.score == "quest" ? quest_bound(pages, p0 + i, q.data() + g * D)
                                             : landmark_score(pages, p0 + i, q.data() + g * D));
        ranked.push_back({s, i});
      }
      // The top pages within the budget; ties go to the later page.
      std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second > b.second);
      });
      for (const auto& r : ranked) {
        if (int64_t(chosen.size()) >= std::max<int64_t>(budget_pages, 0)) break;
        chosen.push_back(r.second);
      }
      std::sort(chosen.begin(), chosen.end());
      SimulateStats s;
      s.pages_selected = int64_t(chosen.size());
      for (int64_t i : chosen) {
        if (fast.holds(p0 + i)) {
          ++s.pages_hit;
        } else {
          ++s.pages_fetched;
          s.bytes_fetched += double(pages.rows[size_t(p0 + i)]) * entry_bytes;
        }
        fast.touch(p0 + i, step);
      }
      fast.trim(step);
      s.tokens_attended = 0;
      for (int64_t i : chosen) s.tokens_attended += pages.rows[size_t(p0 + i)];
      head_steps[size_t(h) * size_t(steps) + size_t(step)] = s;
      if (!o.attention_error) continue;
      // Attention of the group's queries over the chosen pages only.
      k_sel.clear();
      v_sel.clear();
      pos_sel.clear();
      mass_sel.clear();
      for (int64_t i : chosen) {
        const int64_t a = pages.first[size_t(p0 + i)], n = pages.rows[size_t(p0 + i)];
        k_sel.insert(k_sel.end(), k32.begin() + a * D, k32.begin() + (a + n) * D);
        v_sel.insert(v_sel.end(), v32.begin() + a * D, v32.begin() + (a + n) * D);
        pos_sel.insert(pos_sel.end(), layer.positions.begin() + a, layer.positions.begin() + a + n);
        if (!layer.mass.empty())
          mass_sel.insert(mass_sel.end(), layer.mass.begin() + a, layer.mass.begin() + a + n);
      }
      HeadView view{k_sel.data(),
                    v_sel.data(),
                    pos_sel.data(),
                    layer.mass.empty() ? nullptr : mass_sel.data(),
                    int64_t(pos_sel.size()),
                    D};
      weights.resize(size_t(G) * pos_sel.size());
      std::vector<int32_t> qpos(size_t(G), header.probe_positions[size_t(step)]);
      attention_weights(view, q.data(), qpos.data(), G, weights.data());
      attention_apply(view, weights.data(), G, out.data());
      for (int g = 0; g < G; ++g) {
        const float* ref = full.data() + ((h * G + g) * steps + step) * D;
        double diff = 0, norm = 0, cand = 0;
        for (int c = 0; c < D; ++c) {
          diff += double(out[size_t(g * D + c)] - ref[c]) * (out[size_t(g * D + c)] - ref[c]);
          norm += double(ref[c]) * ref[c];
          cand += double(out[size_t(g * D + c)]) * out[size_t(g * D + c)];
        }
        // As kv-eval counts it: a zero reference row errs 1 if the candidate is not zero too.
        // A NaN row (only with --allow-nonfinite) makes the mean NaN rather than counting as 0.
        s.rel_error += std::isnan(diff + norm + cand) ? double(NAN)
                       : norm > 0                     ? std::sqrt(diff / norm)
                       : cand > 0                     ? 1.0
                                                      : 0.0;
        ++s.rows;
      }
      head_steps[size_t(h) * size_t(steps) + size_t(step)] = s;
    }
  }
  SimulateStats total;
  total.steps = steps;
  for (int64_t step = 0; step < steps; ++step) {
    SimulateStats layer_step;
    for (int h = 0; h < H; ++h) layer_step += head_steps[size_t(h) * size_t(steps) + size_t(step)];
    // One transfer per step for the layer: the pages its heads miss move together.
    layer_step.stall_seconds = o.link.seconds(layer_step.bytes_fetched);
    per_step[size_t(step)] += layer_step;
    total += layer_step;
  }
  return total;
}

// ---- tiers
// ---------------------------------------------------------------------------------------

namespace {

int64_t parse_bytes(const std::string& text, const std::string& spec) {
  // Plain decimal digits, with at most one point, then the unit: stod alone would also take
  // spaces, signs, hex and exponents, none of which a size is written with.
  const size_t used = std::min(text.find_first_not_of("0123456789."), text.size());
  double v = -1;
  if (used > 0 && text[0] != '.' && std::count(text.begin(), text.begin() + long(used), '.') <= 1)
    v = std::stod(text.substr(0, used));
  const std::string unit = text.substr(used);
  double scale = 0;
  if (unit.empty() || unit == "B")
    scale = 1;
  else if (unit == "K" || unit == "KB")
    scale = 1e3;
  else if (unit == "M" || unit == "MB")
    scale = 1e6;
  else if (unit == "G" || unit == "GB")
    scale = 1e9;
  else if (unit == "KiB")
    scale = 1024.0;
  else if (unit == "MiB")
    scale = 1024.0 * 1024;
  else if (unit == "GiB")
    scale = 1024.0 * 1024 * 1024;
  if (scale == 0 || !(v >= 0) || !std::isfinite(v * scale) || v * scale > 9e18)
    throw Error(Exit::usage, str("tier '", spec, "': capacity '", text,
                                 "' is not a size such as 512MiB or 2GiB"));
  return int64_t(v * scale);
}

}  // namespace

Tier Tier::parse(const std::string& spec) {
  const auto colon = spec.find(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == spec.size())
    throw Error(Exit::usage, str("tier '", spec, "' is not NAME:CAPACITY or disk:DIR"));
  Tier t;
  t.name = spec.substr(0, colon);
  if (t.name.find_first_not_of(
          "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") != std::string::npos)
    throw Error(Exit::usage, str("tier '", spec, "': a name is letters, digits, _ and -"));
  if (t.name != "disk" && (t.name.size() == 4 && ::strncasecmp(t.name.c_str(), "disk", 4) == 0))
    throw Error(Exit::usage, str("tier '", spec, "': the page store tier is spelled disk:DIR"));
  const std::string rest = spec.substr(colon + 1);
  if (t.name == "disk") {
    const auto last = rest.rfind(':');
    t.dir = last == std::string::npos ? rest : rest.substr(0, last);
    if (last != std::string::npos) t.capacity = parse_bytes(rest.substr(last + 1), spec);
    if (t.dir.empty()) throw Error(Exit::usage, str("tier '", spec, "' names no directory"));
  } else {
    t.capacity = parse_bytes(rest, spec);
  }
  return t;
}

void place_pages(std::vector<PlacedPage>& pages, const std::vector<Tier>& tiers) {
  if (tiers.empty()) throw Error(Exit::usage, "give at least one --tier");
  std::vector<int64_t> room;
  for (const Tier& t : tiers) room.push_back(t.capacity < 0 ? INT64_MAX : t.capacity);
  int64_t always_bytes = 0;
  for (PlacedPage& p : pages) p.tier = -1;
  for (PlacedPage& p : pages)
    if (p.always) {
      always_bytes += p.bytes;
      p.tier = 0;
    }
  if (always_bytes > room[0])
    throw Error(Exit::usage,
                str("tier ", tiers[0].name, " (", room[0],
                    " bytes) cannot hold the sink and recent pages (", always_bytes, " bytes)"));
  room[0] -= always_bytes;
  std::vector<size_t> order;
  for (size_t i = 0; i < pages.size(); ++i)
    if (!pages[i].always) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (pages[a].heat != pages[b].heat) return pages[a].heat > pages[b].heat;
    if (pages[a].layer != pages[b].layer) return pages[a].layer < pages[b].layer;
    return pages[a].page < pages[b].page;
  });
  int64_t unplaced = 0;
  for (size_t i : order) {
    PlacedPage& p = pages[i];
    for (size_t t = 0; t < tiers.size() && p.tier < 0; ++t)
      if (room[t] >= p.bytes) {
        room[t] -= p.bytes;
        p.tier = int(t);
      }
    if (p.tier < 0) unplaced += p.bytes;
  }
  if (unplaced) {
    const bool has_disk =
        std::any_of(tiers.begin(), tiers.end(), [](const Tier& t) { return t.disk(); });
    throw Error(Exit::usage,
                str("the tiers cannot hold the cache: ", unplaced, " bytes of pages do not fit (",
                    has_disk ? "raise a tier's capacity, or give the disk tier none"
                             : "add a disk:DIR tier",
                    ")"));
  }
}

// The store as snapshots name it: absolute and normalized (formats/kvsnap.md 9.6), no trailing
// separator ("disk:st/" and "disk:st" are one store).
std::string store_path(const PageStore& store) {
  std::filesystem::path p = std::filesystem::absolute(store.dir()).lexically_normal();
  if (!p.has_filename() && p.has_parent_path() && p != p.root_path()) p = p.parent_path();
  return p.string();
}

Encoded page_out(const Tensor& x, const std::vector<int64_t>& head_offsets, int page_size,
                 const std::vector<uint8_t>& external, PageStore& store, bool zstd, bool keys) {
  Encoded out;
  out.encoding = default_encoding("paged", 'k');
  out.encoding.page_size = page_size;
  out.encoding.dtype = kvk::dtype_name(x.dtype());
  // Absolute, so that the snapshot finds its store from any working directory.
  out.encoding.store = store_path(store);
  const size_t row_bytes = size_t(x.cols()) * kvk::dtype_size(x.dtype());
  CodeArray local, flags, ids;
  local.name = "local";
  flags.name = "external";
  ids.name = "ids";
  const auto* data = static_cast<const uint8_t*>(x.data());
  size_t page = 0;
  for (size_t h = 0; h + 1 < head_offsets.size(); ++h)
    for (int64_t r = head_offsets[h]; r < head_offsets[h + 1]; r += page_size, ++page) {
      const int64_t n = std::min<int64_t>(page_size, head_offsets[h + 1] - r);
      const uint8_t* rows = data + size_t(r) * row_bytes;
      const size_t bytes = size_t(n) * row_bytes;
      flags.bytes.push_back(external.at(page));
      if (external[page]) {
        PageStore::append_id_bytes(store.put(rows, bytes, zstd), ids.bytes);
      } else {
        local.bytes.insert(local.bytes.end(), rows, rows + bytes);
      }
    }
  for (CodeArray* a : {&local, &flags, &ids}) out.arrays.push_back(std::move(*a));  // (not copied)
  if (keys) {  // each page's Quest bounds and landmark, for query-aware fetching
    const PageTable t = build_pages(head_offsets, x.to_f32(), int(x.cols()), page_size);
    for (auto [name, values] :
         {std::pair{"page_key_min", &t.key_min}, std::pair{"page_key_max", &t.key_max},
          std::pair{"page_key_mean", &t.key_mean}}) {
      CodeArray a;
      a.name = name;
      a.type = CodeArray::Type::f32;
      a.bytes.resize(values->size() * sizeof(float));
      if (!a.bytes.empty()) std::memcpy(a.bytes.data(), values->data(), a.bytes.size());
      out.arrays.push_back(std::move(a));
    }
  }
  return out;
}

// The object: "KVTKENC1", a u32 array count, then per array a u8 type, a u8 name length, the
// name, a u64 byte count and the bytes (little-endian throughout).
constexpr char kExternalMagic[8] = {'K', 'V', 'T', 'K', 'E', 'N', 'C', '1'};

Encoded put_external(const Encoded& enc, PageStore& store, bool zstd) {
  if (enc.encoding.dense() || enc.encoding.scheme == "paged" || enc.encoding.scheme == "external")
    throw Error(Exit::software, "put_external: '" + enc.encoding.scheme + "' is not an encoding");
  std::vector<uint8_t> blob(kExternalMagic, kExternalMagic + 8);
  auto put_le = [&](uint64_t v, int n) {
    for (int b = 0; b < n; ++b) blob.push_back(uint8_t(v >> (8 * b)));
  };
  put_le(enc.arrays.size(), 4);
  for (const CodeArray& a : enc.arrays) {
    put_le(uint64_t(a.type), 1);
    put_le(a.name.size(), 1);
    blob.insert(blob.end(), a.name.begin(), a.name.end());
    put_le(a.bytes.size(), 8);
    blob.insert(blob.end(), a.bytes.begin(), a.bytes.end());
  }
  Encoded out;
  out.encoding = enc.encoding;
  out.encoding.inner = enc.encoding.scheme;
  out.encoding.scheme = "external";
  out.encoding.store = store_path(store);
  CodeArray ids;
  ids.name = "ids";
  PageStore::append_id_bytes(store.put(blob.data(), blob.size(), zstd), ids.bytes);
  out.arrays.push_back(std::move(ids));
  return out;
}

Encoded fetch_external(const Encoded& external) {
  const CodeArray* ids = nullptr;
  for (const CodeArray& a : external.arrays)
    if (a.name == "ids") ids = &a;
  if (!ids || ids->type != CodeArray::Type::u8 || ids->bytes.size() != 32)
    throw Error(Exit::data, "external tensor: 'ids' is not one 32-byte page id");
  const std::string id = PageStore::id_from_bytes(ids->bytes.data());
  const auto store = PageStore::open_for_reading(external.encoding.store);
  const std::vector<uint8_t> blob = store->get(id);  // (its errors name the store)
  try {
    return parse_external_object(blob, id, external.encoding.inner_encoding());
  } catch (const Error& e) {
    throw Error(e.code(), str("page store '", store->dir(), "': ", e.what()));
  }
}

Encoded parse_external_object(const std::vector<uint8_t>& blob, const std::string& id,
                              const Encoding& inner) {
  size_t at = 0;
  auto take = [&](size_t n) {
    if (blob.size() - at < n)
      throw Error(Exit::data, "page " + id + " is not an encoded tensor (truncated)");
    const uint8_t* p = blob.data() + at;
    at += n;
    return p;
  };
  auto get_le = [&](int n) {
    const uint8_t* p = take(size_t(n));
    uint64_t v = 0;
    for (int b = 0; b < n; ++b) v |= uint64_t(p[b]) << (8 * b);
    return v;
  };
  if (std::memcmp(take(8), kExternalMagic, 8) != 0)
    throw Error(Exit::data, "page " + id + " is not an encoded tensor (no KVTKENC1 header)");
  Encoded enc;
  enc.encoding = inner;
  for (uint64_t n = get_le(4); n > 0; --n) {
    CodeArray a;
    const uint64_t type = get_le(1);
    if (type > uint64_t(CodeArray::Type::i32))
      throw Error(Exit::data, str("page ", id, ": array type ", type, " is unknown"));
    a.type = CodeArray::Type(type);
    const size_t name_length = get_le(1);
    const auto* name = reinterpret_cast<const char*>(take(name_length));
    a.name.assign(name, name_length);
    // A name becomes an HDF5 dataset name when the tensor is restored: a plain, new one.
    const bool plain = !a.name.empty() && a.name.find_first_of("/.") == std::string::npos;
    if (!plain || std::any_of(enc.arrays.begin(), enc.arrays.end(),
                              [&](const CodeArray& b) { return b.name == a.name; }))
      throw Error(Exit::data, str("page ", id, ": array name '", a.name, "' is empty, not plain ",
                                  "or repeated"));
    const uint64_t bytes = get_le(8);
    if (bytes > blob.size() - at || bytes % CodeArray::element_size(a.type))
      throw Error(Exit::data, str("page ", id, ": array '", a.name, "' is truncated"));
    const uint8_t* p = take(size_t(bytes));
    a.bytes.assign(p, p + bytes);
    enc.arrays.push_back(std::move(a));
  }
  if (at != blob.size()) throw Error(Exit::data, "page " + id + " has bytes after its arrays");
  return enc;
}

std::vector<std::string> page_prefix_ids(const Header& header, const Layer& layer, int page_size) {
  std::vector<std::string> ids;
  for (size_t h = 0; h + 1 < layer.head_offsets.size(); ++h) {
    std::string parent;
    for (int64_t r = layer.head_offsets[h]; r < layer.head_offsets[h + 1]; r += page_size) {
      const int64_t n = std::min<int64_t>(page_size, layer.head_offsets[h + 1] - r);
      std::string block = parent;
      for (int64_t i = r; i < r + n; ++i) {
        const int32_t token = header.tokens[size_t(layer.positions[size_t(i)])];
        for (int b = 0; b < 4; ++b) block.push_back(char(uint32_t(token) >> (8 * b)));
      }
      parent = sha256_hex(block.data(), block.size());
      ids.push_back(parent);
    }
  }
  return ids;
}

}  // namespace kv
