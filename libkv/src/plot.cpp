#include "kv/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "kv/str.h"

namespace kv {

namespace {
// Viridis, sampled at 9 stops and interpolated linearly.
void viridis(float t, int rgb[3]) {
  static const int stops[9][3] = {{68, 1, 84},    {71, 44, 122},  {59, 81, 139},
                                  {44, 113, 142}, {33, 144, 141}, {39, 173, 129},
                                  {92, 200, 99},  {170, 220, 50}, {253, 231, 37}};
  t = (t >= 0.0f ? std::min(t, 1.0f) : 0.0f) * 8.0f;  // (NaN: 0, not an index out of range)
  int i = std::min(int(t), 7);
  float f = t - float(i);
  for (int c = 0; c < 3; ++c)
    rgb[c] = int(std::lround(stops[i][c] * (1 - f) + stops[i + 1][c] * f));
}

// Text as XML character data: markup characters escaped, and what XML 1.0 cannot hold (control
// characters but tab, newline and carriage return, bytes that are not UTF-8) shown as U+FFFD,
// so a label from a results file cannot break the chart.
std::string xml_escape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const char c = s[i];
    const size_t n = utf8_length(s, i);
    if (c == '<')
      out += "&lt;";
    else if (c == '>')
      out += "&gt;";
    else if (c == '&')
      out += "&amp;";
    else if (c == '"')
      out += "&quot;";
    else if (n == 0 || (uint8_t(c) < 0x20 && c != '\t' && c != '\n' && c != '\r'))
      out += "&#xFFFD;";
    else
      out.append(s, i, n);
    i += n ? n : 1;
  }
  return out;
}

}  // namespace

std::string svg_heatmap(const std::vector<std::vector<float>>& cells,
                        const std::vector<std::string>& row_labels, const std::string& title,
                        const std::string& x_label, int x_group) {
  const size_t rows = cells.size(), cols = rows ? cells[0].size() : 0;
  float lo = INFINITY, hi = -INFINITY;  // over the finite cells (NaN and Inf: drawn grey)
  for (const auto& r : cells)
    for (float x : r)
      if (std::isfinite(x)) lo = std::min(lo, x), hi = std::max(hi, x);
  if (!std::isfinite(lo))
    lo = 0, hi = 1;  // no finite cell at all
  else if (!(hi > lo))
    hi = lo + 1;
  // Cells stretch to a fixed plot width so wide layers (8 heads x 128 channels) stay readable.
  const double left = 70, top = 40, plot_w = 900,
               cell_h = std::clamp(600.0 / std::max<size_t>(rows, 1), 6.0, 24.0);
  const double cell_w = plot_w / double(std::max<size_t>(cols, 1));
  const double plot_h = cell_h * double(rows), legend_y = top + plot_h + 40;
  std::string svg;
  svg += format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n",
      left + plot_w + 20, legend_y + 50);
  svg += "<text x=\"" + std::to_string(int(left)) + "\" y=\"20\" font-size=\"15\">" +
         xml_escape(title) + "</text>\n";
  for (size_t r = 0; r < rows; ++r) {
    const double y = top + cell_h * double(r);
    svg +=
        format("<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n", left - 6,
               y + cell_h * 0.75, xml_escape(r < row_labels.size() ? row_labels[r] : "").c_str());
    for (size_t c = 0; c < cols; ++c) {
      int rgb[3] = {128, 128, 128};
      if (std::isfinite(cells[r][c])) viridis((cells[r][c] - lo) / (hi - lo), rgb);
      svg += format(
          "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" "
          "fill=\"#%02x%02x%02x\"/>\n",
          left + cell_w * double(c), y, cell_w + 0.05, cell_h + 0.05, rgb[0], rgb[1], rgb[2]);
    }
  }
  if (x_group > 0)  // separators between heads
    for (size_t c = size_t(x_group); c < cols; c += size_t(x_group)) {
      svg += format(
          "<line x1=\"%.2f\" y1=\"%.0f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"white\" "
          "stroke-width=\"1\"/>\n",
          left + cell_w * double(c), top, left + cell_w * double(c), top + plot_h);
    }
  svg += format("<text x=\"%.0f\" y=\"%.0f\">%s</text>\n", left, top + plot_h + 18,
                xml_escape(x_label).c_str());
  for (int i = 0; i < 100; ++i) {  // colour legend
    int rgb[3];
    viridis(float(i) / 99.0f, rgb);
    svg +=
        format("<rect x=\"%.1f\" y=\"%.0f\" width=\"3.1\" height=\"12\" fill=\"#%02x%02x%02x\"/>\n",
               left + 3.0 * i, legend_y, rgb[0], rgb[1], rgb[2]);
  }
  svg += format(
      "<text x=\"%.0f\" y=\"%.0f\">%.3g</text><text x=\"%.0f\" y=\"%.0f\" "
      "text-anchor=\"end\">%.3g</text>\n",
      left, legend_y + 28, lo, left + 300, legend_y + 28, hi);
  svg += "</svg>\n";
  return svg;
}

namespace {
// About five round tick values covering [min(lo, 0), max(hi, 0)], first and last included;
// at most a dozen whatever the values (finite ones: callers check).
std::vector<double> ticks(double lo, double hi) {
  lo = std::min(lo, 0.0);
  hi = std::max(hi, 0.0);
  if (!(hi > lo)) hi = lo + 1;
  const double raw = hi / 5 - lo / 5, mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / mag < 1.5   ? mag
                      : raw / mag < 3.5 ? 2 * mag
                      : raw / mag < 7.5 ? 5 * mag
                                        : 10 * mag;
  const double first = std::floor(lo / step) * step;
  const double count = std::ceil(hi / step - first / step - 1e-9);
  std::vector<double> t;
  for (int k = 0; k <= int(std::clamp(count, 1.0, 12.0)); ++k) t.push_back(first + k * step);
  if (!std::isfinite(t.back()) || !(t.back() > t.front())) return {lo, hi};  // near DBL_MAX
  return t;
}
}  // namespace

std::string svg_scatter_front(const std::vector<double>& x, const std::vector<double>& y,
                              const std::vector<std::string>& labels,
                              const std::vector<bool>& front, const std::string& title,
                              const std::string& x_label, const std::string& y_label) {
  const double left = 80, top = 40, w = 640, h = 400;
  double x_lo = 0, x_hi = 0, y_lo = 0, y_hi = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    x_lo = std::min(x_lo, x[i]), x_hi = std::max(x_hi, x[i]);
    y_lo = std::min(y_lo, y[i]), y_hi = std::max(y_hi, y[i]);
  }
  const std::vector<double> xt = ticks(x_lo, x_hi), yt = ticks(y_lo, y_hi);
  // Positions from fractions of the axis span (v / span - first / span: no overflow near the
  // largest doubles).
  auto frac = [](double v, const std::vector<double>& t) {
    return v / (t.back() - t.front()) - t.front() / (t.back() - t.front());
  };
  auto px = [&](double v) { return left + w * frac(v, xt); };
  auto py = [&](double v) { return top + h - h * frac(v, yt); };
  std::string svg;
  svg += format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n"
      "<text x=\"%.0f\" y=\"22\" font-size=\"15\">%s</text>\n"
      "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" "
      "stroke=\"#888\"/>\n",
      left + w + 160, top + h + 60, left, xml_escape(title).c_str(), left, top, w, h);
  for (double v : xt) {
    svg += format(
        "<line x1=\"%.1f\" y1=\"%.0f\" x2=\"%.1f\" y2=\"%.0f\" stroke=\"#ddd\"/>"
        "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%g</text>\n",
        px(v), top, px(v), top + h, px(v), top + h + 16, v);
  }
  for (double v : yt) {
    svg += format(
        "<line x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
        "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n",
        left, py(v), left + w, py(v), left - 6, py(v) + 4, v);
  }
  svg += format(
      "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">%s</text>\n"
      "<text x=\"16\" y=\"%.0f\" transform=\"rotate(-90 16 %.0f)\" "
      "text-anchor=\"middle\">%s</text>\n",
      left + w / 2, top + h + 40, xml_escape(x_label).c_str(), top + h / 2, top + h / 2,
      xml_escape(y_label).c_str());
  std::vector<size_t> on_front;
  for (size_t i = 0; i < x.size(); ++i)
    if (front[i]) on_front.push_back(i);
  std::sort(on_front.begin(), on_front.end(), [&](size_t a, size_t b) { return x[a] < x[b]; });
  if (on_front.size() > 1) {
    svg += "<polyline fill=\"none\" stroke=\"#c0392b\" stroke-width=\"1.5\" points=\"";
    for (size_t i : on_front) {
      svg += format("%.1f,%.1f ", px(x[i]), py(y[i]));
    }
    svg += "\"/>\n";
  }
  for (size_t i = 0; i < x.size(); ++i) {
    svg += format(
        "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\" stroke=\"#c0392b\"/>"
        "<text x=\"%.1f\" y=\"%.1f\" font-size=\"10\">%s</text>\n",
        px(x[i]), py(y[i]), front[i] ? "#c0392b" : "white", px(x[i]) + 6, py(y[i]) - 4,
        xml_escape(i < labels.size() ? labels[i] : "").c_str());
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace kv
