// kv-merge: fold the entries an eviction score would drop into the entries it keeps, or merge KV
// heads into fewer groups.
#include <memory>

#include "common/selection.h"
#include "common/tool.h"
#include "kv/error.h"
#include "kv/merge.h"
#include "kv/str.h"

int main(int argc, char** argv) {
  kvt::Tool tool("kv-merge",
                 "Merge the KV entries an eviction score does not keep into the ones it keeps, "
                 "so they still count (merged entries carry a mass that attention honours); or "
                 "mean-pool KV heads into fewer groups (MHA -> GQA -> MQA).");
  auto& app = tool.app();
  std::string input = "-", method = "nearest";
  kvt::SelectionOptions selection;
  kv::MergeOptions o;
  int groups = 0;
  tool.add_input(&input);
  app.add_option("-m,--method", method,
                 "nearest (most similar kept key, D2O-style), cam (position neighbour, weighted "
                 "by attention, CaM-style), cluster (runs of similar keys, KVMerger-style), heads "
                 "(mean-pool KV heads into --groups)")
      ->default_val("nearest")
      ->check(CLI::IsMember({"nearest", "cam", "cluster", "heads"}));
  selection.add(app, "merged", /*required=*/false);
  auto* tau = app.add_option("--tau", o.tau,
                             "nearest: key cosine below which a dropped entry is simply dropped "
                             "(default 0); cluster: neighbouring keys' cosine that joins them in "
                             "one set (default 0.9); in [-1, 1]");
  app.add_option("--groups", groups, "heads: the KV heads after merging; divides the KV heads");
  tool.add_output_options();

  return tool.run(argc, argv, [&] {
    tool.check_output();
    kv::SnapshotReader reader(input, tool.read_options());
    kv::Header header = reader.header();
    kv::Layer in, out;
    if (method == "heads") {
      if (selection.given() || tau->count())
        throw kv::Error(kv::Exit::usage,
                        "heads merges whole heads: no --score, --budget, "
                        "--ratio or --tau");
      if (groups < 1)
        throw kv::Error(kv::Exit::usage, "heads needs --groups N (the KV heads to keep)");
      kv::Header out_header;
      std::unique_ptr<kv::SnapshotWriter> writer;
      for (int l = 0; l < header.model.n_layers; ++l) {
        tool.progress("layer", l, header.model.n_layers);
        reader.read_layer(l, in);
        kv::merge_heads(header, in, groups, out_header, out);
        if (!writer) {
          tool.stamp(out_header);
          writer = std::make_unique<kv::SnapshotWriter>(tool.output, out_header,
                                                        tool.write_options(reader.path()));
        }
        writer->write_layer(out);
      }
      if (writer) writer->finish();
      tool.progress_done();
      return;
    }
    if (groups) throw kv::Error(kv::Exit::usage, "--groups is for --method heads");
    o.method = kv::parse_merge_method(method);
    if (method == "cluster" && !tau->count()) o.tau = 0.9;
    o.select = selection.resolve();
    kv::check_evict_options(header, o.select);
    tool.stamp(header);
    kv::SnapshotWriter writer(tool.output, header, tool.write_options(reader.path()));
    for (int l = 0; l < header.model.n_layers; ++l) {
      tool.progress("layer", l, header.model.n_layers);
      reader.read_layer(l, in);
      kv::merge_layer(header, l, in, o, out);
      writer.write_layer(out);
    }
    writer.finish();
    tool.progress_done();
  });
}
