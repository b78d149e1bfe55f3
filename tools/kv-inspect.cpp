// kv-inspect: show what a KV snapshot holds.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "common/tool.h"
#include "kv/backend.h"
#include "kv/error.h"
#include "kv/file.h"
#include "kv/json.h"
#include "kv/plot.h"
#include "kv/stats.h"
#include "kv/str.h"

namespace {

struct Range {
  int64_t min = 0, max = 0;
  double mean = 0;
};

Range entry_range(const std::vector<int64_t>& off, int head) {
  Range r{INT64_MAX, 0, 0};
  const int lo = head < 0 ? 0 : head, hi = head < 0 ? int(off.size()) - 1 : head + 1;
  for (int h = lo; h < hi; ++h) {
    int64_t n = off[size_t(h) + 1] - off[size_t(h)];
    r.min = std::min(r.min, n);
    r.max = std::max(r.max, n);
    r.mean += double(n);
  }
  r.mean /= double(hi - lo);
  return r;
}

std::string range_text(const Range& r) {
  if (r.min == r.max) return std::to_string(r.min);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%lld/%.1f/%lld", (long long)r.min, r.mean, (long long)r.max);
  return buf;
}

// "dense f16", or the scheme with its parameters ("kivi bits=2 group=32 axis=channel ...").
std::string encoding_text(const kv::Encoding& e, kvk::DType dtype) {
  return e.dense() ? std::string("dense ") + kvk::dtype_name(dtype) : e.describe();
}

// Bits per value of k and v as stored before any lossless codec (codes, scales, residual).
double bits_per_value(int64_t bytes, int64_t values) {
  return values ? 8.0 * double(bytes) / double(values) : 0.0;
}

}  // namespace

int main(int argc, char** argv) {
  kvt::Tool tool("kv-inspect",
                 "Show what a KV snapshot holds: model, tokens, entries per layer and head, "
                 "encodings, bytes, side data and provenance. Every layer is read and validated.");
  auto& app = tool.app();
  std::string input = "-", plot;
  int only_layer = -1, only_head = -1;
  bool stats = false;
  tool.add_input(&input);
  app.add_option("--layer", only_layer, "Show only layer L");
  app.add_option("--head", only_head, "Show only KV head H");
  app.add_flag("--stats", stats,
               "Per-layer key/value statistics: norms, per-channel key magnitude, outlier "
               "channels (mean |k| above 4x the head's median channel)");
  app.add_option("--plot", plot, "Write per-layer, per-channel mean |k| as an SVG heat map");
  tool.add_allow_nonfinite_option();
  tool.add_json_option();
  tool.add_device_option();

  return tool.run(argc, argv, [&] {
    const kvk::Ops& ops = kv::select_backend(tool.device);
    if (kv::same_file(input, plot))
      throw kv::Error(kv::Exit::usage,
                      kv::str("--plot '", plot, "' is the input snapshot; choose another name"));
    kv::SnapshotReader reader(input, tool.read_options());
    const kv::Header& h = reader.header();
    const kv::ModelInfo& m = h.model;
    if (only_layer >= m.n_layers || only_layer < -1)
      throw kv::Error(kv::Exit::usage,
                      kv::str("--layer ", only_layer, " is outside [0, ", m.n_layers, ")"));
    if (only_head >= m.n_kv_heads || only_head < -1)
      throw kv::Error(kv::Exit::usage,
                      kv::str("--head ", only_head, " is outside [0, ", m.n_kv_heads, ")"));
    const bool need_stats = stats || !plot.empty();

    kv::Json layers_json = kv::Json::array();
    std::vector<std::vector<float>> heat;
    std::vector<std::string> heat_labels;
    std::string table;
    int64_t total_entries = 0, kv_stored = 0, kv_in_store = 0, kv_logical = 0, kv_values = 0,
            other_stored = 0, dense_f16 = 0;
    kv::Layer layer;
    // Each tensor's encodings over the layers shown, in layer order, each once: one when the
    // layers agree, several (joined with " | ") when they differ (minicache partners, a tiered
    // cache with some layers on disk).
    std::vector<std::string> k_encs, v_encs;
    auto note = [](std::vector<std::string>& seen, const std::string& e) {
      if (std::find(seen.begin(), seen.end(), e) == seen.end()) seen.push_back(e);
    };
    auto joined = [](const std::vector<std::string>& seen) {
      std::string text;
      for (const std::string& e : seen) text += (text.empty() ? "" : " | ") + e;
      return text;
    };
    bool any_mass = false;
    for (int l = 0; l < m.n_layers; ++l) {
      tool.progress("layer", l, m.n_layers);
      reader.read_layer(l, layer);  // validates: a damaged layer is reported, not skipped
      if (only_layer >= 0 && l != only_layer) continue;
      kv::LayerStorage st = reader.layer_storage(l);
      const std::string k_enc = encoding_text(st.k_encoding, st.k_dtype),
                        v_enc = encoding_text(st.v_encoding, st.v_dtype);
      note(k_encs, k_enc);
      note(v_encs, v_enc);
      any_mass |= st.has_mass;
      const Range r = entry_range(layer.head_offsets, only_head);
      const int64_t entries = only_head < 0 ? layer.entries() : layer.head_entries(only_head);
      total_entries += entries;
      kv_stored += st.kv_bytes_stored;
      kv_in_store += st.kv_bytes_in_store;
      kv_logical += st.kv_bytes_logical;
      kv_values += 2 * layer.entries() * m.head_dim;
      other_stored += st.other_bytes_stored;
      dense_f16 += kv::dense_f16_bytes(layer.entries(), m.head_dim);
      kv::Json lj = kv::Json::object();
      lj.set("layer", l).set("entries", entries).set("entries_min", r.min);
      lj.set("entries_mean", r.mean).set("entries_max", r.max);
      lj.set("kv_bytes_stored", st.kv_bytes_stored)
          .set("k_encoding", k_enc)
          .set("v_encoding", v_enc);
      lj.set("bits_per_value",
             bits_per_value(st.kv_bytes_logical, 2 * layer.entries() * m.head_dim));
      lj.set("kv_bytes_dense_f16", kv::dense_f16_bytes(layer.entries(), m.head_dim));
      char row[160];
      std::snprintf(
          row, sizeof row, "  %5d  %16s  %10.2f  %12s  %12s\n", l, range_text(r).c_str(),
          bits_per_value(st.kv_bytes_logical, 2 * layer.entries() * m.head_dim),
          kvt::human_bytes(double(st.kv_bytes_stored)).c_str(),
          kvt::human_bytes(double(kv::dense_f16_bytes(layer.entries(), m.head_dim))).c_str());
      table += row;
      if (need_stats) {
        auto hs = kv::layer_stats(layer, m.n_kv_heads, ops);
        kv::Json heads = kv::Json::array();
        std::vector<float> heat_row;
        for (int hd = 0; hd < m.n_kv_heads; ++hd) {
          if (only_head >= 0 && hd != only_head) continue;
          const kv::HeadStats& s = hs[size_t(hd)];
          heat_row.insert(heat_row.end(), s.k_channel_abs_mean.begin(), s.k_channel_abs_mean.end());
          kv::Json hj = kv::Json::object();
          hj.set("head", hd).set("entries", s.entries);
          hj.set("k_norm_mean", s.k_norm_mean).set("k_norm_max", s.k_norm_max);
          hj.set("v_norm_mean", s.v_norm_mean).set("v_norm_max", s.v_norm_max);
          hj.set("k_channel_abs_mean", kv::Json::array_of(s.k_channel_abs_mean));
          hj.set("outlier_channels", kv::Json::array_of(s.outlier_channels));
          heads.push(std::move(hj));
          if (stats && !tool.json) {
            std::string outl;
            for (int c : s.outlier_channels) outl += kv::str(outl.empty() ? "" : ",", c);
            std::snprintf(row, sizeof row,
                          "         head %2d  |k| %8.3f mean %8.3f max  |v| %8.3f mean %8.3f max"
                          "  outlier channels: %s\n",
                          hd, s.k_norm_mean, s.k_norm_max, s.v_norm_mean, s.v_norm_max,
                          outl.empty() ? "-" : outl.c_str());
            table += row;
          }
        }
        if (stats) lj.set("heads", std::move(heads));
        heat.push_back(std::move(heat_row));
        heat_labels.push_back("layer " + std::to_string(l));
      }
      layers_json.push(std::move(lj));
    }
    tool.progress_done();

    if (!plot.empty()) {
      std::string title = kv::str("mean |k| per channel, ", m.name.empty() ? "snapshot" : m.name);
      std::string x = only_head >= 0 ? kv::str("channel of KV head ", only_head)
                                     : kv::str("KV head x channel (", m.n_kv_heads, " heads of ",
                                               m.head_dim, ")");
      std::string svg =
          kv::svg_heatmap(heat, heat_labels, title, x, only_head >= 0 ? 0 : m.head_dim);
      kv::write_file_atomically(plot, svg);
    }

    const double ratio = dense_f16 ? double(kv_stored) / double(dense_f16) : 0.0;
    const int64_t heads_shown = only_head >= 0 ? 1 : m.n_kv_heads;
    const int64_t layers_shown = only_layer >= 0 ? 1 : m.n_layers;
    const double kept = double(total_entries) /
                        double(std::max<int64_t>(1, h.n_tokens * heads_shown * layers_shown));
    if (tool.json) {
      kv::Json j = kv::Json::object();
      j.set("file", input).set("file_bytes", reader.file_bytes());
      j.set("format", kv::str("kvsnap ", h.format_major, ".", h.format_minor));
      kv::Json mj = kv::Json::object();
      mj.set("arch", m.arch).set("name", m.name).set("sha256", m.file_sha256);
      mj.set("n_layers", m.n_layers).set("n_q_heads", m.n_q_heads).set("n_kv_heads", m.n_kv_heads);
      mj.set("head_dim", m.head_dim).set("context_length", m.context_length);
      mj.set("rope_theta", m.rope_theta).set("rope_dims", m.rope_dims);
      mj.set("rope_style", m.rope_style).set("key_rope", m.key_rope);
      j.set("model", std::move(mj));
      j.set("n_tokens", h.n_tokens).set("text_bytes", int64_t(h.text.size()));
      j.set("codec", reader.codec_name());
      j.set("k_encoding", joined(k_encs)).set("v_encoding", joined(v_encs)).set("mass", any_mass);
      j.set("entries", total_entries).set("kept_fraction", kept);
      j.set("kv_bytes_stored", kv_stored).set("kv_bytes_in_page_store", kv_in_store);
      j.set("kv_bytes_dense_f16", dense_f16);
      j.set("bits_per_value", bits_per_value(kv_logical, kv_values));
      j.set("ratio_to_dense_f16", ratio).set("other_bytes_stored", other_stored);
      kv::Json side = kv::Json::object();
      side.set("window", int64_t(h.window_positions.size()));
      side.set("attn_stats", h.has_attn_stats);
      side.set("probe", int64_t(h.probe_tokens.size()));
      side.set("probe_logits", !h.probe_logits.empty());
      j.set("side_data", std::move(side));
      kv::Json prov = kv::Json::array();
      for (const auto& p : h.provenance) {
        kv::Json pj = kv::Json::object();
        pj.set("id", p.id).set("program", p.program).set("version", p.version);
        pj.set("command_line", p.command_line).set("time", p.time).set("previous", p.previous);
        prov.push(std::move(pj));
      }
      j.set("provenance", std::move(prov));
      j.set("history", h.history);
      j.set("layers", std::move(layers_json));
      std::cout << j.dump() << "\n";
      return;
    }
    std::printf("file        %s (%s)\n", input == "-" ? "stdin" : input.c_str(),
                kvt::human_bytes(double(reader.file_bytes())).c_str());
    std::printf("format      kvsnap %d.%d, codec %s\n", h.format_major, h.format_minor,
                reader.codec_name().c_str());
    std::printf("model       %s %s%s%s\n", m.arch.c_str(),
                m.name.empty() ? "(unnamed)" : m.name.c_str(),
                m.file_sha256.empty() ? "" : ", sha256 ", m.file_sha256.substr(0, 16).c_str());
    std::printf(
        "shape       %d layers, %d query heads, %d KV heads (group %d), head_dim %d, context %d\n",
        m.n_layers, m.n_q_heads, m.n_kv_heads, m.group_size(), m.head_dim, m.context_length);
    std::printf("rope        theta %g over %d dims (%s), keys stored post-RoPE\n", m.rope_theta,
                m.rope_dims, m.rope_style.c_str());
    std::printf("tokens      %lld%s\n", (long long)h.n_tokens,
                h.text.empty() ? "" : kv::str(" (text: ", h.text.size(), " bytes)").c_str());
    std::printf("entries     %lld of %lld token slots (%.1f%%)%s%s\n", (long long)total_entries,
                (long long)(h.n_tokens * heads_shown * layers_shown), 100.0 * kept,
                only_layer >= 0 ? kv::str(", layer ", only_layer).c_str() : "",
                only_head >= 0 ? kv::str(", head ", only_head).c_str() : "");
    std::printf("encoding    k: %s, v: %s, mass: %s\n", joined(k_encs).c_str(),
                joined(v_encs).c_str(), any_mass ? "yes" : "no");
    std::printf("bits/value  %.3f (k and v before the codec, scales and residual included)\n",
                bits_per_value(kv_logical, kv_values));
    std::printf("bytes       k+v stored %s, as dense f16 %s, ratio %.3f (other arrays %s)\n",
                kvt::human_bytes(double(kv_stored)).c_str(),
                kvt::human_bytes(double(dense_f16)).c_str(), ratio,
                kvt::human_bytes(double(other_stored)).c_str());
    if (kv_in_store > 0)  // a tiered cache: its disk tier's pages are not in the file
      std::printf("            k+v in page stores %s (not in the file, nor in the ratio)\n",
                  kvt::human_bytes(double(kv_in_store)).c_str());
    std::printf("side data   window: %s; attention stats: %s; probe: %s\n",
                h.has_window() ? kv::str(h.window_positions.size(), " queries").c_str() : "no",
                h.has_attn_stats ? "yes" : "no",
                h.has_probe() ? kv::str(h.probe_tokens.size(), " tokens",
                                        h.probe_logits.empty() ? "" : " with logits")
                                    .c_str()
                              : "no");
    std::printf("\n  layer  entries/head(min/mean/max)  bits/value  k+v stored  dense f16\n%s",
                table.c_str());
    if (!h.provenance.empty()) {
      std::printf("\nprovenance\n");
      for (const auto& p : h.provenance)
        std::printf("  %-12s %s %s  %s\n", p.id.c_str(), p.version.c_str(), p.time.c_str(),
                    p.command_line.c_str());
    }
  });
}
