#include "kv/json.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <system_error>

#include "kv/error.h"
#include "kv/str.h"

namespace kv {

Json& Json::set(const std::string& key, Json value) {
  std::get<Object>(v_).emplace_back(key, std::move(value));
  return *this;
}

Json& Json::push(Json value) {
  std::get<Array>(v_).push_back(std::move(value));
  return *this;
}

// U+FFFD in UTF-8: what a byte that is not UTF-8 becomes, in dump() and in parse() alike (so
// dump -> parse -> dump is a fixed point).
static constexpr char kReplacement[] = "\xEF\xBF\xBD";

// Appends `n` raw bytes of text, each byte that is not part of well-formed UTF-8 as U+FFFD.
static void append_checked_utf8(std::string_view s, size_t from, size_t n, std::string& out) {
  for (size_t i = from; i < from + n;) {
    const size_t k = utf8_length(s, i);
    if (k == 0 || i + k > from + n) {
      out += kReplacement;
      ++i;
    } else {
      out.append(s, i, k);
      i += k;
    }
  }
}

// A JSON string of `s`; bytes that are not UTF-8 (a prompt or command line in another
// encoding) become U+FFFD, as a JSON text must be UTF-8 (RFC 8259).
static void escape(const std::string& s, std::string& out) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_length(s, i);
    if (n == 0) {
      out += kReplacement;
      ++i;
      continue;
    }
    if (n > 1) {
      out.append(s, i, n);
      i += n;
      continue;
    }
    const unsigned char c = static_cast<unsigned char>(s[i++]);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
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

// ---- parsing --------------------------------------------------------------------------------

namespace {

constexpr int kMaxDepth = 256;

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

// For a number literal (already checked against the grammar) that std::from_chars found out of
// range: true when it is too large for a double, false when it underflows towards zero. Compares
// the decimal exponent of its leading significant digit with 0 (out-of-range values are beyond
// 1e308 or below 1e-323), saturating so that huge exponents cannot overflow.
bool overflows(std::string_view lit) {
  constexpr int64_t kCap = int64_t(1) << 50;
  size_t i = 0;
  if (i < lit.size() && lit[i] == '-') ++i;
  int64_t int_digits = 0, lead = 0;
  bool found = false;
  for (; i < lit.size() && is_digit(lit[i]); ++i, ++int_digits) {
    if (!found && lit[i] != '0') found = true, lead = int_digits;
  }
  if (found) lead = int_digits - 1 - lead;
  if (i < lit.size() && lit[i] == '.') {
    ++i;
    for (int64_t j = 1; i < lit.size() && is_digit(lit[i]); ++i, ++j) {
      if (!found && lit[i] != '0') found = true, lead = -j;
    }
  }
  if (!found) return false;  // zero: never out of range
  int64_t exp = 0;
  bool neg_exp = false;
  if (i < lit.size() && (lit[i] == 'e' || lit[i] == 'E')) {
    ++i;
    if (i < lit.size() && (lit[i] == '+' || lit[i] == '-')) neg_exp = lit[i++] == '-';
    for (; i < lit.size() && is_digit(lit[i]); ++i) {
      if (exp < kCap) exp = exp * 10 + (lit[i] - '0');
    }
  }
  return lead + (neg_exp ? -exp : exp) > 0;
}

class Parser {
 public:
  explicit Parser(std::string_view text) : t_(text) {}

  Json run() {
    skip_ws();
    Json v = value(0);
    skip_ws();
    if (p_ < t_.size()) fail(str("trailing ", describe(p_), " after the value"));
    return v;
  }

 private:
  [[noreturn]] void fail_at(const std::string& what, size_t at) const {
    throw Error(Exit::data, str("JSON: ", what, " at offset ", at));
  }
  [[noreturn]] void fail(const std::string& what) const { fail_at(what, p_); }
  [[noreturn]] void expected(const char* what) const {
    fail(str("expected ", what, " but found ", describe(p_)));
  }

  // "end of input", "'x'" or "byte 0xNN": never copies raw bytes of the input into a message.
  std::string describe(size_t at) const {
    if (at >= t_.size()) return "end of input";
    const unsigned char c = static_cast<unsigned char>(t_[at]);
    if (c >= 0x20 && c < 0x7F) return str("'", char(c), "'");
    char buf[16];
    std::snprintf(buf, sizeof buf, "byte 0x%02x", unsigned(c));
    return buf;
  }

  bool at_end() const { return p_ >= t_.size(); }
  bool eat(char c) {
    if (p_ < t_.size() && t_[p_] == c) {
      ++p_;
      return true;
    }
    return false;
  }
  void skip_ws() {
    while (p_ < t_.size() && (t_[p_] == ' ' || t_[p_] == '\t' || t_[p_] == '\n' || t_[p_] == '\r'))
      ++p_;
  }

  Json value(int depth) {
    if (at_end()) fail("unexpected end of input");
    switch (t_[p_]) {
      case '{':
        return object(depth + 1);
      case '[':
        return array(depth + 1);
      case '"':
        return Json(string());
      case 't':
        literal("true");
        return Json(true);
      case 'f':
        literal("false");
        return Json(false);
      case 'n':
        literal("null");
        return Json(nullptr);
      default:
        if (t_[p_] == '-' || is_digit(t_[p_])) return number();
        fail(str("unexpected ", describe(p_)));
    }
  }

  void literal(std::string_view word) {
    if (t_.substr(p_, word.size()) != word) fail(str("invalid literal (expected '", word, "')"));
    p_ += word.size();
  }

  // depth counts enclosing containers, this one included; checked before anything nested.
  Json array(int depth) {
    if (depth > kMaxDepth) fail(str("nesting deeper than ", kMaxDepth));
    ++p_;  // '['
    Json::Array items;
    skip_ws();
    if (eat(']')) return Json(std::move(items));
    for (;;) {
      skip_ws();
      items.push_back(value(depth));
      skip_ws();
      if (eat(',')) continue;
      if (eat(']')) return Json(std::move(items));
      expected("',' or ']'");
    }
  }

  Json object(int depth) {
    if (depth > kMaxDepth) fail(str("nesting deeper than ", kMaxDepth));
    ++p_;  // '{'
    Json::Object members;
    skip_ws();
    if (eat('}')) return Json(std::move(members));
    for (;;) {
      skip_ws();
      if (at_end() || t_[p_] != '"') expected("a string key");
      std::string key = string();
      skip_ws();
      if (!eat(':')) expected("':'");
      skip_ws();
      Json v = value(depth);
      members.emplace_back(std::move(key), std::move(v));
      skip_ws();
      if (eat(',')) continue;
      if (eat('}')) return Json(std::move(members));
      expected("',' or '}'");
    }
  }

  // Four hex digits at p_ (after "\u", which starts at esc).
  uint32_t hex4(size_t esc) {
    if (t_.size() - p_ < 4) fail_at("invalid \\u escape", esc);
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const int h = hex_value(t_[p_ + i]);
      if (h < 0) fail_at("invalid \\u escape", esc);
      v = v << 4 | uint32_t(h);
    }
    p_ += 4;
    return v;
  }

  std::string string() {
    const size_t start = p_++;  // '"'
    std::string out;
    for (;;) {
      const size_t run = p_;
      while (p_ < t_.size()) {
        const unsigned char c = static_cast<unsigned char>(t_[p_]);
        if (c == '"' || c == '\\' || c < 0x20) break;
        ++p_;
      }
      append_checked_utf8(t_, run, p_ - run, out);
      if (at_end()) fail_at("unterminated string", start);
      const unsigned char c = static_cast<unsigned char>(t_[p_]);
      if (c == '"') {
        ++p_;
        return out;
      }
      if (c < 0x20) fail(str("unescaped control character ", describe(p_), " in string"));
      const size_t esc = p_++;  // '\\'
      if (at_end()) fail_at("unterminated string", start);
      switch (t_[p_++]) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          uint32_t cp = hex4(esc);
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail_at("lone low surrogate", esc);
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (t_.size() - p_ < 2 || t_[p_] != '\\' || t_[p_ + 1] != 'u')
              fail_at("lone high surrogate", esc);
            const size_t esc2 = p_;
            p_ += 2;
            const uint32_t lo = hex4(esc2);
            if (lo < 0xDC00 || lo > 0xDFFF) fail_at("lone high surrogate", esc);
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default:
          fail_at(str("invalid escape \\", describe(p_ - 1)), esc);
      }
    }
  }

  Json number() {
    const size_t start = p_;
    eat('-');
    if (at_end() || !is_digit(t_[p_]))
      fail(str("invalid number: expected a digit, found ", describe(p_)));
    if (t_[p_] == '0') {
      ++p_;
      if (!at_end() && is_digit(t_[p_])) fail_at("leading zero in number", start);
    } else {
      while (!at_end() && is_digit(t_[p_])) ++p_;
    }
    bool integral = true;
    if (eat('.')) {
      integral = false;
      if (at_end() || !is_digit(t_[p_])) fail("invalid number: no digits after '.'");
      while (!at_end() && is_digit(t_[p_])) ++p_;
    }
    if (!at_end() && (t_[p_] == 'e' || t_[p_] == 'E')) {
      integral = false;
      ++p_;
      if (!eat('+')) eat('-');
      if (at_end() || !is_digit(t_[p_])) fail("invalid number: no digits in exponent");
      while (!at_end() && is_digit(t_[p_])) ++p_;
    }
    const char* first = t_.data() + start;
    const char* last = t_.data() + p_;
    if (integral) {
      int64_t i = 0;
      const auto r = std::from_chars(first, last, i);
      // "-0" is the exception: a double, so that -0.0 (which dump() writes as "-0") reads back
      // with its sign and dump() -> parse() -> dump() is a fixed point.
      if (r.ec == std::errc() && r.ptr == last && !(i == 0 && *first == '-')) return Json(i);
      // Otherwise "-0" or too large for int64_t: a double.
    }
    double d = 0;
    const auto r = std::from_chars(first, last, d);
    if (r.ec == std::errc() && r.ptr == last) return Json(d);
    if (r.ec == std::errc::result_out_of_range && r.ptr == last) {
      const std::string_view lit(first, size_t(last - first));
      if (overflows(lit)) fail_at("number out of range", start);
      return Json(lit[0] == '-' ? -0.0 : 0.0);
    }
    fail_at("invalid number", start);
  }

  std::string_view t_;
  size_t p_ = 0;
};

}  // namespace

Json Json::parse(std::string_view text) {
  return Parser(text).run();
}

bool Json::is_null() const {
  return std::holds_alternative<std::nullptr_t>(v_);
}
bool Json::is_bool() const {
  return std::holds_alternative<bool>(v_);
}
bool Json::is_number() const {
  return std::holds_alternative<int64_t>(v_) || std::holds_alternative<double>(v_);
}
bool Json::is_string() const {
  return std::holds_alternative<std::string>(v_);
}
bool Json::is_array() const {
  return std::holds_alternative<Array>(v_);
}
bool Json::is_object() const {
  return std::holds_alternative<Object>(v_);
}

// A double as int64_t when it is an exact integer in range.
static bool exact_int64(double d, int64_t& out) {
  if (!(d >= -0x1p63 && d < 0x1p63) || d != std::trunc(d)) return false;
  out = int64_t(d);
  return true;
}

double Json::number() const {
  if (const int64_t* i = std::get_if<int64_t>(&v_)) return double(*i);
  if (const double* d = std::get_if<double>(&v_)) return *d;
  throw Error(Exit::data, "JSON: expected a number");
}

int64_t Json::integer() const {
  if (const int64_t* i = std::get_if<int64_t>(&v_)) return *i;
  int64_t out = 0;
  if (const double* d = std::get_if<double>(&v_); d && exact_int64(*d, out)) return out;
  throw Error(Exit::data, "JSON: expected an integer");
}

bool Json::boolean() const {
  if (const bool* b = std::get_if<bool>(&v_)) return *b;
  throw Error(Exit::data, "JSON: expected a boolean");
}

const std::string& Json::string() const {
  if (const std::string* s = std::get_if<std::string>(&v_)) return *s;
  throw Error(Exit::data, "JSON: expected a string");
}

const Json::Array& Json::as_array() const {
  if (const Array* a = std::get_if<Array>(&v_)) return *a;
  throw Error(Exit::data, "JSON: expected an array");
}

const Json::Object& Json::as_object() const {
  if (const Object* o = std::get_if<Object>(&v_)) return *o;
  throw Error(Exit::data, "JSON: expected an object");
}

const Json* Json::find(const std::string& key) const {
  if (const Object* o = std::get_if<Object>(&v_)) {
    for (const auto& [k, v] : *o)
      if (k == key) return &v;
  }
  return nullptr;
}

bool Json::operator==(const Json& other) const {
  if (is_number() || other.is_number()) {
    if (!is_number() || !other.is_number()) return false;
    const int64_t* a = std::get_if<int64_t>(&v_);
    const int64_t* b = std::get_if<int64_t>(&other.v_);
    if (a && b) return *a == *b;
    if (!a && !b) return std::get<double>(v_) == std::get<double>(other.v_);
    // One of each: equal only when the double is exactly that integer.
    int64_t i = 0;
    return exact_int64(a ? std::get<double>(other.v_) : std::get<double>(v_), i) &&
           i == (a ? *a : *b);
  }
  return v_ == other.v_;
}

}  // namespace kv
