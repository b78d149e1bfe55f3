// kv-evict: keep the entries that matter, drop the rest (token eviction and budget allocation).
#include <cstdio>
#include <iostream>

#include "common/selection.h"
#include "common/tool.h"
#include "kv/error.h"
#include "kv/evict.h"
#include "kv/json.h"
#include "kv/snapshot_io.h"
#include "kv/str.h"

int main(int argc, char** argv) {
  kvt::Tool tool("kv-evict",
                 "Keep the KV entries that matter and drop the rest: score every entry, "
                 "allocate a budget to each layer and KV head, write the kept entries (ragged "
                 "heads where budgets differ, so memory is really freed).");
  auto& app = tool.app();
  std::string input = "-";
  kvt::SelectionOptions selection;
  bool dry_run = false;
  tool.add_input(&input);
  selection.add(app, "dropped");
  app.add_flag("-n,--dry-run", dry_run,
               "Print the kept entries per layer and head instead of writing a snapshot");
  tool.add_json_option();
  tool.add_output_options();

  return tool.run(argc, argv, [&] {
    const kv::EvictOptions o = selection.resolve();
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
      int64_t layer_kept = 0;
      for (const auto& rows : kept) layer_kept += int64_t(rows.size());
      // The listings are built only when asked for: at 32k tokens they hold every kept position.
      if (tool.json) {
        kv::Json counts = kv::Json::array(), kept_counts = kv::Json::array(),
                 positions = kv::Json::array();
        for (int h = 0; h < int(kept.size()); ++h) {
          counts.push(in.head_entries(h));
          kept_counts.push(int64_t(kept[size_t(h)].size()));
          kv::Json p = kv::Json::array();
          for (int64_t r : kept[size_t(h)]) p.push(in.positions[size_t(r)]);
          positions.push(std::move(p));
        }
        kv::Json lj = kv::Json::object();
        lj.set("layer", l).set("entries", std::move(counts)).set("kept", std::move(kept_counts));
        lj.set("positions", std::move(positions));
        layers.push(std::move(lj));
      } else if (dry_run) {
        for (int h = 0; h < int(kept.size()); ++h) {
          char row[64];
          std::snprintf(row, sizeof row, "  %5d  %4d  %7lld  %7lld\n", l, h,
                        (long long)in.head_entries(h), (long long)kept[size_t(h)].size());
          table += row;
        }
      }
      before += in.entries();
      after += layer_kept;
      // As stored, before any codec: an encoded input keeps its encoding (kv-inspect's bytes
      // agree); a tiered one counts its page store too, and comes back whole. The output's are
      // the writer's count, or, in a dry run, the same walk without the file.
      const kv::LayerStorage st = reader.layer_storage(l);
      bytes_before += st.kv_bytes_logical + st.kv_bytes_in_store;
      kv::apply_selection(in, kept, out);
      if (writer) {
        const int64_t written = writer->kv_bytes_written();
        writer->write_layer(out);
        bytes_after += writer->kv_bytes_written() - written;
      } else {
        bytes_after += kv::kv_bytes_as_written(header, out);
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
