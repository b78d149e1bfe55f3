#include "kv/json.h"

#include <cmath>
#include <cstdio>

namespace kv {

Json& Json::set(const std::string& key, Json value) {
  std::get<Object>(v_).emplace_back(key, std::move(value));
  return *this;
}

Json& Json::push(Json value) {
  std::get<Array>(v_).push_back(std::move(value));
  return *this;
}

static void escape(const std::string& s, std::string& out) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  out += '"';
}

void Json::dump_to(std::string& out) const {
  std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::nullptr_t>) {
          out += "null";
        } else if constexpr (std::is_same_v<T, bool>) {
          out += x ? "true" : "false";
        } else if constexpr (std::is_same_v<T, int64_t>) {
          out += std::to_string(x);
        } else if constexpr (std::is_same_v<T, double>) {
          if (!std::isfinite(x)) {
            out += "null";  // JSON has no NaN/Inf
          } else {
            char buf[32];
            std::snprintf(buf, sizeof buf, "%.9g", x);
            out += buf;
          }
        } else if constexpr (std::is_same_v<T, std::string>) {
          escape(x, out);
        } else if constexpr (std::is_same_v<T, Array>) {
          out += '[';
          for (size_t i = 0; i < x.size(); ++i) {
            if (i) out += ',';
            x[i].dump_to(out);
          }
          out += ']';
        } else {
          out += '{';
          for (size_t i = 0; i < x.size(); ++i) {
            if (i) out += ',';
            escape(x[i].first, out);
            out += ':';
            x[i].second.dump_to(out);
          }
          out += '}';
        }
      },
      v_);
}

std::string Json::dump() const {
  std::string out;
  dump_to(out);
  return out;
}

}  // namespace kv
