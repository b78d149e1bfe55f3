// kv-eval: what a candidate cache costs in accuracy and gains in memory, against its reference.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "common/tool.h"
#include "kv/backend.h"
#include "kv/error.h"
#include "kv/eval.h"
#include "kv/file.h"
#include "kv/json.h"
#include "kv/model.h"
#include "kv/plot.h"
#include "kv/report.h"
#include "kv/str.h"
#include "kvk/cuda.h"

namespace {

// Rejects an empty value where "" would otherwise be taken as "not given".
const CLI::Validator kNonEmpty(
    [](std::string& s) { return s.empty() ? std::string("must not be empty") : std::string(); }, "",
    "non-empty");

// `s` left-aligned in at least `width` columns (longer text is kept whole).
std::string pad(std::string s, size_t width) {
  if (s.size() < width) s.append(width - s.size(), ' ');
  return s;
}

// `s` right-aligned in at least `width` columns.
std::string right(const std::string& s, size_t width) {
  return s.size() < width ? std::string(width - s.size(), ' ') + s : s;
}

// One CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

void print_report(const std::string& path, std::string metric, const std::string& plot_path) {
  if (kv::same_file(path, plot_path))
    throw kv::Error(kv::Exit::usage,
                    kv::str("--plot '", plot_path, "' is the results file; choose another name"));
  std::vector<kv::ResultRow> rows = kv::read_results(path, metric);
  const bool lower = kv::metric_lower_is_better(metric);
  std::string out = kv::str("  ", metric, lower ? " (lower is better)" : " (higher is better)",
                            " against bytes per token; * marks the Pareto front\n");
  out += kv::str("  ", pad("label", 28), " ", right("bytes/token", 15), " ", right("ratio", 9), " ",
                 right(metric, 12), "  front\n");
  std::vector<double> x, y;
  std::vector<std::string> labels;
  std::vector<bool> front;
  for (const auto& r : rows) {
    out += kv::str("  ", pad(r.label, 28), kv::format(" %15.1f", r.bytes_per_token),
                   kv::format(" %9.4f", r.ratio), kv::format(" %12.6f", r.metric), "  ",
                   r.pareto ? "*" : "", "\n");
    x.push_back(r.bytes_per_token);
    y.push_back(r.metric);
    labels.push_back(r.label);
    front.push_back(r.pareto);
  }
  if (!plot_path.empty())
    kv::write_file_atomically(
        plot_path, kv::svg_scatter_front(x, y, labels, front,
                                         kv::str(metric, " against bytes per token (", path, ")"),
                                         "bytes per token (k+v stored)", metric));
  std::cout << out;
}

}  // namespace

int main(int argc, char** argv) {
  kvt::Tool tool("kv-eval",
                 "Measure what a candidate KV cache (evicted, merged, compressed) costs against "
                 "the reference cache it came from: bytes, attention fidelity on the probe "
                 "queries, and with --model the next-token fidelity of the model.");
  auto& app = tool.app();
  std::string input = "-", ref_path, model_path, append_path, label;
  int topk = 16, recall_max = 8;
  int64_t generate = 0;
  std::string task;
  bool per_layer = false, csv = false, speed = false;
  tool.add_input(&input);
  app.add_option("-r,--ref", ref_path,
                 "Reference snapshot (the full cache, with its probe); required except for "
                 "'report'");
  app.add_option("-m,--model", model_path,
                 "Model file (GGUF or llama2.c): also teacher-force the probe with each cache "
                 "and compare next-token distributions");
  app.add_option("--topk", topk, "k of the top-k attention recall")
      ->default_val(16)
      ->check(kvt::integer_in(1, 1 << 20));
  app.add_option("--generate", generate,
                 "With --model: greedy-decode N tokens after the first probe token from each "
                 "cache and report their common prefix")
      ->check(kvt::integer_in(int64_t(1), int64_t(1) << 20));
  CLI::Option* task_option =
      app.add_option(
             "--task", task,
             "With --model: 'recall': sentences from the prompt's first half, cued by their "
             "first tokens, must be continued exactly (exact-match rate of each cache)")
          ->check(CLI::IsMember({"recall"}));
  app.add_option("--recall-items", recall_max, "recall: at most this many sentences")
      ->default_val(8)
      ->check(kvt::integer_in(1, 1000))
      ->needs(task_option);
  app.add_flag("--speed", speed,
               "Time one decode step of attention over every layer of each cache (the first "
               "probe query of each head), with the memory bandwidth measured in the same run");
  app.add_flag("--per-layer", per_layer, "Show every layer, not only the totals");
  app.add_flag("--csv", csv, "Print one CSV header line and one row of totals");
  app.add_option("--append", append_path,
                 "Append the result as one JSON line to FILE (results of sweeps); a failed "
                 "write leaves FILE as it was")
      ->check(kNonEmpty);
  app.add_option("--label", label, "A name for this candidate in the output");
  tool.add_allow_nonfinite_option();
  tool.add_json_option();
  tool.add_device_option();

  std::string results_path, plot_path, metric;
  CLI::App* report = app.add_subcommand(
      "report",
      "Summarize a results file of --append lines: a table sorted by bytes per token "
      "with the Pareto front of a metric against bytes marked, and an SVG chart");
  report->add_option("RESULTS", results_path, "JSON Lines written by kv-eval --append")->required();
  report
      ->add_option("--plot", plot_path,
                   "Write the chart of the metric against bytes per token (SVG; replaced whole, "
                   "never left half-written)")
      ->check(kNonEmpty);
  report
      ->add_option("--metric", metric,
                   "Metric to rank by: " + kv::report_metric_names() +
                       " (default: kl when every result has it, else rel_error)")
      ->check(kNonEmpty);
  app.require_subcommand(0, 1);

  return tool.run(argc, argv, [&] {
    if (report->parsed()) {
      // The report reads only its results file: an option meant for a comparison would be
      // ignored without a word.
      for (const CLI::Option* o : app.get_options())
        if (o->count() > 0 && o->get_name() != "--quiet" && o->get_name() != "--threads")
          throw kv::Error(kv::Exit::usage,
                          kv::str("'", o->get_name(),
                                  "' is not an option of 'kv-eval report' "
                                  "(give report's options after the word report)"));
      print_report(results_path, metric, plot_path);
      return;
    }
    if (ref_path.empty()) throw kv::Error(kv::Exit::usage, "--ref REFERENCE is required");
    if (ref_path == "-" && input == "-")
      throw kv::Error(kv::Exit::usage,
                      "the reference and the candidate cannot both be read from stdin");
    for (const std::string& in : {ref_path, input})
      if (kv::same_file(in, append_path))
        throw kv::Error(kv::Exit::usage, kv::str("--append '", append_path, "' is the ",
                                                 in == ref_path ? "reference" : "candidate",
                                                 " snapshot; choose another name"));
    if (tool.json && csv) throw kv::Error(kv::Exit::usage, "give --json or --csv, not both");
    const bool on_cuda = std::string(kv::select_backend(tool.device).name) == "cuda";
    kv::SnapshotReader ref(ref_path, tool.read_options());
    kv::ReadOptions cand_options = tool.read_options();
    cand_options.keep_stored = speed;  // q4_0 and KIVI-2 caches are timed on their codes
    kv::SnapshotReader cand(input, cand_options);
    const kv::Header& h = ref.header();
    kv::check_comparable(h, cand.header());
    if (!model_path.empty() && cand.header().model.n_kv_heads != h.model.n_kv_heads)
      throw kv::Error(kv::Exit::usage,
                      kv::str("--model runs the model's own ", h.model.n_kv_heads,
                              " KV heads; this candidate has ", cand.header().model.n_kv_heads,
                              " (kv-merge -m heads): compare its attention without --model"));
    if (!h.has_probe())
      throw kv::Error(kv::Exit::data,
                      "the reference has no probe, which attention metrics need (capture with "
                      "kv-capture --probe P)");
    if ((generate || !task.empty()) && model_path.empty())
      throw kv::Error(kv::Exit::usage, "--generate and --task need --model");
    std::unique_ptr<kv::Model> model;
    if (!model_path.empty()) model = kv::Model::load(model_path);
    if (!task.empty() && !model->has_tokenizer())
      throw kv::Error(kv::Exit::usage, "--task recall needs a model with a tokenizer (GGUF)");
    if (generate && h.n_tokens + 1 + generate > model->config().context)
      throw kv::Error(
          kv::Exit::usage,
          kv::str("--generate ", generate, ": the snapshot's ", h.n_tokens, " tokens, the cue and ",
                  generate,
                  " new tokens exceed the model's "
                  "context of ",
                  model->config().context, " tokens (at most ",
                  std::max<int64_t>(0, model->config().context - h.n_tokens - 1), " here)"));

    const int L = h.model.n_layers;
    kv::AttentionFidelity total;
    int64_t ref_entries = 0, cand_entries = 0, ref_bytes = 0, cand_bytes = 0;
    kv::Json layers = kv::Json::array();
    std::string table =
        "  layer   entries  k+v stored  rel.error   cosine  mass recall  top-k recall\n";
    // The runtime (--model) and the timing (--speed) need every layer at once; else one at a time.
    const bool keep = model || speed;
    std::vector<kv::Layer> ref_layers(size_t(keep ? L : 1)), cand_layers(size_t(keep ? L : 1));
    for (int l = 0; l < L; ++l) {
      tool.progress("layer", l, L);
      kv::Layer& rl = ref_layers[keep ? size_t(l) : 0];
      kv::Layer& cl = cand_layers[keep ? size_t(l) : 0];
      ref.read_layer(l, rl);
      cand.read_layer(l, cl);
      const kv::AttentionFidelity f = kv::attention_fidelity(h, rl, cl, topk);
      total += f;
      // What each holds of k and v: in the file, and in a page store for a tiered cache (whose
      // disk pages are not free: counting only the file put kv-offload tier on the Pareto front).
      const kv::LayerStorage rs = ref.layer_storage(l), cs = cand.layer_storage(l);
      const int64_t rb = rs.kv_bytes_stored + rs.kv_bytes_in_store;
      const int64_t cb = cs.kv_bytes_stored + cs.kv_bytes_in_store;
      ref_entries += rl.entries();
      cand_entries += cl.entries();
      ref_bytes += rb;
      cand_bytes += cb;
      const double n = double(f.rows);
      kv::Json lj = kv::Json::object();
      lj.set("layer", l).set("entries", cl.entries()).set("kv_bytes", cb);
      lj.set("rel_error", f.rel_error / n).set("cosine", f.cosine / n);
      lj.set("mass_recall", f.mass_recall / n).set("topk_recall", f.topk_recall / n);
      layers.push(std::move(lj));
      char row[200];
      std::snprintf(row, sizeof row, "  %5d  %8lld  %10s  %9.4f  %7.4f  %11.4f  %12.4f\n", l,
                    (long long)cl.entries(), kvt::human_bytes(double(cb)).c_str(), f.rel_error / n,
                    f.cosine / n, f.mass_recall / n, f.topk_recall / n);
      table += row;
    }
    tool.progress_done();
    kv::ModelFidelity mf;
    if (model) {
      const auto ref_logits = kv::probe_logits(*model, h, ref_layers);
      kv::check_model_reproduces_capture(h, ref_logits);
      const auto cand_logits = kv::probe_logits(*model, cand.header(), cand_layers);
      mf = kv::compare_logits(ref_logits, cand_logits, model->config().vocab, h.probe_tokens);
    }
    std::vector<int32_t> gen_ref, gen_cand;
    int64_t common = 0;
    if (generate) {
      const std::vector<int32_t> cue = {h.probe_tokens.front()};
      gen_ref = kv::generate_after(*model, h, ref_layers, cue, generate);
      gen_cand = kv::generate_after(*model, cand.header(), cand_layers, cue, generate);
      while (common < int64_t(std::min(gen_ref.size(), gen_cand.size())) &&
             gen_ref[size_t(common)] == gen_cand[size_t(common)])
        ++common;
    }
    std::vector<kv::RecallItem> items;
    double recall_ref = 0, recall_cand = 0;
    if (!task.empty()) {
      items = kv::recall_items(model->tokenizer(), h.tokens, recall_max);
      if (items.empty())
        throw kv::Error(kv::Exit::data, "the prompt has no sentence the recall task can cue");
      recall_ref = kv::recall_rate(*model, h, ref_layers, items);
      recall_cand = kv::recall_rate(*model, cand.header(), cand_layers, items);
    }
    double t_ref = 0, t_cand = 0, bandwidth = 0;
    const std::string on_codes =
        speed && !on_cuda ? kv::decodes_on_codes(h.model, cand_layers) : std::string();
    if (speed) {
      // The first probe query of every query head, per layer: [L][H_q][D].
      const int Hq = h.model.n_q_heads, D = h.model.head_dim;
      const int64_t P = int64_t(h.probe_tokens.size());
      std::vector<float> queries;
      for (const kv::Layer& rl : ref_layers) {
        const std::vector<float> q = rl.probe_q.to_f32();
        for (int j = 0; j < Hq; ++j)
          queries.insert(queries.end(), q.begin() + int64_t(j) * P * D,
                         q.begin() + (int64_t(j) * P + 1) * D);
      }
      // Enough repetitions for about 0.2 s per cache; the best step counts.
      const double once = kv::decode_step_seconds(h.model, ref_layers, queries, 1, on_cuda);
      const int reps = int(std::clamp(0.2 / std::max(once, 1e-7), 3.0, 2000.0));
      t_ref = kv::decode_step_seconds(h.model, ref_layers, queries, reps, on_cuda);
      t_cand = kv::decode_step_seconds(cand.header().model, cand_layers, queries, reps, on_cuda);
      bandwidth = on_cuda ? kvk::cuda::read_gbps(size_t(1) << 30)
                          : kvk::stream_read_gbps(size_t(256) << 20, omp_get_max_threads(), 3);
    }
    auto text = [&](const std::vector<int32_t>& t) {
      return model && model->has_tokenizer() ? model->tokenizer().decode(t) : std::string();
    };

    const double rows = double(total.rows);
    const double per_token = double(cand_bytes) / double(h.n_tokens);
    const int64_t dense = kv::dense_f16_bytes(ref_entries, h.model.head_dim);
    kv::Json j = kv::Json::object();
    if (!label.empty()) j.set("label", label);
    j.set("reference", ref_path).set("candidate", cand.path());
    j.set("entries", cand_entries).set("entries_reference", ref_entries);
    j.set("kv_bytes", cand_bytes).set("kv_bytes_reference", ref_bytes);
    j.set("bytes_per_token", per_token);
    j.set("ratio_to_reference", double(cand_bytes) / double(ref_bytes));
    j.set("ratio_to_dense_f16", double(cand_bytes) / double(dense));
    j.set("probe_rows", total.rows).set("topk", topk);
    j.set("rel_error", total.rel_error / rows).set("cosine", total.cosine / rows);
    j.set("mass_recall", total.mass_recall / rows).set("topk_recall", total.topk_recall / rows);
    if (model) {
      j.set("ppl_reference", mf.ppl_reference).set("ppl_candidate", mf.ppl_candidate);
      j.set("ppl_delta", mf.ppl_candidate - mf.ppl_reference);
      j.set("kl", mf.kl).set("top1_agreement", mf.top1_agreement);
    }
    if (generate) {
      j.set("generate_tokens", generate).set("generate_common_prefix", common);
      j.set("generate_reference", text(gen_ref)).set("generate_candidate", text(gen_cand));
    }
    if (!task.empty()) {
      j.set("recall_items", int64_t(items.size()));
      j.set("recall_reference", recall_ref).set("recall_candidate", recall_cand);
    }
    if (speed) {
      j.set("decode_ms_reference", t_ref * 1e3).set("decode_ms_candidate", t_cand * 1e3);
      j.set("decode_speedup", t_ref / t_cand);
      j.set("decode_gbps_candidate", double(cand_bytes) / t_cand / 1e9);
      j.set("bandwidth_gbps", bandwidth).set("speed_device", on_cuda ? "cuda" : "cpu");
      j.set("decode_on_codes", on_codes.empty() ? kv::Json(nullptr) : kv::Json(on_codes));
    }
    kv::Json chain = kv::Json::array();
    for (const auto& p : cand.header().provenance) chain.push(p.command_line);
    j.set("provenance", std::move(chain));
    if (per_layer) j.set("layers", std::move(layers));

    if (!append_path.empty()) kv::append_to_file(append_path, j.dump() + "\n");
    if (tool.json) {
      std::cout << j.dump() << "\n";
    } else if (csv) {
      std::cout << "label,candidate,entries,kv_bytes,bytes_per_token,ratio_to_reference,"
                   "rel_error,cosine,mass_recall,topk_recall"
                << (model ? ",ppl_reference,ppl_candidate,kl,top1_agreement" : "") << "\n";
      std::cout << csv_field(label) << "," << csv_field(cand.path()) << "," << cand_entries << ","
                << cand_bytes << "," << kv::format("%.2f", per_token) << ","
                << kv::format("%.6f", double(cand_bytes) / double(ref_bytes)) << ","
                << kv::format("%.6f", total.rel_error / rows) << ","
                << kv::format("%.6f", total.cosine / rows) << ","
                << kv::format("%.6f", total.mass_recall / rows) << ","
                << kv::format("%.6f", total.topk_recall / rows);
      if (model)
        std::cout << "," << kv::format("%.6f", mf.ppl_reference) << ","
                  << kv::format("%.6f", mf.ppl_candidate) << "," << kv::format("%.6f", mf.kl) << ","
                  << kv::format("%.6f", mf.top1_agreement);
      std::cout << "\n";
    } else {
      std::string out;
      out += kv::str("reference   ", ref_path, "\n");
      out += kv::str("candidate   ", cand.path(), label.empty() ? "" : kv::str(" (", label, ")"),
                     "\n");
      if (!cand.header().provenance.empty())
        out += kv::str("made by     ", cand.header().provenance.back().command_line, "\n");
      out += kv::str("storage     k+v ", kvt::human_bytes(double(cand_bytes)), " of ",
                     kvt::human_bytes(double(ref_bytes)), " (",
                     kv::format("%.3f", double(cand_bytes) / double(ref_bytes)),
                     " of the reference, ", kv::format("%.3f", double(cand_bytes) / double(dense)),
                     " of dense f16), ", kv::format("%.1f", per_token), " bytes per token\n");
      out +=
          kv::str("entries     ", cand_entries, " of ", ref_entries, " (",
                  kv::format("%.1f", 100.0 * double(cand_entries) / double(ref_entries)), "%)\n");
      out += kv::str("attention   rel. error ", kv::format("%.4f", total.rel_error / rows),
                     ", cosine ", kv::format("%.4f", total.cosine / rows), ", mass recall ",
                     kv::format("%.4f", total.mass_recall / rows), ", top-", topk, " recall ",
                     kv::format("%.4f", total.topk_recall / rows), "  (", total.rows,
                     " probe query rows)\n");
      if (model)
        out += kv::str("model       perplexity ", kv::format("%.4f", mf.ppl_candidate),
                       " (reference ", kv::format("%.4f", mf.ppl_reference), ", ",
                       kv::format("%+.4f", mf.ppl_candidate - mf.ppl_reference), "), KL ",
                       kv::format("%.5f", mf.kl), ", top-1 agreement ",
                       kv::format("%.4f", mf.top1_agreement), "  (", mf.tokens, " probe tokens)\n");
      if (generate)
        out += kv::str("generate    common prefix ", common, " of ", generate,
                       " greedy tokens after the first probe token\n",
                       "  reference: ", text(gen_ref), "\n", "  candidate: ", text(gen_cand), "\n");
      if (!task.empty())
        out += kv::str("recall      ", kv::format("%.3f", recall_cand),
                       " exact with the candidate, ", kv::format("%.3f", recall_ref),
                       " with the reference (", items.size(), " sentences, ", kv::kRecallCue,
                       "-token cues, ", kv::kRecallTarget, "-token targets)\n");
      if (speed)
        out += kv::str(
            "speed       ", on_cuda ? "(cuda) " : "", "decode step ",
            kv::format("%.4f", t_cand * 1e3), " ms (reference ", kv::format("%.4f", t_ref * 1e3),
            " ms, ", kv::format("%.2f", t_ref / t_cand), "x); candidate reads ",
            kv::format("%.1f", double(cand_bytes) / t_cand / 1e9),
            " GB/s = ", kv::format("%.0f", 100.0 * double(cand_bytes) / t_cand / 1e9 / bandwidth),
            "% of the ", kv::format("%.1f", bandwidth), " GB/s memory read bandwidth",
            on_codes.empty() ? "" : " (timed on its " + on_codes + " codes)", "\n");
      if (per_layer) out += "\n" + table;
      std::cout << out;
    }
  });
}
