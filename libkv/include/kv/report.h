// Summaries of evaluation sweeps: the JSON Lines that kv-eval --append writes, one candidate per
// line, sorted by bytes per token with the Pareto front of an accuracy metric against bytes.
#pragma once
#include <string>
#include <vector>

namespace kv {

struct ResultRow {
  std::string label;  // --label, else the candidate's path
  double bytes_per_token = 0;
  double ratio = 0;     // bytes against the reference
  double metric = 0;    // the chosen metric's value
  bool pareto = false;  // no other row is at most as large and at least as accurate
  std::string line;     // the JSON line as read
};

// Metrics a report can rank by, and whether lower is better for each.
bool metric_lower_is_better(const std::string& metric);  // Error(Exit::usage) if unknown
std::string report_metric_names();

// Reads a results file; `metric` "" picks kl when every row has it, else rel_error. Throws
// Error(Exit::data) naming the line of a malformed row or one without the metric, Error(66) if
// the file cannot be read. Rows come back sorted by bytes per token, Pareto rows marked.
std::vector<ResultRow> read_results(const std::string& path, std::string& metric);

// Marks the rows no other row dominates (bytes no larger and metric no worse, one strictly).
void mark_pareto(std::vector<ResultRow>& rows, bool lower_is_better);

}  // namespace kv
