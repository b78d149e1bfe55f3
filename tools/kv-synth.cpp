// kv-synth: write a seeded synthetic snapshot of any model shape.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/tool.h"
#include "kv/error.h"
#include "kv/synth.h"

namespace {
// The most layers, heads or head dimensions an override takes: beyond any model's, and small
// enough that their products fit the index types.
constexpr int kMaxShape = 1 << 12;
// The most tokens (positions are int32; kv-capture caps its prompt and probe alike).
constexpr int64_t kMaxTokens = int64_t(1) << 24;
}  // namespace

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
  // Each override applies when given (a given 0 is refused, never read as "not given").
  auto* layers_option = app.add_option("--layers", layers, "Override the preset's layer count")
                            ->check(kvt::integer_in(1, kMaxShape));
  auto* q_heads_option = app.add_option("--q-heads", q_heads, "Override the preset's query heads")
                             ->check(kvt::integer_in(1, kMaxShape));
  auto* kv_heads_option = app.add_option("--kv-heads", kv_heads, "Override the preset's KV heads")
                              ->check(kvt::integer_in(1, kMaxShape));
  auto* head_dim_option =
      app.add_option("--head-dim", head_dim, "Override the preset's head dimension (even)")
          ->check(kvt::integer_in(2, kMaxShape));
  auto* theta_option =
      app.add_option("--rope-theta", theta, "Override the preset's RoPE base (finite, > 0)")
          ->check(kvt::real_in(0, std::numeric_limits<double>::infinity(), kvt::Ends::open));
  app.add_option("-n,--tokens", spec.n_tokens, "Tokens in the sequence")
      ->check(kvt::integer_in(int64_t(1), kMaxTokens))
      ->default_val(256);
  app.add_option("--dtype", dtype, "Storage type of k and v: f32, f16, bf16")
      ->default_val("f16")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  app.add_option("--seed", spec.seed, "Random seed (same seed, same bytes)")
      ->check(kvt::integer_in<uint64_t>(0, std::numeric_limits<uint64_t>::max()))
      ->default_val(1);
  app.add_option("--window", spec.window, "Store W observation-window queries (0: none)")
      ->check(kvt::integer_in(int64_t(0), kMaxTokens))
      ->default_val(0);
  app.add_flag("--attn-stats", spec.attn_stats,
               "Store attention statistics computed from the window queries (needs --window)");
  app.add_option("--probe", spec.probe,
                 "Store P probe queries after the sequence (for kv-eval's attention metrics)")
      ->check(kvt::integer_in(0, kv::kSynthMaxProbe))
      ->default_val(0);
  const CLI::Option* outliers_option =
      app.add_option("--outlier-pairs", spec.outlier_pairs,
                     "RoPE channel pairs per head with large-magnitude keys (at most head_dim / 2; "
                     "the default "
                     "2 is cut to that)")
          ->check(kvt::integer_in(0, kMaxShape / 2))
          ->default_val(2);
  app.add_option("--vocab", spec.vocab, "Token ids are drawn below this")
      ->check(kvt::integer_in(1, std::numeric_limits<int32_t>::max()))
      ->default_val(32000);
  tool.add_output_options();

  return tool.run(argc, argv, [&] {
    spec.model = kv::model_preset(preset);
    auto& m = spec.model;
    if (layers_option->count()) m.n_layers = layers;
    if (q_heads_option->count()) m.n_q_heads = q_heads;
    if (kv_heads_option->count()) m.n_kv_heads = kv_heads;
    if (head_dim_option->count()) m.head_dim = m.rope_dims = head_dim;
    if (theta_option->count()) m.rope_theta = theta;
    if (m.n_layers < 1 || m.n_q_heads < 1 || m.n_kv_heads < 1 || m.head_dim < 2 || m.head_dim % 2 ||
        m.n_q_heads % m.n_kv_heads)
      throw kv::Error(kv::Exit::usage,
                      "shape needs layers, heads >= 1, an even head_dim, and q-heads a multiple "
                      "of kv-heads");
    // The default, not a value given, fits a head of 2 channels (one pair).
    if (!outliers_option->count())
      spec.outlier_pairs = std::min(spec.outlier_pairs, m.rope_dims / 2);
    spec.dtype = dtype == "f32"    ? kv::DType::f32
                 : dtype == "bf16" ? kv::DType::bf16
                                   : kv::DType::f16;
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
