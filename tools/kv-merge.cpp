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
                 "(mean-pool KV heads into --groups), minicache (adjacent layers share token "
                 "directions, MiniCache)")
      ->default_val("nearest")
      ->check(CLI::IsMember({"nearest", "cam", "cluster", "heads", "minicache"}));
  selection.add(app, "merged", /*required=*/false);
  auto* tau = app.add_option("--tau", o.tau,
                             "nearest: key cosine below which a dropped entry is simply dropped "
                             "(default 0); cluster: neighbouring keys' cosine that joins them in "
                             "one set (default 0.9); minicache: the pair's cosine from which a "
                             "token's rows share a direction (default 0.8); in [-1, 1]");
  auto* groups_option =
      app.add_option("--groups", groups, "heads: the KV heads after merging; divides the KV heads");
  int start = -1;
  double slerp = 0.6;
  auto* start_option = app.add_option("--start", start,
                                      "minicache: the first layer of the first merged pair "
                                      "(default: the middle layer, n_layers / 2)")
                           ->check(kvt::integer_in(0, 1 << 20));
  auto* slerp_option = app.add_option("--slerp", slerp,
                                      "minicache: interpolation t of the shared direction "
                                      "between the pair's two unit vectors, in [0, 1]")
                           ->check(kvt::real_in(0, 1))
                           ->default_val(0.6);
  tool.add_output_options();

  return tool.run(argc, argv, [&] {
    tool.check_output();
    kv::SnapshotReader reader(input, tool.read_options());
    kv::Header header = reader.header();
    kv::Layer in, out;
    kvt::refuse_ignored({{start_option, "--method minicache", method == "minicache"},
                         {slerp_option, "--method minicache", method == "minicache"},
                         {groups_option, "--method heads", method == "heads"}});
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
    if (method == "cam" && tau->count())
      throw kv::Error(kv::Exit::usage, "cam weighs merges by attention: it takes no --tau");
    if (method == "minicache") {
      if (selection.given())
        throw kv::Error(kv::Exit::usage,
                        "minicache merges across layers: no --score, --budget or "
                        "--ratio");
      const int L = header.model.n_layers;
      if (start < 0) start = L / 2;
      if (start >= L)
        throw kv::Error(kv::Exit::usage, kv::str("--start ", start, " is not a layer (", L, ")"));
      const double cos_tau = tau->count() ? o.tau : 0.8;
      tool.stamp(header);
      kv::SnapshotWriter writer(tool.output, header, tool.write_options(reader.path()));
      kv::Layer next;
      for (int l = 0; l < L; ++l) {
        tool.progress("layer", l, L);
        reader.read_layer(l, in);
        if (l >= start && (l - start) % 2 == 0 && l + 1 < L) {
          reader.read_layer(l + 1, next);
          kv::merge_minicache_pair(header, l, in, next, cos_tau, slerp);
          writer.write_layer(in);
          writer.write_layer(next);
          ++l;
          continue;
        }
        writer.write_layer(in);
      }
      writer.finish();
      tool.progress_done();
      return;
    }
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
