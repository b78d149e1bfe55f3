// kv-compress: store a snapshot's keys and values in a quantized or low-rank encoding, or decode
// one back to dense values (-d).
#include <algorithm>
#include <utility>
#include <vector>

#include "common/tool.h"
#include "kv/encoding.h"
#include "kv/error.h"
#include "kv/str.h"

namespace {

// The options a user gave; each one given overrides the scheme's default for k and for v.
struct SchemeOptions {
  std::string scheme;
  CLI::Option *bits, *group, *axis, *symmetric, *residual, *hadamard, *format, *scale, *rank,
      *energy, *factors, *pre_rope, *outliers, *high_bits, *high_share;
  kv::Encoding given;

  kv::Encoding for_role(char role) const {
    kv::Encoding e = kv::default_encoding(scheme, role);
    if (bits->count()) e.bits = given.bits;
    if (group->count()) e.group = given.group;
    if (axis->count()) e.axis = given.axis;
    if (symmetric->count()) e.symmetric = true;
    if (residual->count()) e.residual = given.residual;
    if (hadamard->count()) e.hadamard = true;
    if (format->count()) e.fp8_format = given.fp8_format;
    if (scale->count()) e.scale_scope = given.scale_scope;
    if (rank->count()) e.rank = given.rank;
    if (energy->count()) {
      e.energy = given.energy;
      if (!rank->count()) e.rank = 0;
    }
    if (factors->count()) e.factors = given.factors;
    if (pre_rope->count()) e.pre_rope = given.pre_rope && role == 'k';
    if (outliers->count()) e.outliers = given.outliers;
    if (high_bits->count()) e.high_bits = given.high_bits;
    if (high_share->count()) e.high_share = given.high_share;
    return e;
  }

  // Throws a usage error for an option the scheme (or -d) does not use, rather than ignoring it.
  void check_applicable(bool decoding) const {
    const std::pair<const CLI::Option*, std::vector<std::string>> uses[] = {
        {bits, {"uniform", "kivi", "kvquant", "mikv"}},
        {group, {"uniform", "kivi", "mikv"}},
        {axis, {"uniform"}},
        {symmetric, {"uniform", "kivi"}},
        {residual, {"uniform", "kivi"}},
        {hadamard, {"uniform", "kivi", "q8_0", "q4_0", "fp8", "mikv"}},
        {format, {"fp8"}},
        {scale, {"fp8"}},
        {rank, {"svd"}},
        {energy, {"svd"}},
        {factors, {"svd"}},
        {pre_rope, {"svd", "kvquant"}},
        {outliers, {"kvquant"}},
        {high_bits, {"mikv"}},
        {high_share, {"mikv"}},
    };
    for (const auto& [option, schemes] : uses) {
      if (!option->count()) continue;
      if (decoding)
        throw kv::Error(kv::Exit::usage, option->get_name() + " sets an encoding; -d decodes");
      if (std::find(schemes.begin(), schemes.end(), scheme) == schemes.end()) {
        std::string list;
        for (const std::string& s : schemes) list += (list.empty() ? "" : ", ") + s;
        throw kv::Error(kv::Exit::usage, option->get_name() + " does not apply to scheme " +
                                             scheme + " (only to " + list + ")");
      }
    }
    if (rank->count() && given.rank < 1)
      throw kv::Error(kv::Exit::usage, kv::str("--rank ", given.rank, " is below 1"));
  }
};

}  // namespace

int main(int argc, char** argv) {
  kvt::Tool tool("kv-compress",
                 "Store keys and values quantized (uniform, KIVI, llama.cpp q8_0/q4_0, fp8, "
                 "KVQuant-style, MiKV-style mixed precision) or low-rank (SVD), with packed codes "
                 "so the file really shrinks; -d decodes back to dense values. Other tools read "
                 "encoded snapshots transparently.");
  auto& app = tool.app();
  std::string input = "-", tensors = "kv", dtype = "f16";
  bool decode_back = false;
  SchemeOptions o;
  tool.add_input(&input);
  app.add_option("-s,--scheme", o.scheme,
                 "uniform, kivi, q8_0, q4_0, fp8, svd, kvquant or mikv (formulas and bit costs: "
                 "kv-compress(1))")
      ->check(CLI::IsMember({"uniform", "kivi", "q8_0", "q4_0", "fp8", "svd", "kvquant", "mikv"}));
  app.add_flag("-d,--decode", decode_back, "Decode encoded k and v back to dense values");
  auto* dtype_option = app.add_option("--dtype", dtype, "-d: dtype of the decoded values")
                           ->default_val("f16")
                           ->check(CLI::IsMember({"f16", "bf16", "f32"}));
  app.add_option("--tensors", tensors, "Which to encode (or decode): k, v or kv")
      ->default_val("kv")
      ->check(CLI::IsMember({"k", "v", "kv"}));
  o.bits = app.add_option("-b,--bits", o.given.bits,
                          "uniform, kivi, mikv: bits per code, 2 3 4 or 8 (default 4; kivi and "
                          "mikv 2); kvquant: 2 3 or 4 (default 3)");
  o.group = app.add_option("-g,--group", o.given.group,
                           "uniform, kivi, mikv: values sharing one f16 scale (and zero) "
                           "(default 32)");
  o.axis = app.add_option("--axis", o.given.axis,
                          "uniform: group along a token's channels (token) or a channel's tokens "
                          "(channel) (default token; kivi: channel for k, token for v)")
               ->check(CLI::IsMember({"token", "channel"}));
  o.symmetric = app.add_flag("--symmetric", o.given.symmetric,
                             "uniform: no zero point, codes symmetric around 0");
  o.residual = app.add_option("-r,--residual", o.given.residual,
                              "uniform, kivi: most recent entries of each head kept dense f16 "
                              "(default 0; kivi 128)");
  o.hadamard = app.add_flag("--hadamard", o.given.hadamard,
                            "Rotate each row by a normalized Hadamard matrix before quantizing "
                            "(QuaRot-style outlier spreading; head_dim a power of 2)");
  o.format = app.add_option("--format", o.given.fp8_format, "fp8: e4m3 or e5m2 (default e4m3)")
                 ->check(CLI::IsMember({"e4m3", "e5m2"}));
  o.scale = app.add_option("--scale", o.given.scale_scope,
                           "fp8: one f32 scale per tensor or per head (default head)")
                ->check(CLI::IsMember({"tensor", "head"}));
  o.rank = app.add_option("--rank", o.given.rank, "svd: rank kept per KV head, 1..head_dim");
  o.energy = app.add_option("--energy", o.given.energy,
                            "svd: smallest rank keeping this share of sum sigma^2, in (0, 1] "
                            "(default 0.99 when --rank is not given)");
  o.factors = app.add_option("--factors", o.given.factors, "svd: dtype of the factors (f16, f32)")
                  ->check(CLI::IsMember({"f16", "f32"}));
  o.pre_rope = app.add_flag("--pre-rope,!--no-pre-rope", o.given.pre_rope,
                            "svd, kvquant: encode keys before RoPE (un-rotated with their "
                            "positions, re-rotated when decoded) (default: on for kvquant)");
  o.outliers = app.add_option("--outliers", o.given.outliers,
                              "kvquant: share of each vector's values kept exact, in [0, 1) "
                              "(default 0.01)");
  o.high_bits = app.add_option("--high-bits", o.given.high_bits,
                               "mikv: bits of the rows that received the most attention "
                               "(default 8)");
  o.high_share = app.add_option("--high-share", o.given.high_share,
                                "mikv: share of each head's rows kept at --high-bits, in [0, 1] "
                                "(default 0.2); ranked by attention statistics "
                                "(kv-capture --attn-stats)");
  tool.add_output_options();

  return tool.run(argc, argv, [&] {
    if (decode_back == !o.scheme.empty())
      throw kv::Error(kv::Exit::usage, "give either --scheme NAME or -d");
    if (o.rank->count() && o.energy->count())
      throw kv::Error(kv::Exit::usage, "give --rank or --energy, not both");
    if ((o.scheme == "kivi" || o.scheme == "kvquant") && o.axis->count())
      throw kv::Error(kv::Exit::usage, o.scheme +
                                           " fixes the axes (keys per channel, values per "
                                           "token); use --scheme uniform --axis to choose one");
    o.check_applicable(decode_back);
    if (dtype_option->count() && !decode_back)
      throw kv::Error(kv::Exit::usage,
                      "--dtype is the dtype -d decodes to; without -d it does nothing");
    if (o.pre_rope->count() && o.given.pre_rope && tensors == "v")
      throw kv::Error(kv::Exit::usage, "--pre-rope applies to keys; --tensors v encodes none");
    tool.check_output();
    kv::SnapshotReader reader(input, tool.read_options());
    kv::Header header = reader.header();
    const bool do_k = tensors != "v", do_v = tensors != "k";
    kv::Encoding k_enc, v_enc;
    if (!decode_back) {
      k_enc = o.for_role('k');
      v_enc = o.for_role('v');
      if (o.scheme == "mikv" && !header.has_attn_stats)
        throw kv::Error(kv::Exit::data, "mikv ranks entries by attention statistics, which " +
                                            reader.path() + " lacks (kv-capture --attn-stats)");
      if (do_k) kv::check_encoding(k_enc, header.model, 'k');
      if (do_v) kv::check_encoding(v_enc, header.model, 'v');
    }
    const kvk::DType dense_dtype = dtype == "f32"    ? kvk::DType::f32
                                   : dtype == "bf16" ? kvk::DType::bf16
                                                     : kvk::DType::f16;
    tool.stamp(header);
    kv::SnapshotWriter writer(tool.output, header, tool.write_options(reader.path()));
    kv::Layer layer;
    for (int l = 0; l < header.model.n_layers; ++l) {
      tool.progress("layer", l, header.model.n_layers);
      reader.read_layer(l, layer);
      for (auto [wanted, t, enc, target] :
           {std::tuple{do_k, &layer.k, &layer.k_encoding, &k_enc},
            std::tuple{do_v, &layer.v, &layer.v_encoding, &v_enc}}) {
        if (!wanted) continue;
        if (decode_back) {
          if (enc->dense()) continue;  // already dense: left in its dtype
          const std::vector<float> values = t->to_f32();
          *t = kv::Tensor::from_f32(dense_dtype, t->rows(), t->cols(), values.data());
        }
        *enc = *target;
      }
      writer.write_layer(layer);
    }
    writer.finish();
    tool.progress_done();
  });
}
