#include "kv/report.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include "kv/error.h"
#include "kv/json.h"
#include "kv/str.h"

namespace kv {

namespace {
constexpr double kAny = std::numeric_limits<double>::infinity();
struct Metric {
  const char* name;
  bool lower_is_better;
  double min, max;  // the values kv-eval can write
};
constexpr Metric kMetrics[] = {
    {"kl", true, 0, kAny},          {"rel_error", true, 0, kAny}, {"ppl_delta", true, -kAny, kAny},
    {"cosine", false, -1, 1},       {"mass_recall", false, 0, 1}, {"topk_recall", false, 0, 1},
    {"top1_agreement", false, 0, 1}};

const Metric& find_metric(const std::string& name) {
  for (const Metric& m : kMetrics)
    if (name == m.name) return m;
  throw Error(Exit::usage, str("--metric '", name, "' is not one of ", report_metric_names()));
}

// A number of a results line within [min, max] (finite either way), else Error(data).
double checked(const Json& v, const char* field, double min, double max) {
  const double x = v.number();
  if (!std::isfinite(x) || x < min || x > max)
    throw Error(Exit::data,
                str(field, " ", x, " is outside what kv-eval writes (",
                    std::isfinite(min) ? str(min) : std::string("finite"),
                    std::isfinite(max) ? str(" to ", max) : std::string(" or more"), ")"));
  return x;
}
}  // namespace

std::string report_metric_names() {
  std::string names;
  for (const Metric& m : kMetrics) names += names.empty() ? m.name : str(", ", m.name);
  return names;
}

bool metric_lower_is_better(const std::string& metric) {
  return find_metric(metric).lower_is_better;
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
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    throw Error(Exit::no_input, str("cannot open '", path, "': Is a directory"));
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
      r.bytes_per_token = checked(*bpt, "bytes_per_token", 0, kAny);
      r.ratio = checked(*ratio, "ratio_to_reference", 0, kAny);
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
  const Metric& m = find_metric(metric);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Json* v = rows[i].find(metric);
    if (!v || !v->is_number())
      throw Error(Exit::data,
                  str(path, ": result '", out[i].label, "' has no ", metric,
                      metric == "kl" || metric == "ppl_delta" || metric == "top1_agreement"
                          ? " (run kv-eval with --model)"
                          : ""));
    try {
      out[i].metric = checked(*v, m.name, m.min, m.max);
    } catch (const Error& e) {
      throw Error(Exit::data, str(path, ": result '", out[i].label, "': ", e.what()));
    }
  }
  std::stable_sort(out.begin(), out.end(), [](const ResultRow& a, const ResultRow& b) {
    return a.bytes_per_token < b.bytes_per_token;
  });
  mark_pareto(out, m.lower_is_better);
  return out;
}

}  // namespace kv
