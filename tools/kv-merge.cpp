// kv-merge: fold the entries an eviction score would drop into the entries it keeps.
#include "common/selection.h"
#include "common/tool.h"
#include "kv/error.h"
#include "kv/merge.h"
#include "kv/str.h"

int main(int argc, char** argv) {
  kvt::Tool tool("kv-merge",
                 "Merge the KV entries an eviction score does not keep into the ones it keeps, "
                 "so they still count: merged entries carry a mass that attention honours.");
  auto& app = tool.app();
  std::string input = "-", method = "nearest";
  kvt::SelectionOptions selection;
  kv::MergeOptions o;
  tool.add_input(&input);
  app.add_option("-m,--method", method,
                 "How dropped entries join kept ones: nearest (most similar key, D2O-style)")
      ->default_val("nearest")
      ->check(CLI::IsMember({"nearest"}));
  selection.add(app, "merged");
  app.add_option("--tau", o.tau,
                 "nearest: key cosine below which a dropped entry is simply dropped, in [-1, 1]")
      ->default_val(0.0);
  tool.add_output_options();

  return tool.run(argc, argv, [&] {
    o.select = selection.resolve();
    tool.check_output();
    kv::SnapshotReader reader(input, tool.read_options());
    kv::Header header = reader.header();
    kv::check_evict_options(header, o.select);
    tool.stamp(header);
    kv::SnapshotWriter writer(tool.output, header, tool.write_options(reader.path()));
    kv::Layer in, out;
    for (int l = 0; l < header.model.n_layers; ++l) {
      tool.progress("layer", l, header.model.n_layers);
      reader.read_layer(l, in);
      kv::merge_nearest(header, l, in, o, out);
      writer.write_layer(out);
    }
    writer.finish();
    tool.progress_done();
  });
}
