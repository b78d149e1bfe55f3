#include "kv/report.h"

#include <algorithm>
#include <fstream>

#include "kv/error.h"
#include "kv/json.h"
#include "kv/str.h"

namespace kv {

namespace {
constexpr std::pair<const char*, bool> kMetrics[] = {
    {"kl", true},           {"rel_error", true},    {"ppl_delta", true},      {"cosine", false},
    {"mass_recall", false}, {"topk_recall", false}, {"top1_agreement", false}};
}  // namespace

std::string report_metric_names() {
  std::string names;
  for (const auto& [n, lower] : kMetrics) names += names.empty() ? n : str(", ", n);
  return names;
}

bool metric_lower_is_better(const std::string& metric) {
  for (const auto& [n, lower] : kMetrics)
    if (metric == n) return lower;
  throw Error(Exit::usage, str("--metric '", metric, "' is not one of ", report_metric_names()));
}

void mark_pareto(std::vector<ResultRow>& rows, bool lower_is_better) {
  auto better_or_equal = [&](double a, double b) { return lower_is_better ? a <= b : a >= b; };
  for (ResultRow& r : rows) {
    r.pareto = true;
    for (const ResultRow& o : rows) {
      if (&o == &r) continue;
      const bool no_worse =
          o.bytes_per_token <= r.bytes_per_token && better_or_equal(o.metric, r.metric);
      const bool strictly = o.bytes_per_token < r.bytes_per_token || o.metric != r.metric;
      if (no_worse && strictly) {
        r.pareto = false;
        break;
      }
    }
  }
}

std::vector<ResultRow> read_results(const std::string& path, std::string& metric) {
  std::ifstream in(path);
  if (!in) throw Error(Exit::no_input, str("cannot open '", path, "': ", errno_text()));
  std::vector<Json> rows;
  std::vector<ResultRow> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      Json j = Json::parse(line);
      if (!j.is_object()) throw Error(Exit::data, "not a JSON object");
      ResultRow r;
      const Json* label = j.find("label");
      const Json* cand = j.find("candidate");
      r.label = label ? label->string() : cand ? cand->string() : str("line ", n);
      const Json* bpt = j.find("bytes_per_token");
      const Json* ratio = j.find("ratio_to_reference");
      if (!bpt || !ratio) throw Error(Exit::data, "no bytes_per_token or ratio_to_reference");
      r.bytes_per_token = bpt->number();
      r.ratio = ratio->number();
      r.line = line;
      out.push_back(r);
      rows.push_back(std::move(j));
    } catch (const Error& e) {
      throw Error(Exit::data, str(path, " line ", n, ": ", e.what(), " (not a kv-eval result?)"));
    }
  }
  if (out.empty()) throw Error(Exit::data, str(path, ": no results"));
  if (metric.empty()) {
    metric = "kl";
    for (const Json& j : rows)
      if (!j.find("kl")) metric = "rel_error";
  }
  const bool lower = metric_lower_is_better(metric);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Json* v = rows[i].find(metric);
    if (!v || !v->is_number())
      throw Error(Exit::data,
                  str(path, ": result '", out[i].label, "' has no ", metric,
                      metric == "kl" || metric == "ppl_delta" || metric == "top1_agreement"
                          ? " (run kv-eval with --model)"
                          : ""));
    out[i].metric = v->number();
  }
  std::stable_sort(out.begin(), out.end(), [](const ResultRow& a, const ResultRow& b) {
    return a.bytes_per_token < b.bytes_per_token;
  });
  mark_pareto(out, lower);
  return out;
}

}  // namespace kv
