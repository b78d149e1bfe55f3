// kv-synth: write a seeded synthetic snapshot of any model shape.
#include "common/tool.h"
#include "kv/error.h"
#include "kv/synth.h"

int main(int argc, char** argv) {
  kvt::Tool tool("kv-synth",
                 "Write a seeded synthetic KV snapshot of any model shape, with the structure "
                 "real caches have (outlier key channels, an attention sink, RoPE).");
  auto& app = tool.app();
  std::string preset = "tiny", dtype = "f16";
  int layers = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  double theta = 0;
  kv::SynthSpec spec;
  app.add_option("--preset", preset, "Model shape: " + kv::model_preset_names())
      ->default_val("tiny");
  app.add_option("--layers", layers, "Override the preset's layer count");
  app.add_option("--q-heads", q_heads, "Override the preset's query heads");
  app.add_option("--kv-heads", kv_heads, "Override the preset's KV heads");
  app.add_option("--head-dim", head_dim, "Override the preset's head dimension (even)");
  app.add_option("--rope-theta", theta, "Override the preset's RoPE base");
  app.add_option("-n,--tokens", spec.n_tokens, "Tokens in the sequence")->default_val(256);
  app.add_option("--dtype", dtype, "Storage type of k and v: f32, f16, bf16")
      ->default_val("f16")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  app.add_option("--seed", spec.seed, "Random seed (same seed, same bytes)")->default_val(1);
  app.add_option("--window", spec.window, "Store W observation-window queries (0: none)")
      ->default_val(0);
  app.add_flag("--attn-stats", spec.attn_stats,
               "Store attention statistics computed from the window queries (needs --window)");
  app.add_option("--probe", spec.probe,
                 "Store P probe queries after the sequence (for kv-eval's attention metrics)")
      ->default_val(0);
  app.add_option("--outlier-pairs", spec.outlier_pairs,
                 "RoPE channel pairs per head with large-magnitude keys")
      ->default_val(2);
  app.add_option("--vocab", spec.vocab, "Token ids are drawn below this")->default_val(32000);
  tool.add_output_options();

  return tool.run(argc, argv, [&] {
    spec.model = kv::model_preset(preset);
    auto& m = spec.model;
    if (layers) m.n_layers = layers;
    if (q_heads) m.n_q_heads = q_heads;
    if (kv_heads) m.n_kv_heads = kv_heads;
    if (head_dim) m.head_dim = m.rope_dims = head_dim;
    if (theta) m.rope_theta = theta;
    if (m.n_layers < 1 || m.n_q_heads < 1 || m.n_kv_heads < 1 || m.head_dim < 2 ||
        m.head_dim % 2 || m.n_q_heads % m.n_kv_heads)
      throw kv::Error(kv::Exit::usage,
                      "shape needs layers, heads >= 1, an even head_dim, and q-heads a multiple "
                      "of kv-heads");
    spec.dtype = dtype == "f32" ? kv::DType::f32 : dtype == "bf16" ? kv::DType::bf16 : kv::DType::f16;
    kv::Synthesizer synth(spec);
    kv::Header header = synth.header();
    tool.stamp(header);
    kv::SnapshotWriter writer(tool.output, header, tool.write_options(""));
    kv::Layer layer;
    for (int l = 0; l < m.n_layers; ++l) {
      tool.progress("layer", l, m.n_layers);
      synth.layer(l, layer);
      writer.write_layer(layer);
    }
    writer.finish();
    tool.progress_done();
  });
}
