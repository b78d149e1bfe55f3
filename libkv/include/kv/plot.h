// SVG charts the tools write themselves (no plotting dependency): kv-inspect's heat map of key
// magnitudes, kv-eval report's accuracy-vs-bytes chart.
#pragma once
#include <string>
#include <vector>

namespace kv {

// An SVG heat map: cells[r][c] coloured on a perceptual scale from the minimum to the maximum.
std::string svg_heatmap(const std::vector<std::vector<float>>& cells,
                        const std::vector<std::string>& row_labels, const std::string& title,
                        const std::string& x_label, int x_group = 0);

// A labelled scatter of (x, y) points on linear axes that include 0 (and reach below it for
// negative values), the points flagged in `front` filled and joined in order of x (a Pareto
// front), the others hollow. Values must be finite. Labels and titles of any length and bytes
// are kept readable as XML (see xml_escape in plot.cpp).
std::string svg_scatter_front(const std::vector<double>& x, const std::vector<double>& y,
                              const std::vector<std::string>& labels,
                              const std::vector<bool>& front, const std::string& title,
                              const std::string& x_label, const std::string& y_label);

}  // namespace kv
