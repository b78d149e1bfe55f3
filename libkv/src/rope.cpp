#include "kv/rope.h"

#include <cmath>

namespace kv {

RopeTable::RopeTable(int rope_dims, double theta, int64_t n_positions)
    : half_(rope_dims / 2), n_positions_(n_positions) {
  cos_.resize(size_t(n_positions) * half_);
  sin_.resize(cos_.size());
  for (int i = 0; i < half_; ++i) {
    // Angles in double: at 32k positions float phase error would reach ~1e-3 rad.
    const double freq = std::pow(theta, -2.0 * i / rope_dims);
    for (int64_t p = 0; p < n_positions; ++p) {
      cos_[size_t(p) * half_ + i] = float(std::cos(double(p) * freq));
      sin_[size_t(p) * half_ + i] = float(std::sin(double(p) * freq));
    }
  }
}

void RopeTable::apply(float* x, int64_t pos, bool pairs, int sign) const {
  const float* c = &cos_[size_t(pos) * half_];
  const float* s = &sin_[size_t(pos) * half_];
  for (int i = 0; i < half_; ++i) {
    float* a = pairs ? &x[2 * i] : &x[i];
    float* b = pairs ? &x[2 * i + 1] : &x[i + half_];
    const float sn = sign * s[i], x0 = *a, x1 = *b;
    *a = x0 * c[i] - x1 * sn;
    *b = x0 * sn + x1 * c[i];
  }
}

}  // namespace kv
