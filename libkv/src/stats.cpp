#include "kv/stats.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "kv/str.h"

namespace kv {

std::vector<HeadStats> layer_stats(const Layer& layer, int n_kv_heads, const kvk::Ops& ops) {
  const int D = int(layer.k.cols());
  const std::vector<float> k = layer.k.to_f32(ops), v = layer.v.to_f32(ops);
  std::vector<HeadStats> out(static_cast<size_t>(n_kv_heads));
  for (int h = 0; h < n_kv_heads; ++h) {
    HeadStats& s = out[size_t(h)];
    const int64_t lo = layer.head_offsets[size_t(h)], hi = layer.head_offsets[size_t(h) + 1];
    s.entries = hi - lo;
    s.k_channel_abs_mean.assign(size_t(D), 0.0f);
    std::vector<double> chan(size_t(D), 0.0);
    for (int64_t i = lo; i < hi; ++i) {
      double kn = 0, vn = 0;
      for (int c = 0; c < D; ++c) {
        const float kc = k[size_t(i) * D + c], vc = v[size_t(i) * D + c];
        kn += double(kc) * kc;
        vn += double(vc) * vc;
        chan[size_t(c)] += std::fabs(kc);
      }
      kn = std::sqrt(kn);
      vn = std::sqrt(vn);
      s.k_norm_mean += kn;
      s.v_norm_mean += vn;
      s.k_norm_max = std::max(s.k_norm_max, kn);
      s.v_norm_max = std::max(s.v_norm_max, vn);
    }
    if (s.entries == 0) continue;
    s.k_norm_mean /= double(s.entries);
    s.v_norm_mean /= double(s.entries);
    for (int c = 0; c < D; ++c) s.k_channel_abs_mean[size_t(c)] = float(chan[size_t(c)] / double(s.entries));
    std::vector<float> sorted = s.k_channel_abs_mean;
    std::nth_element(sorted.begin(), sorted.begin() + D / 2, sorted.end());
    const float median = sorted[size_t(D / 2)];
    for (int c = 0; c < D; ++c)
      if (median > 0 && s.k_channel_abs_mean[size_t(c)] > kOutlierRatio * median)
        s.outlier_channels.push_back(c);
  }
  return out;
}

namespace {
// Viridis, sampled at 9 stops and interpolated linearly.
void viridis(float t, int rgb[3]) {
  static const int stops[9][3] = {{68, 1, 84},    {71, 44, 122},  {59, 81, 139},
                                  {44, 113, 142}, {33, 144, 141}, {39, 173, 129},
                                  {92, 200, 99},  {170, 220, 50}, {253, 231, 37}};
  t = std::clamp(t, 0.0f, 1.0f) * 8.0f;
  int i = std::min(int(t), 7);
  float f = t - float(i);
  for (int c = 0; c < 3; ++c)
    rgb[c] = int(std::lround(stops[i][c] * (1 - f) + stops[i + 1][c] * f));
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}
}  // namespace

std::string svg_heatmap(const std::vector<std::vector<float>>& cells,
                        const std::vector<std::string>& row_labels, const std::string& title,
                        const std::string& x_label, int x_group) {
  const size_t rows = cells.size(), cols = rows ? cells[0].size() : 0;
  float lo = INFINITY, hi = -INFINITY;
  for (const auto& r : cells)
    for (float x : r) lo = std::min(lo, x), hi = std::max(hi, x);
  if (!(hi > lo)) hi = lo + 1;
  // Cells stretch to a fixed plot width so wide layers (8 heads x 128 channels) stay readable.
  const double left = 70, top = 40, plot_w = 900, cell_h = std::clamp(600.0 / std::max<size_t>(rows, 1), 6.0, 24.0);
  const double cell_w = plot_w / double(std::max<size_t>(cols, 1));
  const double plot_h = cell_h * double(rows), legend_y = top + plot_h + 40;
  std::string svg;
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
                "font-family=\"sans-serif\" font-size=\"12\">\n",
                left + plot_w + 20, legend_y + 50);
  svg += buf;
  svg += "<text x=\"" + std::to_string(int(left)) + "\" y=\"20\" font-size=\"15\">" +
         xml_escape(title) + "</text>\n";
  for (size_t r = 0; r < rows; ++r) {
    const double y = top + cell_h * double(r);
    std::snprintf(buf, sizeof buf, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
                  left - 6, y + cell_h * 0.75, xml_escape(r < row_labels.size() ? row_labels[r] : "").c_str());
    svg += buf;
    for (size_t c = 0; c < cols; ++c) {
      int rgb[3];
      viridis((cells[r][c] - lo) / (hi - lo), rgb);
      std::snprintf(buf, sizeof buf,
                    "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" "
                    "fill=\"#%02x%02x%02x\"/>\n",
                    left + cell_w * double(c), y, cell_w + 0.05, cell_h + 0.05, rgb[0], rgb[1], rgb[2]);
      svg += buf;
    }
  }
  if (x_group > 0)  // separators between heads
    for (size_t c = size_t(x_group); c < cols; c += size_t(x_group)) {
      std::snprintf(buf, sizeof buf,
                    "<line x1=\"%.2f\" y1=\"%.0f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"white\" "
                    "stroke-width=\"1\"/>\n",
                    left + cell_w * double(c), top, left + cell_w * double(c), top + plot_h);
      svg += buf;
    }
  std::snprintf(buf, sizeof buf, "<text x=\"%.0f\" y=\"%.0f\">%s</text>\n", left,
                top + plot_h + 18, xml_escape(x_label).c_str());
  svg += buf;
  for (int i = 0; i < 100; ++i) {  // colour legend
    int rgb[3];
    viridis(float(i) / 99.0f, rgb);
    std::snprintf(buf, sizeof buf,
                  "<rect x=\"%.1f\" y=\"%.0f\" width=\"3.1\" height=\"12\" fill=\"#%02x%02x%02x\"/>\n",
                  left + 3.0 * i, legend_y, rgb[0], rgb[1], rgb[2]);
    svg += buf;
  }
  std::snprintf(buf, sizeof buf,
                "<text x=\"%.0f\" y=\"%.0f\">%.3g</text><text x=\"%.0f\" y=\"%.0f\" "
                "text-anchor=\"end\">%.3g</text>\n",
                left, legend_y + 28, lo, left + 300, legend_y + 28, hi);
  svg += buf;
  svg += "</svg>\n";
  return svg;
}

}  // namespace kv
