// kv-offload: paged caches and what query-aware fetching from a slower tier costs and keeps.
//   kv-offload simulate --budget N [--page P] [--score quest|landmark] [--link L] [INPUT]
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <memory>
#include <set>

#include "common/tool.h"
#include "kv/error.h"
#include "kv/file.h"
#include "kv/json.h"
#include "kv/offload.h"
#include "kv/page_store.h"
#include "kv/str.h"

namespace {

double kvbench_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A layer with an encoded k or v (kept as stored: ReadOptions::keep_stored) is placed and stored
// tensor by tensor, each whole; a dense layer page by page, k and v rows together.
// tier, share and restore pass layers through: encoded tensors are written back as they were read.
kv::ReadOptions verbatim(const kvt::Tool& tool) {
  kv::ReadOptions o = tool.read_options();
  o.keep_stored = true;
  return o;
}

bool whole_tensors(const kv::Layer& layer) {
  return layer.k_stored || layer.v_stored;
}

// Moves layer's k (or v) whole into the store: an encoded one as one external object, a dense
// one as pages, all of them in the store.
void store_whole(kv::Layer& layer, bool keys, int page_size, kv::PageStore& store, bool zstd) {
  const std::shared_ptr<const kv::Encoded>& stored = keys ? layer.k_stored : layer.v_stored;
  const kv::Tensor& t = keys ? layer.k : layer.v;
  kv::Encoded moved;
  if (stored) {
    moved = kv::put_external(*stored, store, zstd);
  } else {
    int64_t n_pages = 0;
    for (size_t h = 0; h + 1 < layer.head_offsets.size(); ++h)
      n_pages += (layer.head_offsets[h + 1] - layer.head_offsets[h] + page_size - 1) / page_size;
    moved = kv::page_out(t, layer.head_offsets, page_size,
                         std::vector<uint8_t>(static_cast<size_t>(n_pages), 1), store, zstd, keys);
  }
  (keys ? layer.k_stored : layer.v_stored) = std::make_shared<const kv::Encoded>(std::move(moved));
}

// Whether `path` is `dir` or lies under it (both made absolute and canonical as far as they
// exist): a page store this run writes must not hold its output or one of its inputs.
bool path_within(const std::string& path, const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path p = fs::weakly_canonical(fs::absolute(path), ec),
                 d = fs::weakly_canonical(fs::absolute(dir), ec);
  const auto [end, at] = std::mismatch(d.begin(), d.end(), p.begin(), p.end());
  return end == d.end();
}

void check_outside_store(const std::string& path, const std::string& what,
                         const std::string& store) {
  if (path != "-" && path_within(path, store))
    throw kv::Error(kv::Exit::usage, "the " + what + " '" + path + "' is inside the page store '" +
                                         store + "' this run writes; keep them apart");
}

kv::Json stats_json(const kv::SimulateStats& s) {
  kv::Json j = kv::Json::object();
  j.set("rel_error", s.rows ? kv::Json(s.rel_error / double(s.rows)) : kv::Json(nullptr));
  j.set("pages_selected", s.pages_selected).set("pages_hit", s.pages_hit);
  j.set("pages_fetched", s.pages_fetched).set("bytes_fetched", s.bytes_fetched);
  j.set("hit_rate", s.pages_selected ? double(s.pages_hit) / double(s.pages_selected) : 0.0);
  j.set("stall_seconds", s.stall_seconds).set("tokens_attended", s.tokens_attended);
  return j;
}

void run_tier(kvt::Tool& tool, const std::string& input, const std::vector<std::string>& specs,
              const std::string& place, bool zstd, const kv::SimulateOptions& o) {
  std::vector<kv::Tier> tiers;
  int disk = -1;
  std::set<std::string> names;
  for (const std::string& s : specs) {
    tiers.push_back(kv::Tier::parse(s));
    if (tiers.back().disk()) {
      if (disk >= 0) throw kv::Error(kv::Exit::usage, "give at most one disk:DIR tier");
      disk = int(tiers.size()) - 1;
    }
    if (!names.insert(tiers.back().name).second)
      throw kv::Error(kv::Exit::usage, "two tiers are named '" + tiers.back().name + "'");
  }
  if (disk >= 0 && disk + 1 != int(tiers.size()))
    throw kv::Error(kv::Exit::usage, "the disk tier is the slowest: give it last");
  if (zstd && disk < 0)
    throw kv::Error(kv::Exit::usage,
                    "--page-codec applies to page files: it needs a disk:DIR tier");
  if (disk >= 0) {
    check_outside_store(tool.output, "output", tiers[size_t(disk)].dir);
    check_outside_store(input, "input", tiers[size_t(disk)].dir);
  }
  if (o.page_size < 16 || o.page_size > 256)
    throw kv::Error(kv::Exit::usage, kv::str("--page ", o.page_size, " is outside 16..256"));
  if (o.sink_pages < 0 || o.recent_pages < 0)
    throw kv::Error(kv::Exit::usage, "--sink-pages and --recent-pages cannot be negative");
  tool.check_output();
  kv::SnapshotReader reader(input, verbatim(tool));
  kv::Header header = reader.header();
  const kv::ModelInfo& m = header.model;
  if (place == "attention" && !header.has_attn_stats)
    throw kv::Error(kv::Exit::data,
                    "--place attention needs attention statistics (kv-capture "
                    "--attn-stats)");
  // Pass 1: every page's size and heat.
  std::vector<kv::PlacedPage> pages;
  std::vector<size_t> layer_first;  // index of each layer's first page in `pages`
  kv::Layer layer;
  for (int l = 0; l < m.n_layers; ++l) {
    tool.progress("layer", l, 2 * m.n_layers);
    reader.read_layer(l, layer);
    std::vector<float> importance;
    if (place == "attention")
      importance = kv::entry_importance(m, layer.head_offsets, layer.positions, layer.attn_acc);
    layer_first.push_back(pages.size());
    if (whole_tensors(layer)) {  // k then v, each placed whole; heat as for one page of it all
      for (const auto& [t, stored] :
           {std::pair{&layer.k, layer.k_stored}, std::pair{&layer.v, layer.v_stored}}) {
        kv::PlacedPage p;
        p.layer = l;
        p.page = int64_t(pages.size() - layer_first.back());
        p.bytes = stored ? stored->bytes() : t->bytes();
        if (layer.entries() > 0) {
          if (place == "recent")
            p.heat = *std::max_element(layer.positions.begin(), layer.positions.end());
          else if (place == "prefix")
            p.heat = -double(*std::min_element(layer.positions.begin(), layer.positions.end()));
          else
            for (float x : importance) p.heat += x;
        }
        pages.push_back(p);
      }
      continue;
    }
    const int64_t row_bytes = int64_t(m.head_dim) * int64_t(kvk::dtype_size(layer.k.dtype()) +
                                                            kvk::dtype_size(layer.v.dtype()));
    int64_t index = 0;
    for (size_t h = 0; h + 1 < layer.head_offsets.size(); ++h) {
      const int64_t a = layer.head_offsets[h], b = layer.head_offsets[h + 1];
      const int64_t np = (b - a + o.page_size - 1) / o.page_size;
      for (int64_t i = 0; i < np; ++i, ++index) {
        const int64_t r = a + i * o.page_size, n = std::min<int64_t>(o.page_size, b - r);
        kv::PlacedPage p;
        p.layer = l;
        p.page = index;
        p.bytes = n * row_bytes;
        p.always = i < o.sink_pages || i >= np - o.recent_pages;
        if (place == "recent")
          p.heat = layer.positions[size_t(r + n - 1)];
        else if (place == "prefix")
          p.heat = -double(layer.positions[size_t(r)]);
        else
          for (int64_t j = r; j < r + n; ++j) p.heat += importance[size_t(j)];
        pages.push_back(p);
      }
    }
  }
  kv::place_pages(pages, tiers);
  // Pass 2: the snapshot, its disk pages in the store.
  tool.stamp(header);
  const kv::WriteOptions write_options = tool.write_options(reader.path());  // (before the store)
  std::unique_ptr<kv::PageStore> store;
  if (disk >= 0) store = std::make_unique<kv::PageStore>(tiers[size_t(disk)].dir, true);
  double write_seconds = 0, read_seconds = 0, disk_bytes = 0, read_bytes = 0;
  try {
    kv::SnapshotWriter writer(tool.output, header, write_options);
    for (int l = 0; l < m.n_layers; ++l) {
      tool.progress("layer", m.n_layers + l, 2 * m.n_layers);
      reader.read_layer(l, layer);
      const size_t first = layer_first[size_t(l)];
      const size_t count =
          (size_t(l) + 1 < layer_first.size() ? layer_first[size_t(l) + 1] : pages.size()) - first;
      std::vector<uint8_t> external(count, 0);
      for (size_t i = 0; i < count; ++i) external[i] = pages[first + i].tier == disk;
      if (store && whole_tensors(layer)) {
        const double t0 = kvbench_now();
        if (external[0]) store_whole(layer, true, o.page_size, *store, zstd);
        if (external[1]) store_whole(layer, false, o.page_size, *store, zstd);
        write_seconds += kvbench_now() - t0;
      } else if (store) {
        const double t0 = kvbench_now();
        layer.k_stored = std::make_shared<kv::Encoded>(
            kv::page_out(layer.k, layer.head_offsets, o.page_size, external, *store, zstd, true));
        layer.v_stored = std::make_shared<kv::Encoded>(
            kv::page_out(layer.v, layer.head_offsets, o.page_size, external, *store, zstd, false));
        write_seconds += kvbench_now() - t0;
      }
      writer.write_layer(layer);
    }
    if (store) {
      // The manifest before the snapshot: a snapshot never names a page its store does not
      // list. Then every page the snapshot references is read back and checked against its id
      // (a page file already in the store may have been damaged): the output appears only if
      // all of them are sound. The read also gives the report's read speed.
      double t0 = kvbench_now();
      store->commit();
      write_seconds += kvbench_now() - t0;
      t0 = kvbench_now();
      for (const std::string& id : store->put_ids()) read_bytes += double(store->get(id).size());
      read_seconds = kvbench_now() - t0;
    }
    writer.finish();
  } catch (...) {
    if (store) store->rollback();  // the store as it was: no pages or manifest of this run
    throw;
  }
  tool.progress_done();
  if (tool.quiet) return;
  std::vector<int64_t> tier_pages(tiers.size(), 0), tier_bytes(tiers.size(), 0);
  for (const kv::PlacedPage& p : pages) {
    ++tier_pages[size_t(p.tier)];
    tier_bytes[size_t(p.tier)] += p.bytes;
  }
  for (size_t t = 0; t < tiers.size(); ++t) {
    if (int(t) == disk) disk_bytes = double(tier_bytes[t]);
    std::fprintf(stderr, "kv-offload: tier %-6s %6lld pages, %s%s\n", tiers[t].name.c_str(),
                 (long long)tier_pages[t], kvt::human_bytes(double(tier_bytes[t])).c_str(),
                 tiers[t].capacity < 0
                     ? ""
                     : (" of " + kvt::human_bytes(double(tiers[t].capacity))).c_str());
  }
  if (store && disk_bytes > 0) {
    // Measured on this machine: the page files written above, then read back (page cache),
    // beside the modelled NVMe link.
    const kv::Link nvme = kv::Link::parse("nvme");
    std::fprintf(stderr,
                 "kv-offload: disk %s: wrote %s at %.2f GB/s (synced), read its %zu pages "
                 "(%s) back at %.2f GB/s; modelled nvme read: %.2f GB/s\n",
                 store->dir().c_str(), kvt::human_bytes(disk_bytes).c_str(),
                 disk_bytes / write_seconds / 1e9, store->put_ids().size(),
                 kvt::human_bytes(read_bytes).c_str(), read_bytes / read_seconds / 1e9, nvme.gbps);
  }
}

// Every page of each input into one store; each input's snapshot, all pages referenced, into
// OUTDIR. Pages are content-addressed, so the pages of a shared prefix are stored once.
void run_share(kvt::Tool& tool, const std::vector<std::string>& inputs, const std::string& dir,
               const std::string& out_dir, bool zstd, int page_size) {
  if (page_size < 16 || page_size > 256)
    throw kv::Error(kv::Exit::usage, kv::str("--page ", page_size, " is outside 16..256"));
  std::set<std::string> names;
  for (const std::string& in : inputs) {
    const std::string name = std::filesystem::path(in).filename().string();
    if (in == "-" || name.empty())
      throw kv::Error(kv::Exit::usage, "share reads named snapshots, not stdin");
    if (!names.insert(name).second)
      throw kv::Error(kv::Exit::usage,
                      "two inputs are named '" + name + "'; OUTDIR needs distinct names");
  }
  // Everything that can be checked before a directory is made: the codec, every input and
  // where its output goes. A run refused here, or failing later, leaves no store, no OUTDIR
  // and no output of its own behind (the outputs appear together, after the store's manifest).
  kv::Codec::parse(tool.codec);
  check_outside_store(out_dir, "OUTDIR", dir);
  struct stat st {};
  const bool out_dir_exists = ::stat(out_dir.c_str(), &st) == 0;
  if (out_dir_exists && !S_ISDIR(st.st_mode))
    throw kv::Error(kv::Exit::cant_create, "OUTDIR '" + out_dir + "' is not a directory");
  for (const std::string& in : inputs) {
    check_outside_store(in, "input", dir);
    kv::SnapshotReader(in, verbatim(tool));
    const std::string out = out_dir + "/" + std::filesystem::path(in).filename().string();
    if (kv::same_file(in, out))
      throw kv::Error(kv::Exit::usage, "OUTDIR would overwrite the input '" + in + "'");
  }
  kv::PageStore store(dir, true);
  bool made_out_dir = false;
  std::vector<std::unique_ptr<kv::SnapshotWriter>> writers;
  std::string table = kv::format("%-24s %7s %12s %12s %13s\n", "input", "pages", "k+v bytes",
                                 "new stored", "prefix pages");
  std::set<std::string> seen_prefix;  // (layer, head-relative) prefix ids of earlier inputs
  double total_bytes = 0, total_stored = 0;
  int64_t total_pages = 0, total_shared = 0;
  try {
    if (!out_dir_exists) {
      if (::mkdir(out_dir.c_str(), 0777) != 0)
        throw kv::Error(kv::Exit::cant_create,
                        "cannot create '" + out_dir + "': " + kv::errno_text());
      made_out_dir = true;
    }
    for (const std::string& in : inputs) {
      kv::SnapshotReader reader(in, verbatim(tool));
      kv::Header header = reader.header();
      const std::string out = out_dir + "/" + std::filesystem::path(in).filename().string();
      tool.stamp(header);
      kv::WriteOptions wo = tool.write_options(reader.path());
      writers.push_back(std::make_unique<kv::SnapshotWriter>(out, header, wo));
      kv::SnapshotWriter& writer = *writers.back();
      int64_t pages = 0, shared = 0;
      double bytes = 0, stored_before = 0, stored_after = 0;
      for (const auto& [id, e] : store.entries()) stored_before += double(e.stored);
      std::set<std::string> mine;
      kv::Layer layer;
      for (int l = 0; l < header.model.n_layers; ++l) {
        reader.read_layer(l, layer);
        if (whole_tensors(layer)) {  // encoded: equal tensors are stored once, as equal pages
          bytes += double((layer.k_stored ? layer.k_stored->bytes() : layer.k.bytes()) +
                          (layer.v_stored ? layer.v_stored->bytes() : layer.v.bytes()));
          store_whole(layer, true, page_size, store, zstd);
          store_whole(layer, false, page_size, store, zstd);
          pages += 2;
          writer.write_layer(layer);
          continue;
        }
        const std::vector<std::string> ids = kv::page_prefix_ids(header, layer, page_size);
        for (const std::string& id : ids) {
          const std::string key =
              kv::str(header.model.file_sha256, "/", header.model.name, "/", l, "/", id);
          shared += seen_prefix.count(key);
          mine.insert(key);
        }
        pages += int64_t(ids.size());
        const std::vector<uint8_t> all(ids.size(), 1);
        layer.k_stored = std::make_shared<kv::Encoded>(
            kv::page_out(layer.k, layer.head_offsets, page_size, all, store, zstd, true));
        layer.v_stored = std::make_shared<kv::Encoded>(
            kv::page_out(layer.v, layer.head_offsets, page_size, all, store, zstd, false));
        bytes += double(layer.k.bytes() + layer.v.bytes());
        writer.write_layer(layer);
      }
      seen_prefix.insert(mine.begin(), mine.end());
      for (const auto& [id, e] : store.entries()) stored_after += double(e.stored);
      table += kv::format("%-24s %7lld %12.0f %12.0f %13lld\n",
                          std::filesystem::path(in).filename().c_str(), (long long)pages, bytes,
                          stored_after - stored_before, (long long)shared);
      total_pages += pages;
      total_shared += shared;
      total_bytes += bytes;
      total_stored += stored_after - stored_before;
    }
    store.commit();  // before the snapshots that reference its pages
    for (auto& w : writers) w->finish();
  } catch (...) {
    writers.clear();  // unfinished outputs are discarded
    store.rollback();
    if (made_out_dir) ::rmdir(out_dir.c_str());
    throw;
  }
  std::fputs(table.c_str(), stdout);
  std::printf(
      "total: %lld pages (%lld of them prefix pages seen in an earlier input), k+v %s, "
      "stored %s, saved %s (%.1f%%)\n",
      (long long)total_pages, (long long)total_shared, kvt::human_bytes(total_bytes).c_str(),
      kvt::human_bytes(total_stored).c_str(), kvt::human_bytes(total_bytes - total_stored).c_str(),
      total_bytes > 0 ? 100.0 * (total_bytes - total_stored) / total_bytes : 0.0);
}

void run_restore(kvt::Tool& tool, const std::string& input) {
  tool.check_output();
  kv::SnapshotReader reader(input, verbatim(tool));
  kv::Header header = reader.header();
  tool.stamp(header);
  kv::SnapshotWriter writer(tool.output, header, tool.write_options(reader.path()));
  kv::Layer layer;
  for (int l = 0; l < header.model.n_layers; ++l) {
    tool.progress("layer", l, header.model.n_layers);
    reader.read_layer(l, layer);  // paged tensors come back dense, in their dtype
    writer.write_layer(layer);
  }
  writer.finish();
  tool.progress_done();
}

}  // namespace

int main(int argc, char** argv) {
  kvt::Tool tool("kv-offload",
                 "Paged KV caches and tiered offload. 'simulate' replays the probe queries "
                 "against a cache cut into pages: each step attends only the pages a query-aware "
                 "score ranks highest within a token budget, fetching missing pages into a fast "
                 "tier over a modelled link, and reports pages and bytes moved, hit rate, stall "
                 "time and the attention error against the full cache.");
  auto& app = tool.app();
  app.require_subcommand(1);
  std::string input = "-", link = "pcie5";
  bool per_step = false;
  kv::SimulateOptions o;
  CLI::App* sim =
      app.add_subcommand("simulate", "Query-aware page selection and fetch, step by step");
  sim->add_option("INPUT", input, "Snapshot with probe queries (kv-capture --probe); - reads stdin")
      ->default_val("-");
  sim->fallthrough();
  sim->add_option("-b,--budget", o.budget,
                  "Tokens each KV head attends per step, in whole pages (sink and recent pages "
                  "included)")
      ->required();
  sim->add_option("-p,--page", o.page_size, "Entries per page, 16..256")->default_val(16);
  sim->add_option("--score", o.score,
                  "Page score: quest (upper bound from per-channel key min/max) or landmark "
                  "(query . mean key)")
      ->default_val("quest")
      ->check(CLI::IsMember({"quest", "landmark"}));
  sim->add_option("--sink-pages", o.sink_pages, "First pages of each head, always attended")
      ->default_val(1);
  sim->add_option("--recent-pages", o.recent_pages, "Last pages of each head, always attended")
      ->default_val(1);
  sim->add_option("--fast-capacity", o.fast_capacity,
                  "Tokens per KV head the fast tier holds (LRU); default: the budget");
  sim->add_option("--link", link,
                  "Link the missing pages cross: pcie5, c2c, nvme, or GBPS,LATENCY_US")
      ->default_val("pcie5");
  sim->add_flag("--per-step", per_step, "Also print every probe step");
  bool no_attention = false;
  sim->add_flag("--no-attention", no_attention,
                "Only pages, fetches and stalls: skip the attention outputs and their error "
                "(for large caches)");
  sim->add_flag("--json", tool.json, "Print one JSON object");
  tool.add_allow_nonfinite_option(sim);

  // tier: placement into memory tiers and a disk page store.
  std::vector<std::string> tier_specs;
  std::string place = "recent", page_codec = "none";
  CLI::App* tier = app.add_subcommand(
      "tier", "Place a cache's pages into tiers, fastest first; disk pages go to a page store");
  tier->add_option("INPUT", input, "Snapshot, dense or encoded; - reads stdin")->default_val("-");
  tier->add_option("-t,--tier", tier_specs,
                   "NAME:CAPACITY (e.g. gpu:2GiB, host:512MiB), or disk:DIR[:CAPACITY] for the "
                   "page store; repeat, fastest first")
      ->required()
      ->allow_extra_args(false);
  tier->add_option("--place", place,
                   "Which pages go to faster tiers: recent (latest positions), attention "
                   "(most attention received, kv-capture --attn-stats) or prefix (earliest)")
      ->default_val("recent")
      ->check(CLI::IsMember({"recent", "attention", "prefix"}));
  tier->add_option("-p,--page", o.page_size, "Entries per page, 16..256")->default_val(16);
  tier->add_option("--sink-pages", o.sink_pages, "First pages of each head, kept in the first tier")
      ->default_val(1);
  tier->add_option("--recent-pages", o.recent_pages,
                   "Last pages of each head, kept in the first tier")
      ->default_val(1);
  tier->add_option("--page-codec", page_codec, "Page files: none or zstd")
      ->default_val("none")
      ->check(CLI::IsMember({"none", "zstd"}));

  // restore: the whole cache back, dense.
  CLI::App* restore = app.add_subcommand(
      "restore", "Bring a tiered cache back whole: fetch its pages from the page store");
  restore->add_option("INPUT", input, "Snapshot written by 'kv-offload tier'; - reads stdin")
      ->default_val("-");
  // share: several caches into one page store, shared prefixes stored once.
  std::vector<std::string> share_inputs;
  std::string share_store, share_out;
  CLI::App* share = app.add_subcommand(
      "share", "Store several caches' pages in one page store: pages of a shared prefix once");
  share->add_option("INPUT", share_inputs, "Snapshots (named files)")->required();
  share->add_option("--store", share_store, "The page store directory")->required();
  share
      ->add_option("-O,--out-dir", share_out,
                   "Directory for each input's snapshot, its pages referenced in the store")
      ->required();
  share->add_option("-p,--page", o.page_size, "Entries per page, 16..256")->default_val(16);
  share->add_option("--page-codec", page_codec, "Page files: none or zstd")
      ->default_val("none")
      ->check(CLI::IsMember({"none", "zstd"}));
  tool.add_output_options();
  for (CLI::App* sub : {tier, restore, share}) sub->fallthrough();

  return tool.run(argc, argv, [&] {
    // The output options are the tool's (tier and restore write a snapshot); share writes into
    // OUTDIR and simulate writes none: given to them, they would be ignored.
    if (sim->parsed() || share->parsed())
      for (const char* name : {"--output", "--codec", "--force", "--no-provenance"})
        if (app.get_option(name)->count() > 0 && (sim->parsed() || std::string(name) == "--output"))
          throw kv::Error(kv::Exit::usage,
                          kv::str(name, " does not apply to ",
                                  sim->parsed() ? "simulate, which writes no snapshot"
                                                : "share, which writes into -O OUTDIR"));
    if (tier->parsed()) return run_tier(tool, input, tier_specs, place, page_codec == "zstd", o);
    if (restore->parsed()) return run_restore(tool, input);
    if (share->parsed())
      return run_share(tool, share_inputs, share_store, share_out, page_codec == "zstd",
                       o.page_size);
    o.link = kv::Link::parse(link);
    o.attention_error = !no_attention;
    kv::SnapshotReader reader(input, tool.read_options());
    const kv::Header& h = reader.header();
    kv::check_simulate_options(h, o);
    kv::SimulateStats total;
    std::vector<kv::SimulateStats> steps;
    std::vector<kv::Json> layers;
    kv::Layer layer;
    for (int l = 0; l < h.model.n_layers; ++l) {
      tool.progress("layer", l, h.model.n_layers);
      reader.read_layer(l, layer);
      const kv::SimulateStats s = kv::simulate_layer(h, layer, o, steps);
      total += s;
      layers.push_back(stats_json(s).set("layer", l));
    }
    tool.progress_done();
    const double mean_err = total.rows ? total.rel_error / double(total.rows) : 0.0;
    const double hit =
        total.pages_selected ? double(total.pages_hit) / double(total.pages_selected) : 0.0;
    if (tool.json) {
      kv::Json j = stats_json(total);
      j.set("file", input).set("budget", o.budget).set("page", int64_t(o.page_size));
      j.set("score", o.score).set("link", o.link.name).set("link_gbps", o.link.gbps);
      j.set("link_latency_us", o.link.latency_us).set("steps", total.steps);
      kv::Json lj = kv::Json::array();
      for (kv::Json& x : layers) lj.push(std::move(x));
      j.set("layers", std::move(lj));
      if (per_step) {
        kv::Json sj = kv::Json::array();
        for (const kv::SimulateStats& s : steps) sj.push(stats_json(s));
        j.set("per_step", std::move(sj));
      }
      std::cout << j.dump() << "\n";
      return;
    }
    std::printf(
        "simulate    %s: %lld probe steps, pages of %d, budget %lld tokens per KV head, "
        "score %s\n",
        input == "-" ? "stdin" : input.c_str(), (long long)total.steps, o.page_size,
        (long long)o.budget, o.score.c_str());
    std::printf("link        %s: %.1f GB/s, %.1f us per transfer (one per layer and step)\n",
                o.link.name.c_str(), o.link.gbps, o.link.latency_us);
    if (o.attention_error)
      std::printf(
          "attention   rel. error %.6f over %lld (layer, query head, step) rows; %lld "
          "tokens attended\n",
          mean_err, (long long)total.rows, (long long)total.tokens_attended);
    else
      std::printf("attention   not computed (--no-attention); %lld tokens attended\n",
                  (long long)total.tokens_attended);
    std::printf(
        "fetch       %lld of %lld selected pages fetched (hit rate %.3f), %s moved, "
        "stall %.3f ms\n",
        (long long)total.pages_fetched, (long long)total.pages_selected, hit,
        kvt::human_bytes(total.bytes_fetched).c_str(), total.stall_seconds * 1e3);
    if (per_step) {
      std::printf("\n  step  rel.error  selected  fetched  hit rate  bytes moved  stall(us)\n");
      for (size_t i = 0; i < steps.size(); ++i) {
        const kv::SimulateStats& s = steps[i];
        std::printf(
            "  %4zu  %9s  %8lld  %7lld  %8.3f  %11.0f  %9.2f\n", i,
            s.rows ? kv::str(std::fixed, std::setprecision(6), s.rel_error / double(s.rows)).c_str()
                   : "-",
            (long long)s.pages_selected, (long long)s.pages_fetched,
            s.pages_selected ? double(s.pages_hit) / double(s.pages_selected) : 0.0,
            s.bytes_fetched, s.stall_seconds * 1e6);
      }
    }
  });
}
