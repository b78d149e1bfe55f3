// kv-offload: paged caches and what query-aware fetching from a slower tier costs and keeps.
//   kv-offload simulate --budget N [--page P] [--score quest|landmark] [--link L] [INPUT]
#include <cstdio>
#include <iostream>

#include "common/tool.h"
#include "kv/error.h"
#include "kv/json.h"
#include "kv/offload.h"
#include "kv/str.h"

namespace {

kv::Json stats_json(const kv::SimulateStats& s) {
  kv::Json j = kv::Json::object();
  j.set("rel_error", s.rows ? s.rel_error / double(s.rows) : 0.0);
  j.set("pages_selected", s.pages_selected).set("pages_hit", s.pages_hit);
  j.set("pages_fetched", s.pages_fetched).set("bytes_fetched", s.bytes_fetched);
  j.set("hit_rate", s.pages_selected ? double(s.pages_hit) / double(s.pages_selected) : 0.0);
  j.set("stall_seconds", s.stall_seconds).set("tokens_attended", s.tokens_attended);
  return j;
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
  tool.add_json_option();

  return tool.run(argc, argv, [&] {
    o.link = kv::Link::parse(link);
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
    std::printf(
        "attention   rel. error %.6f over %lld (layer, query head, step) rows; %lld "
        "tokens attended\n",
        mean_err, (long long)total.rows, (long long)total.tokens_attended);
    std::printf(
        "fetch       %lld of %lld selected pages fetched (hit rate %.3f), %s moved, "
        "stall %.3f ms\n",
        (long long)total.pages_fetched, (long long)total.pages_selected, hit,
        kvt::human_bytes(total.bytes_fetched).c_str(), total.stall_seconds * 1e3);
    if (per_step) {
      std::printf("\n  step  rel.error  selected  fetched  hit rate  bytes moved  stall(us)\n");
      for (size_t i = 0; i < steps.size(); ++i) {
        const kv::SimulateStats& s = steps[i];
        std::printf("  %4zu  %9.6f  %8lld  %7lld  %8.3f  %11.0f  %9.2f\n", i,
                    s.rows ? s.rel_error / double(s.rows) : 0.0, (long long)s.pages_selected,
                    (long long)s.pages_fetched,
                    s.pages_selected ? double(s.pages_hit) / double(s.pages_selected) : 0.0,
                    s.bytes_fetched, s.stall_seconds * 1e6);
      }
    }
  });
}
