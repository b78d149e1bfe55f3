// Tokenizer: merge order, ties and byte fallback on hand-made vocabularies; the golden ids and
// round trips on the stories260K vocabulary (tok512.bin and the GGUF's); agreement with a direct
// port of llama2.c's O(n^2) encoder; malformed tokenizer.bin files; encode speed.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>

#include "helpers.h"
#include "kv/error.h"
#include "kv/gguf.h"
#include "kv/tokenizer.h"

namespace fs = std::filesystem;
using kv::Exit;
using kv::Tokenizer;
using Ids = std::vector<int32_t>;

namespace {

// ---------------------------------------------------------------------------------------------
// helpers

// Runs `f`, which must throw kv::Error with `code` and a message containing every one of `parts`.
void expect_error(const std::function<void()>& f, Exit code,
                  const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown (expected " << int(code) << ")";
  } catch (const kv::Error& e) {
    EXPECT_EQ(int(e.code()), int(code)) << e.what();
    for (const std::string& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos)
          << "message '" << e.what() << "' lacks '" << p << "'";
  }
}

// <unk> <s> </s>, optionally the 256 byte tokens <0x00>..<0xFF> (ids 3..258), then `extra`.
Tokenizer tiny(const std::vector<std::pair<std::string, float>>& extra, bool bytes) {
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  std::vector<float> scores = {0, 0, 0};
  if (bytes) {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      pieces.push_back(name);
      scores.push_back(0);
    }
  }
  for (const auto& [p, s] : extra) {
    pieces.push_back(p);
    scores.push_back(s);
  }
  return Tokenizer(pieces, scores, 1, 2);
}

std::string env_dir(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : std::string();
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Paragraphs of a text separated by blank lines (without their trailing newline).
std::vector<std::string> paragraphs(const std::string& text) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find("\n\n", pos);
    if (end == std::string::npos) end = text.size();
    std::string p = text.substr(pos, end - pos);
    while (!p.empty() && p.back() == '\n') p.pop_back();
    while (!p.empty() && p.front() == '\n') p.erase(0, 1);
    if (!p.empty()) out.push_back(p);
    pos = end + 2;
  }
  return out;
}

const char* kReadmeParagraph =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily";

std::vector<std::string> tricky_strings() {
  return {
      "",
      "a",
      " ",
      "  leading spaces",
      "multiple   spaces  between   words",
      "trailing spaces   ",
      "line one\nline two\n\nline four\n",
      "\n\nstarts with newlines",
      "tabs\tand\r\ncarriage returns",
      "caf\xC3\xA9 \xE2\x98\x95",                 // "café ☕"
      "\xF0\x9F\x98\x80 emoji \xF0\x9F\x8C\x8D",  // 4-byte code points
      "\xE2\x96\x81 literal U+2581",              // SentencePiece's space, as text
      "<s> </s> <unk> <0x41> look like special pieces",
      std::string("nul\0byte", 8),
      "\xFF\xFE invalid \x80 utf-8 \xC3 \xE2\x98",  // stray and truncated sequences
      "a\x80\x80\x80\x80\x80 long continuation run",
      "\xC2\xA0non-breaking\xC2\xA0space \xE2\x80\x9Cquoted\xE2\x80\x9D",
      "Once upon a time",
  };
}

// A direct port of llama2.c's encode(): split, byte fallback (+3 as llama2.c hard-codes), then the
// O(n^2) scan for the best pair, leftmost on ties. The reference for the priority-queue version.
struct Llama2cReference {
  std::vector<std::string> vocab;
  std::vector<float> scores;
  std::map<std::string, int> sorted;  // str_lookup

  explicit Llama2cReference(const std::string& path, int vocab_size) {
    const std::string d = slurp(path);
    size_t off = 4;
    for (int i = 0; i < vocab_size; ++i) {
      float s;
      int32_t len;
      std::memcpy(&s, d.data() + off, 4);
      std::memcpy(&len, d.data() + off + 4, 4);
      off += 8;
      vocab.push_back(d.substr(off, size_t(len)));
      scores.push_back(s);
      off += size_t(len);
      sorted.emplace(vocab.back(), i);
    }
  }
  int lookup(const std::string& s) const {
    auto it = sorted.find(s);
    return it == sorted.end() ? -1 : it->second;
  }
  Ids encode(const std::string& text, bool bos) const {
    Ids t;
    if (bos) t.push_back(1);
    if (!text.empty()) t.push_back(lookup(" "));
    std::string buf;
    for (size_t i = 0; i < text.size(); ++i) {
      const unsigned char c = text[i];
      if ((c & 0xC0) != 0x80) buf.clear();
      buf += char(c);
      if (i + 1 < text.size() && (text[i + 1] & 0xC0) == 0x80 && buf.size() < 4) continue;
      const int id = lookup(buf);
      if (id != -1) {
        t.push_back(id);
      } else {
        for (unsigned char b : buf) t.push_back(int(b) + 3);
      }
      buf.clear();
    }
    for (;;) {
      float best_score = -1e10f;
      int best_id = -1, best_idx = -1;
      for (size_t i = 0; i + 1 < t.size(); ++i) {
        const int id = lookup(vocab[size_t(t[i])] + vocab[size_t(t[i + 1])]);
        if (id != -1 && scores[size_t(id)] > best_score) {
          best_score = scores[size_t(id)];
          best_id = id;
          best_idx = int(i);
        }
      }
      if (best_idx == -1) break;
      t[size_t(best_idx)] = best_id;
      t.erase(t.begin() + best_idx + 1);
    }
    return t;
  }
};

#define NEED_MODELS()                                             \
  const std::string models = env_dir("KV_MODELS_DIR");            \
  if (models.empty()) GTEST_SKIP() << "KV_MODELS_DIR is not set"; \
  const std::string tok_path = models + "/tok512.bin";

#define NEED_DATA()                                               \
  const std::string data_dir = env_dir("KV_DATA_DIR");            \
  if (data_dir.empty()) GTEST_SKIP() << "KV_DATA_DIR is not set"; \
  const std::string val_path = data_dir + "/tinystories_val.txt";

// ---------------------------------------------------------------------------------------------
// hand-computed cases

// " "=3 a=4 b=5 c=6 ab=7 bc=8 " a"=9 " ab"=10. "abc" starts as [" ", a, b, c].
std::vector<std::pair<std::string, float>> abc_vocab(float ab, float bc) {
  return {{" ", -10}, {"a", -10}, {"b", -10}, {"c", -10},
          {"ab", ab}, {"bc", bc}, {" a", -3}, {" ab", -4}};
}

TEST(TokenizerTiny, MergesHighestScoreFirst) {
  // ab (-1) beats bc (-2) and " a" (-3): [" ", ab, c], then " ab" (-4): [" ab", c].
  Tokenizer t = tiny(abc_vocab(-1, -2), false);
  EXPECT_EQ(t.encode("abc", false), (Ids{10, 6}));
  EXPECT_EQ(t.encode("abc", true), (Ids{1, 10, 6}));
  // bc (-1) beats ab (-2): [" ", a, bc]; then " a" (-3): [" a", bc]; " abc" is no piece.
  Tokenizer u = tiny(abc_vocab(-2, -1), false);
  EXPECT_EQ(u.encode("abc", false), (Ids{9, 8}));
}

TEST(TokenizerTiny, TiesGoToTheLeftmostPair) {
  // ab and bc score the same: the leftmost (ab) merges, giving [" ab", c], not [" a", bc].
  Tokenizer t = tiny(abc_vocab(-1, -1), false);
  EXPECT_EQ(t.encode("abc", false), (Ids{10, 6}));
  // "aaa": the pairs (a,a) at 1 and 2 tie; the left one merges: [" ", aa, a].
  Tokenizer u = tiny({{" ", 0}, {"a", 0}, {"aa", -1}}, false);
  EXPECT_EQ(u.encode("aaa", false), (Ids{3, 5, 4}));
  EXPECT_EQ(u.encode("aaaa", false), (Ids{3, 5, 5}));
  EXPECT_EQ(u.encode("aaaaa", false), (Ids{3, 5, 5, 4}));
}

TEST(TokenizerTiny, MergesAreGreedyNotLongestMatch) {
  // "ab" (-1) merges before "bcd" can form from "bc" (-2) + "d", so "abcd" ends as
  // [" ", ab, c, d] -> " ab" (-4) -> [" ab", c, d]; "cd" is no piece, and "bcd" never forms.
  Tokenizer t = tiny({{" ", -10},
                      {"a", -10},
                      {"b", -10},
                      {"c", -10},
                      {"d", -10},
                      {"ab", -1},
                      {"bc", -2},
                      {"bcd", 5},
                      {" ab", -4}},
                     false);
  EXPECT_EQ(t.encode("abcd", false), (Ids{11, 6, 7}));
  // Without "ab", bc merges, then bcd (score 5), then " a" is no piece: [" ", a, bcd].
  Tokenizer u = tiny(
      {{" ", -10}, {"a", -10}, {"b", -10}, {"c", -10}, {"d", -10}, {"bc", -2}, {"bcd", 5}}, false);
  EXPECT_EQ(u.encode("abcd", false), (Ids{3, 4, 9}));
}

TEST(TokenizerTiny, PiecesAtOrBelowMinusTenBillionNeverMerge) {
  // llama2.c starts its search at -1e10 with a strict '>'.
  Tokenizer t = tiny({{" ", 0}, {"a", 0}, {"aa", -1e10f}, {" a", -2e10f}}, false);
  EXPECT_EQ(t.encode("aa", false), (Ids{3, 4, 4}));
  Tokenizer u = tiny({{" ", 0}, {"a", 0}, {"aa", NAN}}, false);
  EXPECT_EQ(u.encode("aa", false), (Ids{3, 4, 4}));
}

TEST(TokenizerTiny, EmptyTextHasNoDummyPrefix) {
  Tokenizer t = tiny(abc_vocab(-1, -2), false);
  EXPECT_EQ(t.encode("", true), (Ids{1}));
  EXPECT_EQ(t.encode("", false), (Ids{}));
  EXPECT_EQ(t.decode(t.encode("", true)), "");
  // A lone space is the dummy prefix plus the text's space: two " " symbols, no "  " piece.
  EXPECT_EQ(t.encode(" ", false), (Ids{3, 3}));
}

TEST(TokenizerTiny, ByteFallback) {
  // Bytes at 3..258; " "=259 c=260 a=261 f=262 ca=263 " ca"=264. "é" is no piece: C3 A9.
  Tokenizer t = tiny({{" ", 0}, {"c", 0}, {"a", 0}, {"f", 0}, {"ca", -1}, {" ca", -2}}, true);
  EXPECT_EQ(t.encode("caf\xC3\xA9", true), (Ids{1, 264, 262, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(t.decode(t.encode("caf\xC3\xA9", true)), "caf\xC3\xA9");
  // "☕" = E2 98 95, a 3-byte code point: three byte tokens.
  EXPECT_EQ(t.encode("\xE2\x98\x95", false), (Ids{259, 3 + 0xE2, 3 + 0x98, 3 + 0x95}));
  // A stray continuation byte joins the code point before it (llama2.c groups up to 4 bytes),
  // so "a\x80" is no piece and falls back to <0x61><0x80>.
  EXPECT_EQ(t.encode("a\x80", false), (Ids{259, 3 + 0x61, 3 + 0x80}));
  // The dummy prefix is a symbol of its own: it never groups with a leading continuation byte.
  EXPECT_EQ(t.encode("\x80", false), (Ids{259, 3 + 0x80}));
  // A code point that is a piece is never split into bytes.
  EXPECT_EQ(t.encode("f", false), (Ids{259, 262}));
}

TEST(TokenizerTiny, ByteTokensNeedNotStartAtThree) {
  // Bytes after the pieces: <0x00> is id 7; the byte base is found by lookup, not assumed.
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>", " ", "x", "y", "xy"};
  std::vector<float> scores = {0, 0, 0, 0, 0, 0, -1};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    pieces.push_back(name);
    scores.push_back(0);
  }
  Tokenizer t(pieces, scores, 1, 2);
  EXPECT_EQ(t.encode("xyz", false), (Ids{3, 6, 7 + 'z'}));
  EXPECT_EQ(t.decode(t.encode("xyz", true)), "xyz");
}

TEST(TokenizerTiny, NoByteTokensMeansUnknown) {
  Tokenizer t = tiny(abc_vocab(-1, -2), false);
  EXPECT_EQ(t.encode("ax", false), (Ids{9, 0}));
}

TEST(TokenizerTiny, Decode) {
  Tokenizer t = tiny({{" ", 0}, {"c", 0}, {" ca", -2}, {"\n", 0}}, true);
  const int32_t space = 259, c = 260, ca = 261;
  EXPECT_EQ(t.decode(1, ca), "ca");   // after BOS the dummy-prefix space goes
  EXPECT_EQ(t.decode(c, ca), " ca");  // elsewhere it stays
  EXPECT_EQ(t.decode(-1, ca), " ca");
  EXPECT_EQ(t.decode(1, space), "");
  EXPECT_EQ(t.decode(1, c), "c");
  EXPECT_EQ(t.decode(c, 3 + 'A'), "A");  // <0x41>
  EXPECT_EQ(t.decode(c, 3 + 0x0A), "\n");
  EXPECT_EQ(t.decode(c, 3), std::string(1, '\0'));
  EXPECT_EQ(t.decode(c, 3 + 0xFF), "\xFF");
  EXPECT_EQ(t.decode(1, 3 + ' '), "");  // a <0x20> after BOS is the dummy prefix too
  EXPECT_EQ(t.decode(c, 1), "");        // control tokens print nothing
  EXPECT_EQ(t.decode(c, 2), "");
  EXPECT_EQ(t.decode(c, 0), "<unk>");
  EXPECT_EQ(t.decode(Ids{1, ca, c, 3 + 0xC3, 3 + 0xA9, 2}), "cac\xC3\xA9");
  expect_error([&] { t.decode(c, 265); }, Exit::data, {"token id 265", "outside"});
  expect_error([&] { t.decode(c, -1); }, Exit::data, {"token id -1"});
  EXPECT_EQ(t.piece(ca), " ca");
  EXPECT_EQ(t.vocab_size(), 263);
  EXPECT_EQ(t.bos(), 1);
  EXPECT_EQ(t.eos(), 2);
}

TEST(TokenizerTiny, RoundTripsRandomBytes) {
  // Any byte string survives encode -> decode when the vocabulary has byte tokens.
  Tokenizer t = tiny({{" ", 0},
                      {"a", 0},
                      {"b", 0},
                      {"ab", -1},
                      {" a", -2},
                      {"ba", -3},
                      {"\xC3\xA9", 0},
                      {" \xC3\xA9", -1}},
                     true);
  std::mt19937 rng(7);
  const std::string alphabet = std::string("ab \n\xC3\xA9\xE2\x98\x95\x80\xFF", 12);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string s;
    const int n = int(rng() % 24);
    for (int i = 0; i < n; ++i) s += alphabet[rng() % alphabet.size()];
    ASSERT_EQ(t.decode(t.encode(s, true)), s) << "trial " << trial;
  }
}

TEST(TokenizerTiny, ConstructorValidates) {
  expect_error(
      [] {
        Tokenizer({"<unk>", "<s>", "</s>"}, {0, 0}, 1, 2);
      },
      Exit::data, {"3 pieces but 2 scores"});
  expect_error(
      [] {
        Tokenizer({"<unk>", "<s>"}, {0, 0}, 1, 2);
      },
      Exit::data, {"EOS token id 2", "outside"});
  expect_error(
      [] {
        Tokenizer({"<unk>", "<s>", "</s>"}, {0, 0, 0}, -1, 2);
      },
      Exit::data, {"BOS token id -1"});
  expect_error([] { Tokenizer({}, {}, 0, 0); }, Exit::data, {"empty"});
}

// ---------------------------------------------------------------------------------------------
// tokenizer.bin parsing and malformed files

// A tokenizer.bin image: int32 max_token_length, then per token f32 score, int32 length, bytes.
std::string bin_image(const std::vector<std::pair<std::string, float>>& tokens, int32_t max_len) {
  std::string d;
  auto put = [&](const void* p, size_t n) { d.append(static_cast<const char*>(p), n); };
  put(&max_len, 4);
  for (const auto& [p, s] : tokens) {
    const int32_t len = int32_t(p.size());
    put(&s, 4);
    put(&len, 4);
    d += p;
  }
  return d;
}

std::string write_temp(const std::string& name, const std::string& bytes) {
  static const std::string dir = kvtest::temp_dir();
  const std::string path = dir + "/" + name;
  std::ofstream(path, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
  return path;
}

const std::vector<std::pair<std::string, float>> kSmallBin = {
    {"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}, {" ", -1},
    {"h", -2},    {"i", -3},      {"hi", -4},      {" hi", -5}};

TEST(TokenizerBin, ReadsPiecesAndScores) {
  const std::string path = write_temp("small.bin", bin_image(kSmallBin, 3));
  Tokenizer t = Tokenizer::from_llama2c(path, 8);
  EXPECT_EQ(t.vocab_size(), 8);
  EXPECT_EQ(t.piece(7), " hi");
  EXPECT_EQ(t.piece(1), "\n<s>\n");
  EXPECT_EQ(t.encode("hi", true), (Ids{1, 7}));
  EXPECT_EQ(t.decode(t.encode("hi hi", true)), "hi hi");
  // The file must hold the model's vocabulary exactly (llama2.c would read the first tokens of a
  // larger one, the pieces of another vocabulary).
  expect_error([&] { Tokenizer::from_llama2c(path, 6); }, Exit::data,
               {path, "bytes follow token 5", "more tokens than the model's 6"});
  const std::string trailing = write_temp("trailing.bin", bin_image(kSmallBin, 3) + "xy");
  expect_error([&] { Tokenizer::from_llama2c(trailing, 8); }, Exit::data,
               {trailing, "2 bytes follow token 7"});
}

TEST(TokenizerBin, TruncatedAnywhereIsDataError) {
  const std::string full = bin_image(kSmallBin, 3);
  // Every proper prefix fails cleanly with 65 and names the file.
  for (size_t cut = 0; cut < full.size(); ++cut) {
    const std::string path = write_temp("cut.bin", full.substr(0, cut));
    expect_error([&] { Tokenizer::from_llama2c(path, 8); }, Exit::data, {path, "truncated"});
  }
  // And names the token where the data ran out: header | 0: score len "<unk>" | 1: ...
  const size_t t0 = 4, t1 = t0 + 8 + 5, t2 = t1 + 8 + 5, t7 = full.size() - (8 + 3);
  struct Case {
    size_t cut;
    std::string where;
  };
  for (const Case& c : {Case{2, "max_token_length"}, Case{t0, "token 0 "}, Case{t0 + 3, "token 0 "},
                        Case{t0 + 6, "token 0 "}, Case{t0 + 10, "token 0 "}, Case{t1, "token 1 "},
                        Case{t2 + 9, "token 2 "}, Case{t7 + 8 + 2, "token 7 "}}) {
    const std::string path = write_temp("cut.bin", full.substr(0, c.cut));
    expect_error([&] { Tokenizer::from_llama2c(path, 8); }, Exit::data, {path, c.where});
  }
  // A vocabulary larger than the file holds runs out at the first missing token.
  const std::string path = write_temp("short.bin", full);
  expect_error([&] { Tokenizer::from_llama2c(path, 9); }, Exit::data,
               {"token 8 of 9", "truncated"});
}

TEST(TokenizerBin, BadLengthsAreDataErrors) {
  std::string img = bin_image(kSmallBin, 3);
  const size_t len1 = 4 + 8 + 5 + 4;  // token 1's length field
  const int32_t negative = -5, huge = 0x7fffffff;
  std::memcpy(&img[len1], &negative, 4);
  std::string path = write_temp("neg.bin", img);
  expect_error([&] { Tokenizer::from_llama2c(path, 8); }, Exit::data,
               {path, "token 1 ", "negative length -5"});
  std::memcpy(&img[len1], &huge, 4);
  path = write_temp("huge.bin", img);
  expect_error([&] { Tokenizer::from_llama2c(path, 8); }, Exit::data,
               {path, "token 1 ", "length 2147483647"});
  path = write_temp("negmax.bin", bin_image(kSmallBin, -1));
  expect_error([&] { Tokenizer::from_llama2c(path, 8); }, Exit::data,
               {path, "negative max_token_length"});
  path = write_temp("ok.bin", bin_image(kSmallBin, 3));
  expect_error([&] { Tokenizer::from_llama2c(path, 0); }, Exit::data, {"vocabulary size 0"});
  expect_error([&] { Tokenizer::from_llama2c(path, -512); }, Exit::data, {"vocabulary size -512"});
  // BOS and EOS (1, 2) must exist.
  expect_error([&] { Tokenizer::from_llama2c(path, 2); }, Exit::data, {"EOS token id 2"});
}

TEST(TokenizerBin, MissingOrUnreadableFileIsNoInput) {
  const std::string dir = kvtest::temp_dir();
  expect_error([&] { Tokenizer::from_llama2c(dir + "/nope.bin", 512); }, Exit::no_input,
               {"cannot open", "nope.bin"});
  expect_error([&] { Tokenizer::from_llama2c(dir, 512); }, Exit::no_input,
               {"cannot open", "Is a directory"});
}

// ---------------------------------------------------------------------------------------------
// stories260K's vocabulary

TEST(TokenizerStories, GoldenPrompt) {
  NEED_MODELS();
  Tokenizer t = Tokenizer::from_llama2c(tok_path, 512);
  EXPECT_EQ(t.vocab_size(), 512);
  EXPECT_EQ(t.bos(), 1);
  EXPECT_EQ(t.eos(), 2);
  EXPECT_EQ(t.piece(3), "<0x00>");
  EXPECT_EQ(t.piece(259), " t");
  EXPECT_EQ(t.encode("Once upon a time", true), (Ids{1, 403, 407, 261, 378}));
  EXPECT_EQ(t.decode(Ids{1, 403, 407, 261, 378}), "Once upon a time");
}

TEST(TokenizerStories, RoundTrips) {
  NEED_MODELS();
  Tokenizer t = Tokenizer::from_llama2c(tok_path, 512);
  const Ids ids = t.encode(kReadmeParagraph, true);
  EXPECT_EQ(t.decode(ids), kReadmeParagraph);
  // Token by token, as a generation loop prints them.
  std::string streamed;
  for (size_t i = 1; i < ids.size(); ++i) streamed += t.decode(ids[i - 1], ids[i]);
  EXPECT_EQ(streamed, kReadmeParagraph);
  for (const std::string& s : tricky_strings()) {
    EXPECT_EQ(t.decode(t.encode(s, true)), s) << "'" << s << "'";
    // Without BOS the dummy-prefix space stays.
    EXPECT_EQ(t.decode(t.encode(s, false)), s.empty() ? s : " " + s) << "'" << s << "'";
  }
  // "é" is a piece of this vocabulary, "☕" is not (three byte tokens).
  const Ids cafe = t.encode("caf\xC3\xA9 \xE2\x98\x95", false);
  EXPECT_EQ(Ids(cafe.end() - 3, cafe.end()), (Ids{3 + 0xE2, 3 + 0x98, 3 + 0x95}));
}

TEST(TokenizerStories, AgreesWithLlama2cReference) {
  NEED_MODELS();
  Tokenizer t = Tokenizer::from_llama2c(tok_path, 512);
  const Llama2cReference ref(tok_path, 512);
  std::vector<std::string> texts = tricky_strings();
  texts.push_back(kReadmeParagraph);
  const std::string data_dir = env_dir("KV_DATA_DIR");
  if (!data_dir.empty()) {
    const std::vector<std::string> paras = paragraphs(slurp(data_dir + "/tinystories_val.txt"));
    ASSERT_GE(paras.size(), 300u);
    texts.insert(texts.end(), paras.begin(), paras.begin() + 300);
  }
  std::mt19937 rng(11);  // random printable/UTF-8/garbage strings
  const std::string alphabet = "the a, and.\n  \"!?\xC3\xA9\xE2\x80\x9C\xE2\x98\x95\xFF\x80Tt";
  for (int i = 0; i < 300; ++i) {
    std::string s;
    const int n = int(rng() % 40);
    for (int j = 0; j < n; ++j) s += alphabet[rng() % alphabet.size()];
    texts.push_back(s);
  }
  for (const std::string& s : texts) {
    // The reference stops at NUL like the C original; skip those texts.
    if (s.find('\0') != std::string::npos) continue;
    ASSERT_EQ(t.encode(s, true), ref.encode(s, true)) << "'" << s << "'";
    ASSERT_EQ(t.decode(t.encode(s, true)), s);
  }
}

TEST(TokenizerStories, EncodeSpeed) {
  NEED_MODELS();
  NEED_DATA();
  Tokenizer t = Tokenizer::from_llama2c(tok_path, 512);
  const std::string all = slurp(val_path);
  ASSERT_GE(all.size(), 200000u);
  using clock = std::chrono::steady_clock;
  auto time_ms = [&](const std::string& s, size_t* n_tokens) {
    double best = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = clock::now();
      *n_tokens = t.encode(s, true).size();
      best = std::min(best, std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    }
    return best;
  };
  size_t n1 = 0, n10 = 0, n100 = 0;
  // About 512 tokens: roughly 2 KB of TinyStories text.
  std::string prompt = all.substr(0, 4096);
  while (t.encode(prompt, true).size() > 512) prompt.resize(prompt.size() - 16);
  const double ms_prompt = time_ms(prompt, &n1);
  const double ms10 = time_ms(all.substr(0, 10000), &n10);
  const double ms100 = time_ms(all.substr(0, 100000), &n100);
  std::printf(
      "encode: %zu-token prompt %.3f ms; 10 KB -> %zu tokens %.3f ms; 100 KB -> %zu "
      "tokens %.3f ms\n",
      n1, ms_prompt, n10, ms10, n100, ms100);
  // Loose guards against quadratic behaviour (sanitizer builds are several times slower).
  EXPECT_LT(ms10, 100.0);
  EXPECT_LT(ms100, 1000.0);
}

// ---------------------------------------------------------------------------------------------
// GGUF vocabularies

// A GGUF image (metadata only, built with kv::GgufWriter) parsed in memory.
struct ParsedGguf {
  std::vector<uint8_t> bytes;
  std::unique_ptr<kv::GgufFile> file;
  explicit ParsedGguf(const kv::GgufWriter& w) : bytes(w.bytes()) {
    file = std::make_unique<kv::GgufFile>(bytes.data(), bytes.size(), "tiny.gguf");
  }
};

// <unk> <s> </s> <0x00>..<0xFF> ▁ ▁a a b ab ▁ab, types 2 3 3 6.. 1..
kv::GgufWriter tiny_gguf(const std::string& model) {
  kv::GgufWriter g;
  g.set_string("general.architecture", "llama");
  g.set_string("tokenizer.ggml.model", model);
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types = {2, 3, 3};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    tokens.push_back(name);
    types.push_back(6);
  }
  const std::string sp = "\xE2\x96\x81";
  for (const std::string& p : {sp, sp + "a", std::string("a"), std::string("b"), std::string("ab"),
                               sp + "ab", std::string("b") + sp})
    tokens.push_back(p), types.push_back(1);
  std::vector<float> scores(tokens.size(), 0.0f);
  scores[tokens.size() - 6] = -3;  // ▁a
  scores[tokens.size() - 3] = -1;  // ab
  scores[tokens.size() - 2] = -2;  // ▁ab
  scores[tokens.size() - 1] = -1;  // b▁
  g.set_strings("tokenizer.ggml.tokens", tokens);
  g.set_float32s("tokenizer.ggml.scores", scores);
  g.set_int32s("tokenizer.ggml.token_type", types);
  g.set_uint32("tokenizer.ggml.bos_token_id", 1);
  g.set_uint32("tokenizer.ggml.eos_token_id", 2);
  return g;
}

TEST(TokenizerGguf, TinyVocabulary) {
  ParsedGguf g(tiny_gguf("llama"));
  Tokenizer t = Tokenizer::from_gguf(*g.file);
  EXPECT_EQ(t.vocab_size(), 259 + 7);
  EXPECT_EQ(t.piece(259), " ");  // U+2581 became a space
  EXPECT_EQ(t.piece(264), " ab");
  EXPECT_EQ(t.piece(265), "b ");
  // " ab ab": [" ", a, b, " ", a, b]: ab (-1, leftmost) ties with "b " (-1); ab at 1 first,
  // then ab at 4 (the pair "b " at 2 went stale), then " ab" (-2) twice.
  EXPECT_EQ(t.encode("ab ab", true), (Ids{1, 264, 264}));
  EXPECT_EQ(t.encode("bb", false), (Ids{259, 262, 262}));
  EXPECT_EQ(t.encode("x", false), (Ids{259, 3 + 'x'}));
  EXPECT_EQ(t.decode(t.encode("ab x\xC3\xA9", true)), "ab x\xC3\xA9");
}

TEST(TokenizerGguf, DefaultsAndOptionalKeys) {
  kv::GgufWriter img;
  img.set_string("tokenizer.ggml.model", "llama");
  img.set_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "\xE2\x96\x81", "a",
                                            "\xE2\x96\x81"
                                            "a"});
  ParsedGguf g(img);
  Tokenizer t = Tokenizer::from_gguf(*g.file);  // no scores, no types: BOS 1, EOS 2
  EXPECT_EQ(t.bos(), 1);
  EXPECT_EQ(t.eos(), 2);
  EXPECT_EQ(t.encode("a", true), (Ids{1, 5}));
  EXPECT_EQ(t.encode("b", false), (Ids{3, 0}));  // no byte tokens: <unk>
}

TEST(TokenizerGguf, RejectsOtherModelsAndBadArrays) {
  {
    ParsedGguf g(tiny_gguf("gpt2"));
    expect_error([&] { Tokenizer::from_gguf(*g.file); }, Exit::data,
                 {"unsupported tokenizer model 'gpt2'"});
  }
  {
    kv::GgufWriter img;
    img.set_string("tokenizer.ggml.model", "llama");
    img.set_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>"});
    img.set_float32s("tokenizer.ggml.scores", {0, 0});
    ParsedGguf g(img);
    expect_error([&] { Tokenizer::from_gguf(*g.file); }, Exit::data,
                 {"tokenizer.ggml.scores has 2 entries"});
  }
  {
    kv::GgufWriter img;
    img.set_string("tokenizer.ggml.model", "llama");
    img.set_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>"});
    img.set_uint32("tokenizer.ggml.bos_token_id", 7);
    ParsedGguf g(img);
    expect_error([&] { Tokenizer::from_gguf(*g.file); }, Exit::data, {"BOS token id 7"});
  }
  {
    kv::GgufWriter img;
    img.set_string("tokenizer.ggml.model", "llama");
    ParsedGguf g(img);
    expect_error([&] { Tokenizer::from_gguf(*g.file); }, Exit::data, {"tokenizer.ggml.tokens"});
  }
  {
    kv::GgufWriter img;
    img.set_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>"});
    ParsedGguf g(img);
    expect_error([&] { Tokenizer::from_gguf(*g.file); }, Exit::data, {"tokenizer.ggml.model"});
  }
}

TEST(TokenizerGguf, StoriesMatchesTokenizerBin) {
  NEED_MODELS();
  NEED_DATA();
  const kv::GgufFile gguf(models + "/stories260K.gguf");
  const Tokenizer g = Tokenizer::from_gguf(gguf);
  const Tokenizer b = Tokenizer::from_llama2c(tok_path, 512);
  ASSERT_EQ(g.vocab_size(), b.vocab_size());
  for (int32_t i = 3; i < b.vocab_size(); ++i) ASSERT_EQ(g.piece(i), b.piece(i)) << i;
  EXPECT_EQ(g.encode("Once upon a time", true), (Ids{1, 403, 407, 261, 378}));
  const std::vector<std::string> paras = paragraphs(slurp(val_path));
  ASSERT_GE(paras.size(), 20u);
  for (size_t i = 0; i < 20; ++i) {
    const Ids ids = b.encode(paras[i], true);
    ASSERT_EQ(g.encode(paras[i], true), ids) << "paragraph " << i;
    EXPECT_EQ(g.decode(ids), paras[i]);
    EXPECT_EQ(b.decode(ids), paras[i]);
  }
  for (const std::string& s : tricky_strings()) {
    EXPECT_EQ(g.encode(s, true), b.encode(s, true)) << "'" << s << "'";
    EXPECT_EQ(g.decode(g.encode(s, true)), s);
  }
}

}  // namespace
