// kv-evict: keep the entries that matter, drop the rest (token eviction and budget allocation).
#include <cstdio>
#include <iostream>

#include "common/tool.h"
#include "kv/error.h"
#include "kv/evict.h"
#include "kv/json.h"
#include "kv/str.h"

namespace {

int64_t kv_bytes(const kv::Layer& layer, int64_t entries) {
  return entries * layer.k.cols() *
         int64_t(kvk::dtype_size(layer.k.dtype()) + kvk::dtype_size(layer.v.dtype()));
}

}  // namespace

int main(int argc, char** argv) {
  kvt::Tool tool("kv-evict",
                 "Keep the KV entries that matter and drop the rest: score every entry, "
                 "allocate a budget to each layer and KV head, write the kept entries (ragged "
                 "heads where budgets differ, so memory is really freed).");
  auto& app = tool.app();
  std::string input = "-", score = "", alloc = "uniform", group_agg = "mean", pool = "avg";
  kv::EvictOptions o;
  bool dry_run = false;
  tool.add_input(&input);
  app.add_option("-s,--score", score,
                 "What to keep: window (StreamingLLM sinks + recent), h2o (accumulated "
                 "attention + recent), tova (last query's attention), snapkv (pooled "
                 "observation-window attention), knorm (low key norm), random")
      ->required()
      ->check(CLI::IsMember({"window", "h2o", "tova", "snapkv", "knorm", "random"}));
  app.add_option("-a,--alloc", alloc,
                 "Budget per layer and head: uniform, pyramid (PyramidKV), adaptive (AdaKV)")
      ->default_val("uniform")
      ->check(CLI::IsMember({"uniform", "pyramid", "adaptive"}));
  auto* budget = app.add_option("-b,--budget", o.budget,
                                "Entries each KV head keeps (the mean per head for pyramid and "
                                "adaptive); sinks, recent and window count inside it");
  auto* ratio =
      app.add_option("-r,--ratio", o.ratio, "Fraction of each head's entries to keep, in (0, 1]")
          ->excludes(budget);
  app.add_option("--sink", o.sink,
                 "First entries of each head always kept (default: 4 for window, else 0)");
  app.add_option("--recent", o.recent,
                 "Most recent entries always kept (default: half the budget for h2o, else 0; "
                 "window without a budget keeps --sink + --recent)");
  app.add_option("--group-agg", group_agg,
                 "How the query heads of a KV group combine their attention: mean or max")
      ->default_val("mean")
      ->check(CLI::IsMember({"mean", "max"}));
  app.add_option("--pool", pool, "snapkv: pooling of the votes along the tokens, avg or max")
      ->default_val("avg")
      ->check(CLI::IsMember({"avg", "max"}));
  app.add_option("--kernel", o.kernel, "snapkv: pooling width (odd)")->default_val(5);
  app.add_option("--beta", o.beta, "pyramid: how steep the schedule is (>= 1)")->default_val(20);
  app.add_option("--alpha", o.alpha, "adaptive: fraction of the budget every head keeps of its own")
      ->default_val(0.2);
  app.add_option("--seed", o.seed, "random: seed (same seed, same selection)")->default_val(1);
  app.add_flag("-n,--dry-run", dry_run,
               "Print the kept entries per layer and head instead of writing a snapshot");
  tool.add_json_option();
  tool.add_output_options();

  return tool.run(argc, argv, [&] {
    // 0 means "not given" inside EvictOptions; given on the command line it is impossible.
    if (budget->count() && o.budget < 1)
      throw kv::Error(kv::Exit::usage, kv::str("--budget ", o.budget, " must be at least 1"));
    if (ratio->count() && !(o.ratio > 0 && o.ratio <= 1))
      throw kv::Error(kv::Exit::usage, kv::str("--ratio ", o.ratio, " must be in (0, 1]"));
    o.score = kv::parse_evict_score(score);
    o.alloc = kv::parse_evict_alloc(alloc);
    o.group_agg = kv::parse_group_agg(group_agg);
    o.pool = kv::parse_pool(pool);
    if (tool.json && !dry_run && tool.output == "-")
      throw kv::Error(kv::Exit::usage,
                      "--json prints the selection on stdout: give --dry-run or -o FILE");
    if (!dry_run) tool.check_output();

    kv::SnapshotReader reader(input, tool.read_options());
    kv::Header header = reader.header();
    kv::check_evict_options(header, o);
    const int L = header.model.n_layers;
    std::unique_ptr<kv::SnapshotWriter> writer;
    if (!dry_run) {
      tool.stamp(header);
      writer = std::make_unique<kv::SnapshotWriter>(tool.output, header,
                                                    tool.write_options(reader.path()));
    }

    kv::Json layers = kv::Json::array();
    std::string table = "  layer  head  entries     kept\n";
    int64_t before = 0, after = 0, bytes_before = 0, bytes_after = 0;
    kv::Layer in, out;
    for (int l = 0; l < L; ++l) {
      tool.progress("layer", l, L);
      reader.read_layer(l, in);
      const kv::Selection kept = kv::select_layer(header, l, in, o);
      kv::Json counts = kv::Json::array(), kept_counts = kv::Json::array(),
               positions = kv::Json::array();
      int64_t layer_kept = 0;
      for (int h = 0; h < int(kept.size()); ++h) {
        const auto& rows = kept[size_t(h)];
        layer_kept += int64_t(rows.size());
        counts.push(in.head_entries(h));
        kept_counts.push(int64_t(rows.size()));
        kv::Json p = kv::Json::array();
        for (int64_t r : rows) p.push(in.positions[size_t(r)]);
        positions.push(std::move(p));
        char row[64];
        std::snprintf(row, sizeof row, "  %5d  %4d  %7lld  %7lld\n", l, h,
                      (long long)in.head_entries(h), (long long)rows.size());
        table += row;
      }
      before += in.entries();
      after += layer_kept;
      bytes_before += kv_bytes(in, in.entries());
      bytes_after += kv_bytes(in, layer_kept);
      if (tool.json) {
        kv::Json lj = kv::Json::object();
        lj.set("layer", l).set("entries", std::move(counts)).set("kept", std::move(kept_counts));
        lj.set("positions", std::move(positions));
        layers.push(std::move(lj));
      }
      if (writer) {
        kv::apply_selection(in, kept, out);
        writer->write_layer(out);
      }
    }
    if (writer) writer->finish();
    tool.progress_done();

    if (tool.json) {
      kv::Json j = kv::Json::object();
      j.set("score", kv::evict_score_name(o.score)).set("alloc", kv::evict_alloc_name(o.alloc));
      if (const int64_t b = kv::evict_budget(o))
        j.set("budget", b);
      else
        j.set("ratio", o.ratio);
      j.set("entries_before", before).set("entries_after", after);
      j.set("kv_bytes_before", bytes_before).set("kv_bytes_after", bytes_after);
      j.set("layers", std::move(layers));
      std::cout << j.dump() << "\n";
    } else if (dry_run) {
      std::cout << table
                << kv::str("  total        ", before, " -> ", after, " entries, ",
                           kvt::human_bytes(double(bytes_before)), " -> ",
                           kvt::human_bytes(double(bytes_after)), " of k+v\n");
    }
  });
}
