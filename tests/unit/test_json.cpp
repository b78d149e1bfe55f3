// kv::Json: the parser (every value type, escape, number boundary and malformed input, each
// malformed one with its exit code, message and offset), the checked accessors, equality, and
// dump() -> parse() round trips, including a kv-eval JSON Lines record read back.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "kv/error.h"
#include "kv/json.h"

namespace kv {
// GoogleTest prints values of failed comparisons as their JSON text.
void PrintTo(const Json& j, std::ostream* os) {
  *os << j.dump();
}
}  // namespace kv

namespace {

using kv::Exit;
using kv::Json;

// The input made printable for failure messages.
std::string show(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7F) {
      out += char(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", unsigned(c));
      out += buf;
    }
  }
  return out;
}

// The kv::Error that parsing text throws (a test failure when it throws none or another type).
kv::Error parse_error(std::string_view text) {
  try {
    Json::parse(text);
    ADD_FAILURE() << "parsed without error: " << show(text);
  } catch (const kv::Error& e) {
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-kv::Error for " << show(text) << ": " << e.what();
  }
  return kv::Error(Exit::ok, "");
}

// Checks the accessor throws kv::Error(Exit::data, "JSON: ...").
template <class F>
void expect_data_error(F&& f, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << "no error: " << what;
  } catch (const kv::Error& e) {
    EXPECT_EQ(e.code(), Exit::data) << what;
    EXPECT_EQ(std::string(e.what()).rfind("JSON: ", 0), 0u) << what << ": " << e.what();
  }
}

// ---- values ----------------------------------------------------------------------------------

TEST(JsonParse, Literals) {
  const Json n = Json::parse("null"), t = Json::parse("true"), f = Json::parse("false");
  EXPECT_TRUE(n.is_null());
  EXPECT_FALSE(n.is_bool() || n.is_number() || n.is_string() || n.is_array() || n.is_object());
  EXPECT_TRUE(t.is_bool());
  EXPECT_TRUE(t.boolean());
  EXPECT_TRUE(f.is_bool());
  EXPECT_FALSE(f.boolean());
  EXPECT_FALSE(t.is_null() || t.is_number() || t.is_string() || t.is_array() || t.is_object());
  EXPECT_EQ(n, Json());
  EXPECT_EQ(t, Json(true));
  EXPECT_EQ(f, Json(false));
  EXPECT_EQ(n.dump(), "null");
  EXPECT_EQ(t.dump(), "true");
  EXPECT_EQ(f.dump(), "false");
}

TEST(JsonParse, Integers) {
  for (const auto& [text, value] : std::vector<std::pair<std::string, int64_t>>{
           {"0", 0},
           {"7", 7},
           {"-1", -1},
           {"64000", 64000},
           {"9223372036854775807", std::numeric_limits<int64_t>::max()},
           {"-9223372036854775808", std::numeric_limits<int64_t>::min()}}) {
    const Json j = Json::parse(text);
    ASSERT_TRUE(j.is_number()) << text;
    EXPECT_EQ(j.integer(), value) << text;
    EXPECT_EQ(j.number(), double(value)) << text;
    EXPECT_EQ(j.dump(), text) << "kept as int64_t: dump() prints every digit";
  }
  // "-0" is the one integral literal stored as a double: -0.0 keeps its sign.
  const Json z = Json::parse("-0");
  EXPECT_EQ(z.integer(), 0);
  EXPECT_EQ(z.number(), 0.0);
  EXPECT_TRUE(std::signbit(z.number()));
  EXPECT_EQ(z.dump(), "-0");
  EXPECT_EQ(z, Json(0)) << "equal by value";
  EXPECT_FALSE(std::signbit(Json::parse("0").number()));
  EXPECT_EQ(Json::parse("0").dump(), "0");
}

TEST(JsonParse, Int64DoubleBoundary) {
  // One past INT64_MAX (and below INT64_MIN) no longer fits: a double.
  const Json big = Json::parse("9223372036854775808");
  ASSERT_TRUE(big.is_number());
  EXPECT_EQ(big.number(), 9223372036854775808.0);
  EXPECT_EQ(big.dump(), "9.22337204e+18");
  expect_data_error([&] { (void)big.integer(); }, "2^63 is out of int64_t range");
  const Json small = Json::parse("-9223372036854775809");
  EXPECT_EQ(small.number(), -9223372036854775808.0);
  EXPECT_EQ(small.dump(), "-9.22337204e+18");
  EXPECT_EQ(small.integer(), std::numeric_limits<int64_t>::min()) << "the double is exactly -2^63";
  // A long run of digits is a double too (and parses in linear time).
  const Json huge = Json::parse(std::string(300, '9'));
  EXPECT_DOUBLE_EQ(huge.number(), 1e300);
}

TEST(JsonParse, Doubles) {
  // A fraction or exponent makes a double even when the value is integral.
  const Json e3 = Json::parse("1e3");
  EXPECT_EQ(e3.number(), 1000.0);
  EXPECT_EQ(e3.integer(), 1000) << "doubles that are exact integers";
  EXPECT_EQ(Json::parse("1e18").dump(), "1e+18") << "a double, not int64_t 10^18";
  EXPECT_EQ(Json::parse("1000000000000000000").dump(), "1000000000000000000");
  EXPECT_EQ(Json::parse("1.0").number(), 1.0);
  EXPECT_EQ(Json::parse("1.5E-2").number(), 1.5E-2);
  EXPECT_EQ(Json::parse("1.5e-2").number(), 0.015);
  EXPECT_EQ(Json::parse("2E+2").number(), 200.0);
  EXPECT_EQ(Json::parse("-0.5").number(), -0.5);
  EXPECT_EQ(Json::parse("0.1085").number(), 0.1085);
  EXPECT_EQ(Json::parse("-1.25e-5").number(), -1.25e-5);
  EXPECT_EQ(Json::parse("1.7976931348623157e308").number(), std::numeric_limits<double>::max());
  EXPECT_EQ(Json::parse("4.9406564584124654e-324").number(),
            std::numeric_limits<double>::denorm_min());
  const Json neg_zero = Json::parse("-0.0");
  EXPECT_EQ(neg_zero.number(), 0.0);
  EXPECT_TRUE(std::signbit(neg_zero.number()));
  EXPECT_EQ(neg_zero.integer(), 0);
  expect_data_error([] { (void)Json::parse("1.5").integer(); }, "1.5 is not an integer");
  // Underflow rounds to a signed zero; overflow is an error (see Malformed).
  const Json tiny = Json::parse("1e-400"), neg_tiny = Json::parse("-1e-400");
  EXPECT_EQ(tiny.number(), 0.0);
  EXPECT_FALSE(std::signbit(tiny.number()));
  EXPECT_EQ(neg_tiny.number(), 0.0);
  EXPECT_TRUE(std::signbit(neg_tiny.number()));
  EXPECT_EQ(Json::parse("123456789e-99999999999999999999").number(), 0.0);
  EXPECT_EQ(Json::parse("0e99999999999999999999").number(), 0.0);
  EXPECT_EQ(Json::parse("0." + std::string(500, '0') + "1e400").number(), 1e-101);
}

TEST(JsonParse, StringEscapes) {
  EXPECT_EQ(Json::parse(R"("")").string(), "");
  EXPECT_EQ(Json::parse(R"("plain text")").string(), "plain text");
  EXPECT_EQ(Json::parse(R"("\"")").string(), "\"");
  EXPECT_EQ(Json::parse(R"("\\")").string(), "\\");
  EXPECT_EQ(Json::parse(R"("\/")").string(), "/");
  EXPECT_EQ(Json::parse(R"("\b")").string(), "\b");
  EXPECT_EQ(Json::parse(R"("\f")").string(), "\f");
  EXPECT_EQ(Json::parse(R"("\n")").string(), "\n");
  EXPECT_EQ(Json::parse(R"("\r")").string(), "\r");
  EXPECT_EQ(Json::parse(R"("\t")").string(), "\t");
  EXPECT_EQ(Json::parse(R"("a\"b\\c\/d\be\ff\ng\rh\ti")").string(), "a\"b\\c/d\be\ff\ng\rh\ti");
  // \uXXXX, either case of hex digit, written out as UTF-8.
  EXPECT_EQ(Json::parse(R"("\u0041")").string(), "A");
  EXPECT_EQ(Json::parse(R"("\u00e9\u00E9")").string(), "\xC3\xA9\xC3\xA9");
  EXPECT_EQ(Json::parse(R"("\u07FF")").string(), "\xDF\xBF");
  EXPECT_EQ(Json::parse(R"("\u0800")").string(), "\xE0\xA0\x80");
  EXPECT_EQ(Json::parse(R"("\u20ac")").string(), "\xE2\x82\xAC");
  EXPECT_EQ(Json::parse(R"("\uFFFF")").string(), "\xEF\xBF\xBF");
  EXPECT_EQ(Json::parse(R"("\u001f")").string(), "\x1f");
  EXPECT_EQ(Json::parse(R"("a\u0000b")").string(), std::string("a\0b", 3));
  // Raw UTF-8 (and DEL) passes through unchanged; a byte that is not UTF-8 reads as U+FFFD.
  EXPECT_EQ(Json::parse("\"caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80\"").string(),
            "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80");
  EXPECT_EQ(Json::parse("\"\x7F\xFF\x80\"").string(), "\x7F\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(JsonParse, SurrogatePairs) {
  EXPECT_EQ(Json::parse(R"("\uD83D\uDE00")").string(), "\xF0\x9F\x98\x80");      // U+1F600
  EXPECT_EQ(Json::parse(R"("\ud800\udc00")").string(), "\xF0\x90\x80\x80");      // U+10000
  EXPECT_EQ(Json::parse(R"("\uDBFF\uDFFF")").string(), "\xF4\x8F\xBF\xBF");      // U+10FFFF
  EXPECT_EQ(Json::parse(R"("x\uD834\uDD1Ey")").string(), "x\xF0\x9D\x84\x9Ey");  // U+1D11E
}

TEST(JsonParse, ArraysAndObjects) {
  const Json a = Json::parse("[1,\"two\",[3],{\"four\":4},null,true]");
  ASSERT_TRUE(a.is_array());
  const Json::Array& items = a.as_array();
  ASSERT_EQ(items.size(), 6u);
  EXPECT_EQ(items[0].integer(), 1);
  EXPECT_EQ(items[1].string(), "two");
  EXPECT_EQ(items[2].as_array().at(0).integer(), 3);
  EXPECT_EQ(items[3].find("four")->integer(), 4);
  EXPECT_TRUE(items[4].is_null());
  EXPECT_TRUE(items[5].boolean());

  const Json o = Json::parse(R"({"b":1,"a":[],"c":{},"b":2})");
  ASSERT_TRUE(o.is_object());
  const Json::Object& members = o.as_object();
  ASSERT_EQ(members.size(), 4u) << "duplicate keys are all kept";
  EXPECT_EQ(members[0].first, "b");
  EXPECT_EQ(members[1].first, "a");
  EXPECT_EQ(members[2].first, "c");
  EXPECT_EQ(members[3].first, "b");
  EXPECT_EQ(o.find("b")->integer(), 1) << "find() returns the first";
  EXPECT_TRUE(o.find("a")->as_array().empty());
  EXPECT_TRUE(o.find("c")->as_object().empty());
  EXPECT_EQ(o.find("d"), nullptr);
  EXPECT_EQ(a.find("b"), nullptr) << "not an object";
  EXPECT_EQ(Json::parse("\"b\"").find("b"), nullptr);
  EXPECT_EQ(o.dump(), R"({"b":1,"a":[],"c":{},"b":2})");

  // Keys take escapes like any string.
  const Json k = Json::parse(R"({"a\nb":1,"\u00e9":2,"":3})");
  EXPECT_EQ(k.find("a\nb")->integer(), 1);
  EXPECT_EQ(k.find("\xC3\xA9")->integer(), 2);
  EXPECT_EQ(k.find("")->integer(), 3);
}

TEST(JsonParse, Whitespace) {
  const Json j =
      Json::parse(" \t\r\n{ \"a\" :\n[ 1 ,\t2 , { } , [ ] ] ,\r\n\"b\"\t:\"x\" } \n\t\r ");
  EXPECT_EQ(j.dump(), R"({"a":[1,2,{},[]],"b":"x"})");
  EXPECT_EQ(Json::parse("[ ]").dump(), "[]");
  EXPECT_EQ(Json::parse("{\n}").dump(), "{}");
  EXPECT_EQ(Json::parse("  42  ").integer(), 42);
  EXPECT_EQ(Json::parse("\n\"s\"\n").string(), "s");
  EXPECT_EQ(Json::parse("\" a \"").string(), " a ") << "whitespace inside strings is kept";
}

TEST(JsonParse, Nesting) {
  // 256 levels are fine, 257 are not; the error comes before anything deeper is looked at.
  for (const int depth : {1, 255, 256}) {
    const std::string arrays = std::string(size_t(depth), '[') + std::string(size_t(depth), ']');
    EXPECT_NO_THROW(Json::parse(arrays)) << depth;
    std::string objects;
    for (int i = 0; i < depth; ++i) objects += "{\"a\":";
    objects += '0';
    objects.append(size_t(depth), '}');
    const Json o = Json::parse(objects);
    const Json* p = &o;
    for (int i = 0; i < depth; ++i) p = p->find("a");
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(p->integer(), 0);
  }
  kv::Error e = parse_error(std::string(257, '[') + std::string(257, ']'));
  EXPECT_EQ(e.code(), Exit::data);
  EXPECT_STREQ(e.what(), "JSON: nesting deeper than 256 at offset 256");
  std::string objects;
  for (int i = 0; i < 257; ++i) objects += "{\"a\":";
  e = parse_error(objects + "0" + std::string(257, '}'));
  EXPECT_STREQ(e.what(), "JSON: nesting deeper than 256 at offset 1280");
  // Far deeper input must not exhaust the stack.
  e = parse_error(std::string(1'000'000, '['));
  EXPECT_STREQ(e.what(), "JSON: nesting deeper than 256 at offset 256");
  e = parse_error(std::string(1'000'000, '{'));
  EXPECT_STREQ(e.what(), "JSON: expected a string key but found '{' at offset 1");
  std::string mixed;
  for (int i = 0; i < 200; ++i) mixed += "[{\"k\":";
  e = parse_error(mixed);
  EXPECT_STREQ(e.what(), "JSON: nesting deeper than 256 at offset 768");
}

TEST(JsonParse, Malformed) {
  struct Case {
    std::string text;
    std::string message;  // after "JSON: "
  };
  const std::vector<Case> cases = {
      {"", "unexpected end of input at offset 0"},
      {"   ", "unexpected end of input at offset 3"},
      {"nul", "invalid literal (expected 'null') at offset 0"},
      {"tru", "invalid literal (expected 'true') at offset 0"},
      {"falsy", "invalid literal (expected 'false') at offset 0"},
      {"True", "unexpected 'T' at offset 0"},
      {"[1,2", "expected ',' or ']' but found end of input at offset 4"},
      {"[1,]", "unexpected ']' at offset 3"},
      {"[,1]", "unexpected ',' at offset 1"},
      {"[1 2]", "expected ',' or ']' but found '2' at offset 3"},
      {"{", "expected a string key but found end of input at offset 1"},
      {"{\"a\":1,}", "expected a string key but found '}' at offset 7"},
      {"{\"a\" 1}", "expected ':' but found '1' at offset 5"},
      {"{\"a\"", "expected ':' but found end of input at offset 4"},
      {"{\"a\":", "unexpected end of input at offset 5"},
      {"{\"a\":1", "expected ',' or '}' but found end of input at offset 6"},
      {"{1:2}", "expected a string key but found '1' at offset 1"},
      {"{'a':2}", "expected a string key but found ''' at offset 1"},
      {"[\"a\":1]", "expected ',' or ']' but found ':' at offset 4"},
      {"01", "leading zero in number at offset 0"},
      {"-01", "leading zero in number at offset 0"},
      {"[00]", "leading zero in number at offset 1"},
      {"+1", "unexpected '+' at offset 0"},
      {"1.", "invalid number: no digits after '.' at offset 2"},
      {"1.e5", "invalid number: no digits after '.' at offset 2"},
      {".5", "unexpected '.' at offset 0"},
      {"1e", "invalid number: no digits in exponent at offset 2"},
      {"1e+", "invalid number: no digits in exponent at offset 3"},
      {"1.5e", "invalid number: no digits in exponent at offset 4"},
      {"-", "invalid number: expected a digit, found end of input at offset 1"},
      {"[-]", "invalid number: expected a digit, found ']' at offset 2"},
      {"[0x10]", "expected ',' or ']' but found 'x' at offset 2"},
      {"NaN", "unexpected 'N' at offset 0"},
      {"Infinity", "unexpected 'I' at offset 0"},
      {"-Infinity", "invalid number: expected a digit, found 'I' at offset 1"},
      {"1e400", "number out of range at offset 0"},
      {"[-1e999]", "number out of range at offset 1"},
      {std::string(400, '9'), "number out of range at offset 0"},
      {"\"abc", "unterminated string at offset 0"},
      {"[\"abc", "unterminated string at offset 1"},
      {"\"\\", "unterminated string at offset 0"},
      {"\"a\\x\"", "invalid escape \\'x' at offset 2"},
      {"\"\\U0041\"", "invalid escape \\'U' at offset 1"},
      {"\"\\'\"", "invalid escape \\''' at offset 1"},
      {"\"\\u12\"", "invalid \\u escape at offset 1"},
      {"\"\\u12G4\"", "invalid \\u escape at offset 1"},
      {"\"\\u", "invalid \\u escape at offset 1"},
      {"\"\\uD800\"", "lone high surrogate at offset 1"},
      {"\"\\uDBFF", "lone high surrogate at offset 1"},
      {"\"\\uDC00\"", "lone low surrogate at offset 1"},
      {"\"\\uDFFF\\uD800\"", "lone low surrogate at offset 1"},
      {"\"\\uD800\\u0041\"", "lone high surrogate at offset 1"},
      {"\"ab\\uD83D\\uD83D\"", "lone high surrogate at offset 3"},
      {"\"\\uD800\\n\"", "lone high surrogate at offset 1"},
      {"\"\\uD800\\uDC0\"", "invalid \\u escape at offset 7"},
      {"\"a\nb\"", "unescaped control character byte 0x0a in string at offset 2"},
      {"\"\t\"", "unescaped control character byte 0x09 in string at offset 1"},
      {std::string("\"\0\"", 3), "unescaped control character byte 0x00 in string at offset 1"},
      {"\"\x1f\"", "unescaped control character byte 0x1f in string at offset 1"},
      {"[1] [2]", "trailing '[' after the value at offset 4"},
      {"1 2", "trailing '2' after the value at offset 2"},
      {"[1,2]]", "trailing ']' after the value at offset 5"},
      {"{\"a\":1}}", "trailing '}' after the value at offset 7"},
      {"true false", "trailing 'f' after the value at offset 5"},
      {"{}\n{}", "trailing '{' after the value at offset 3"},
      {std::string("null\0", 5), "trailing byte 0x00 after the value at offset 4"},
      {"'a'", "unexpected ''' at offset 0"},
      {"\xEF\xBB\xBF{}", "unexpected byte 0xef at offset 0"},
      {"\v1", "unexpected byte 0x0b at offset 0"},
      {"\f1", "unexpected byte 0x0c at offset 0"},
      {"\xC2\xA0"
       "1",
       "unexpected byte 0xc2 at offset 0"},
      {"/* c */ 1", "unexpected '/' at offset 0"},
  };
  ASSERT_GE(cases.size(), 15u);
  for (const Case& c : cases) {
    const kv::Error e = parse_error(c.text);
    EXPECT_EQ(e.code(), Exit::data) << show(c.text);
    EXPECT_EQ(std::string(e.what()).rfind("JSON: ", 0), 0u) << show(c.text) << ": " << e.what();
    EXPECT_EQ(std::string(e.what()), "JSON: " + c.message) << show(c.text);
  }
}

// ---- accessors and equality ------------------------------------------------------------------

TEST(JsonAccess, WrongTypeThrows) {
  const Json null, b(true), i(int64_t(3)), d(2.5), s("s"), a = Json::array(), o = Json::object();
  expect_data_error([&] { (void)null.number(); }, "number() of null");
  expect_data_error([&] { (void)s.number(); }, "number() of a string");
  expect_data_error([&] { (void)b.integer(); }, "integer() of a bool");
  expect_data_error([&] { (void)d.integer(); }, "integer() of 2.5");
  expect_data_error([&] { (void)Json(std::nan("")).integer(); }, "integer() of NaN");
  expect_data_error([&] { (void)Json(1e300).integer(); }, "integer() of 1e300");
  expect_data_error([&] { (void)i.boolean(); }, "boolean() of 3");
  expect_data_error([&] { (void)null.boolean(); }, "boolean() of null");
  expect_data_error([&] { (void)i.string(); }, "string() of 3");
  expect_data_error([&] { (void)o.as_array(); }, "as_array() of an object");
  expect_data_error([&] { (void)a.as_object(); }, "as_object() of an array");
  expect_data_error([&] { (void)s.as_array(); }, "as_array() of a string");
  try {
    (void)s.number();
  } catch (const kv::Error& e) {
    EXPECT_STREQ(e.what(), "JSON: expected a number");
  }
  EXPECT_EQ(i.number(), 3.0);
  EXPECT_EQ(d.number(), 2.5);
  EXPECT_EQ(Json(-4.0).integer(), -4);
  EXPECT_EQ(s.string(), "s");
  EXPECT_TRUE(a.as_array().empty());
  EXPECT_TRUE(o.as_object().empty());
  EXPECT_TRUE(i.is_number() && d.is_number());
  EXPECT_TRUE(a.is_array() && !a.is_object() && o.is_object() && !o.is_array());
}

TEST(JsonEquality, Structural) {
  EXPECT_EQ(Json::parse("[1,{\"a\":[true,null,\"x\"]}]"),
            Json(Json::Array{1, Json::Object{{"a", Json::Array{true, nullptr, "x"}}}}));
  EXPECT_NE(Json::parse("[1,2]"), Json::parse("[1]"));
  EXPECT_NE(Json::parse("[1,2]"), Json::parse("[2,1]"));
  EXPECT_NE(Json::parse("{\"a\":1,\"b\":2}"), Json::parse("{\"b\":2,\"a\":1}")) << "ordered";
  EXPECT_NE(Json::parse("{\"a\":1}"), Json::parse("{\"b\":1}"));
  EXPECT_NE(Json::parse("{\"a\":1}"), Json::parse("{\"a\":2}"));
  EXPECT_NE(Json::parse("\"a\""), Json::parse("\"b\""));
  EXPECT_NE(Json(), Json(false));
  EXPECT_NE(Json(0), Json(false));
  EXPECT_NE(Json(0), Json());
  EXPECT_NE(Json("1"), Json(1));
  EXPECT_NE(Json::array(), Json::object());
  // Numbers compare by value whatever their representation, exactly.
  EXPECT_EQ(Json(1), Json(1.0));
  EXPECT_EQ(Json(1.0), Json(1));
  EXPECT_EQ(Json::parse("1"), Json::parse("1.0"));
  EXPECT_EQ(Json::parse("100"), Json::parse("1e2"));
  EXPECT_EQ(Json(0), Json(-0.0));
  EXPECT_NE(Json(1), Json(1.5));
  EXPECT_NE(Json(int64_t(1) << 53 | 1), Json(double(int64_t(1) << 53)));
  EXPECT_EQ(Json(int64_t(1) << 53), Json(double(int64_t(1) << 53)));
  EXPECT_NE(Json(std::numeric_limits<int64_t>::max()), Json(0x1p63));
  EXPECT_EQ(Json(std::numeric_limits<int64_t>::min()), Json(-0x1p63));
  EXPECT_NE(Json(std::nan("")), Json(std::nan("")));
}

// ---- round trips -----------------------------------------------------------------------------

// Every ASCII byte 0..127 in one string: control characters, quotes, backslashes.
std::string all_bytes() {
  std::string s;
  for (int c = 0; c < 128; ++c) s += char(c);
  return s;
}

TEST(JsonRoundTrip, NestedValues) {
  Json inner = Json::object();
  inner.set("quote\"back\\slash/", "\"\\/\b\f\n\r\t")
      .set("controls", std::string("\x00\x01\x1f\x7f", 4))
      .set("utf8", "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80")
      .set("bytes", all_bytes())
      .set("empty", "")
      .set("list", Json::Array{Json::array(), Json::object(), Json::Array{Json(Json::Array{})}});
  Json v = Json::object();
  v.set("null", nullptr)
      .set("t", true)
      .set("f", false)
      .set("int", 64000)
      .set("neg", -17)
      .set("max", std::numeric_limits<int64_t>::max())
      .set("min", std::numeric_limits<int64_t>::min())
      .set("doubles", Json::array_of(std::vector<double>{0.1085, -2.5e-7, 1e300, 1.5, 0.0,
                                                         123456789.0, 3.14159274, -1e-300}))
      .set("inner", inner)
      .set(all_bytes(), Json::Array{inner, inner});
  const std::string text = v.dump();
  EXPECT_EQ(text.find('\n'), std::string::npos) << "one line";
  const Json back = Json::parse(text);
  EXPECT_EQ(back, v);
  EXPECT_EQ(back.dump(), text);
  EXPECT_EQ(back.find(all_bytes())->as_array().at(1).find("bytes")->string(), all_bytes());
  EXPECT_EQ(back.find("inner")->find("controls")->string(), std::string("\x00\x01\x1f\x7f", 4));

  // Deep nesting survives too.
  Json deep = Json("leaf");
  for (int i = 0; i < 255; ++i) deep = Json(Json::Array{deep, i});
  Json wrapped = Json::object();
  wrapped.set("d", deep);
  EXPECT_EQ(Json::parse(wrapped.dump()), wrapped);
}

// Random values whose doubles have at most 9 significant digits (what dump() keeps) round-trip
// exactly; every other value is a fixed point after one dump() -> parse().
Json random_value(std::mt19937_64& rng, int depth) {
  const int kind = int(rng() % (depth > 6 ? 5 : 7));
  switch (kind) {
    case 0:
      return Json();
    case 1:
      return Json(bool(rng() & 1));
    case 2:
      return Json(int64_t(rng()) >> (rng() % 64));
    case 3: {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.*e", int(rng() % 9),
                    double(int64_t(rng() % 2000001) - 1000000) *
                        std::pow(10.0, double(int(rng() % 600) - 300) / 7));
      return Json(Json::parse(buf).number());
    }
    case 4: {
      std::string s(rng() % 12, '\0');
      for (char& c : s) c = char(rng() % 4 == 0 ? rng() % 128 : 'a' + rng() % 26);
      return Json(s);
    }
    case 5: {
      Json::Array a(rng() % 5);
      for (Json& e : a) e = random_value(rng, depth + 1);
      return Json(std::move(a));
    }
    default: {
      Json o = Json::object();
      for (size_t n = rng() % 5; n > 0; --n)
        o.set(std::string(1, char(rng() % 128)), random_value(rng, depth + 1));
      return o;
    }
  }
}

TEST(JsonRoundTrip, BytesThatAreNotUtf8BecomeReplacementCharacters) {
  // A JSON text must be UTF-8 (RFC 8259): a prompt or command line in another encoding is
  // written with U+FFFD where its stray bytes were, and read so too; well-formed UTF-8 passes.
  const std::string bad("a\xff b\xc3\xa9 \xc0\xaf \xed\xa0\x80 \xe2\x82");
  const std::string fixed =
      "a\xef\xbf\xbd b\xc3\xa9 \xef\xbf\xbd\xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd "
      "\xef\xbf\xbd\xef\xbf\xbd";
  EXPECT_EQ(Json(bad).dump(), "\"" + fixed + "\"");
  EXPECT_EQ(Json::parse("\"" + bad + "\"").string(), fixed);
  EXPECT_EQ(Json::parse(Json(bad).dump()).dump(), Json(bad).dump()) << "a fixed point";
}

TEST(JsonRoundTrip, RandomValues) {
  std::mt19937_64 rng(1);
  size_t bytes = 0;
  for (int i = 0; i < 2000; ++i) {
    const Json v = random_value(rng, 0);
    const std::string text = v.dump();
    bytes += text.size();
    const Json back = Json::parse(text);
    ASSERT_EQ(back, v) << show(text);
    ASSERT_EQ(back.dump(), text);
  }
  EXPECT_GT(bytes, 20000u) << "the generator makes non-trivial values";
}

TEST(JsonRoundTrip, LossyDoubles) {
  // dump() prints doubles with "%.9g": more digits are lost, but the text is a fixed point.
  const Json third(1.0 / 3);
  const Json back = Json::parse(third.dump());
  EXPECT_EQ(third.dump(), "0.333333333");
  EXPECT_NE(back, third);
  EXPECT_EQ(back.number(), 0.333333333);
  EXPECT_EQ(back.dump(), third.dump());
  // NaN and infinities have no JSON form: dump() writes null.
  EXPECT_TRUE(Json::parse(Json(std::nan("")).dump()).is_null());
  EXPECT_TRUE(Json::parse(Json(HUGE_VAL).dump()).is_null());
  EXPECT_TRUE(Json::parse(Json(-HUGE_VAL).dump()).is_null());
  // An integral double reads back as int64_t, which compares equal.
  EXPECT_EQ(Json(2.0).dump(), "2");
  EXPECT_EQ(Json::parse(Json(2.0).dump()), Json(2.0));
  // -0.0 prints as "-0", which reads back as -0.0.
  EXPECT_EQ(Json(-0.0).dump(), "-0");
  EXPECT_TRUE(std::signbit(Json::parse(Json(-0.0).dump()).number()));
  EXPECT_EQ(Json::parse("-0e2137").dump(), "-0") << "fuzz: dump() -> parse() -> dump() fixed point";
  EXPECT_EQ(Json::parse(Json::parse("-0e2137").dump()).dump(), "-0");
}

// ---- a kv-eval JSON Lines record ---------------------------------------------------------------

TEST(JsonLines, EvalRecord) {
  const std::string line = R"({"label":"snap25","kv_bytes":64000,"rel_error":0.1085,)"
                           R"("provenance":["kv-evict -s snapkv"],"layers":[{"layer":0}]})";
  const Json r = Json::parse(line);
  ASSERT_TRUE(r.is_object());
  ASSERT_NE(r.find("label"), nullptr);
  EXPECT_EQ(r.find("label")->string(), "snap25");
  EXPECT_EQ(r.find("kv_bytes")->number(), 64000.0);
  EXPECT_EQ(r.find("kv_bytes")->integer(), 64000);
  EXPECT_EQ(r.find("rel_error")->number(), 0.1085);
  const Json::Array& provenance = r.find("provenance")->as_array();
  ASSERT_EQ(provenance.size(), 1u);
  EXPECT_EQ(provenance[0].string(), "kv-evict -s snapkv");
  const Json::Array& layers = r.find("layers")->as_array();
  ASSERT_EQ(layers.size(), 1u);
  ASSERT_NE(layers[0].find("layer"), nullptr);
  EXPECT_EQ(layers[0].find("layer")->integer(), 0);
  EXPECT_EQ(r.find("missing"), nullptr);
  expect_data_error([&] { (void)r.find("label")->number(); }, "label is not a number");
  EXPECT_EQ(r.dump(), line) << "kv-eval's own output reads back byte for byte";

  // The same record built as kv-eval builds it, written, and read back line by line.
  Json built = Json::object();
  built.set("label", "snap25")
      .set("kv_bytes", uint64_t(64000))
      .set("rel_error", 0.1085)
      .set("provenance", Json::array().push("kv-evict -s snapkv"));
  Json layer = Json::object();
  layer.set("layer", 0);
  built.set("layers", Json::array().push(layer));
  EXPECT_EQ(built.dump(), line);
  const std::string file = built.dump() + "\n" + line + "\n";
  size_t lines = 0;
  for (size_t begin = 0, end; (end = file.find('\n', begin)) != std::string::npos;
       begin = end + 1, ++lines) {
    EXPECT_EQ(Json::parse(std::string_view(file).substr(begin, end - begin)), built);
  }
  EXPECT_EQ(lines, 2u);
}

// ---- size: linear time and no per-element surprises --------------------------------------------

TEST(JsonParse, LargeInputs) {
  std::string text = "[";
  for (int i = 0; i < 200000; ++i) {
    if (i) text += ',';
    text += std::to_string(i);
  }
  text += "]";
  const Json a = Json::parse(text);
  ASSERT_EQ(a.as_array().size(), 200000u);
  EXPECT_EQ(a.as_array().back().integer(), 199999);
  const std::string long_string = "\"" + std::string(4'000'000, 'x') + "\\n\"";
  EXPECT_EQ(Json::parse(long_string).string().size(), 4'000'001u);
  std::string obj = "{";
  for (int i = 0; i < 100000; ++i) {
    if (i) obj += ',';
    obj += "\"k" + std::to_string(i) + "\":1";
  }
  obj += "}";
  const Json o = Json::parse(obj);
  EXPECT_EQ(o.as_object().size(), 100000u);
  EXPECT_EQ(o.find("k99999")->integer(), 1);
}

}  // namespace
