// SentencePiece-style BPE with scores and byte fallback. The splitting and merge order follow
// llama2.c's encode() exactly (a pair merges when its concatenation is a piece, best score first,
// leftmost on ties); the merging itself uses a priority queue over a linked list of symbols, as
// llama.cpp's SPM tokenizer does, so it takes O(n log n) instead of llama2.c's O(n^2).
#include "kv/tokenizer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <limits>
#include <queue>
#include <utility>

#include "kv/error.h"
#include "kv/gguf.h"

namespace kv {
namespace {

// llama2.c starts its best score at -1e10 and compares with '>', so pieces scored at or below
// it (or NaN) never merge.
constexpr float kNoMerge = -1e10f;

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// The byte a "<0xXX>" piece stands for, or -1.
int byte_piece_value(const std::string& p) {
  if (p.size() != 6 || p.compare(0, 3, "<0x") != 0 || p[5] != '>') return -1;
  const int hi = hex_digit(p[3]), lo = hex_digit(p[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

std::vector<uint8_t> read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(Exit::no_input, "cannot open '" + path + "': " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || S_ISDIR(st.st_mode)) {
    const std::string why = S_ISDIR(st.st_mode) ? "Is a directory" : errno_text();
    ::close(fd);
    throw Error(Exit::no_input, "cannot open '" + path + "': " + why);
  }
  std::vector<uint8_t> data;
  data.reserve(size_t(st.st_size > 0 ? st.st_size : 0));
  uint8_t buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string why = errno_text();
      ::close(fd);
      throw Error(Exit::no_input, "cannot read '" + path + "': " + why);
    }
    data.insert(data.end(), buf, buf + n);
  }
  ::close(fd);
  return data;
}

template <class T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace

Tokenizer::Tokenizer(std::vector<std::string> pieces, std::vector<float> scores, int bos, int eos)
    : pieces_(std::move(pieces)), scores_(std::move(scores)), bos_(bos), eos_(eos) {
  index(nullptr);
}

void Tokenizer::index(const std::vector<int64_t>* types) {
  const size_t n = pieces_.size();
  if (n == 0) throw Error(Exit::data, "tokenizer vocabulary is empty");
  if (n > size_t(std::numeric_limits<int32_t>::max()))
    throw Error(Exit::data, "tokenizer vocabulary has too many tokens");
  if (scores_.size() != n)
    throw Error(Exit::data, "tokenizer has " + std::to_string(n) + " pieces but " +
                                std::to_string(scores_.size()) + " scores");
  if (types && types->size() != n)
    throw Error(Exit::data, "tokenizer has " + std::to_string(n) + " pieces but " +
                                std::to_string(types->size()) + " token types");
  if (bos_ < 0 || size_t(bos_) >= n)
    throw Error(Exit::data, "BOS token id " + std::to_string(bos_) +
                                " is outside the vocabulary (" + std::to_string(n) + " tokens)");
  if (eos_ < 0 || size_t(eos_) >= n)
    throw Error(Exit::data, "EOS token id " + std::to_string(eos_) +
                                " is outside the vocabulary (" + std::to_string(n) + " tokens)");
  if (unk_ < 0 || size_t(unk_) >= n) unk_ = 0;

  lookup_.clear();
  lookup_.reserve(n);
  byte_id_.fill(-1);
  byte_value_.assign(n, -1);
  control_.assign(n, 0);
  max_piece_ = 0;
  for (size_t i = 0; i < n; ++i) {
    const std::string& p = pieces_[i];
    lookup_.emplace(p, int32_t(i));  // the first of duplicate pieces wins
    if (p.size() > max_piece_) max_piece_ = p.size();
    if (types && (*types)[i] == 3) control_[i] = 1;
    const int b = byte_piece_value(p);
    if (b >= 0 && (!types || (*types)[i] == 6)) {
      byte_value_[i] = int16_t(b);
      if (byte_id_[size_t(b)] < 0) byte_id_[size_t(b)] = int32_t(i);
    }
  }
  control_[size_t(bos_)] = control_[size_t(eos_)] = 1;
  byte_base_ = byte_id_[0];
}

Tokenizer Tokenizer::from_llama2c(const std::string& path, int vocab_size) {
  if (vocab_size <= 0)
    throw Error(Exit::data,
                path + ": vocabulary size " + std::to_string(vocab_size) + " is not positive");
  const std::vector<uint8_t> data = read_file(path);
  const size_t size = data.size();
  if (size < 4)
    throw Error(Exit::data, path + ": truncated: " + std::to_string(size) +
                                " bytes, too short for the max_token_length header");
  const int32_t max_len = load<int32_t>(data.data());
  if (max_len < 0)
    throw Error(Exit::data, path + ": negative max_token_length " + std::to_string(max_len));

  std::vector<std::string> pieces;
  std::vector<float> scores;
  pieces.reserve(size_t(vocab_size));
  scores.reserve(size_t(vocab_size));
  size_t off = 4;
  for (int i = 0; i < vocab_size; ++i) {
    const std::string where =
        path + ": token " + std::to_string(i) + " of " + std::to_string(vocab_size) + ": ";
    if (size - off < 8)
      throw Error(Exit::data, where + "truncated: score and length need 8 bytes, " +
                                  std::to_string(size - off) + " left");
    const float score = load<float>(data.data() + off);
    const int32_t len = load<int32_t>(data.data() + off + 4);
    off += 8;
    if (len < 0) throw Error(Exit::data, where + "negative length " + std::to_string(len));
    if (size_t(len) > size - off)
      throw Error(Exit::data, where + "truncated: length " + std::to_string(len) + " but " +
                                  std::to_string(size - off) + " bytes left");
    pieces.emplace_back(reinterpret_cast<const char*>(data.data() + off), size_t(len));
    scores.push_back(score);
    off += size_t(len);
  }
  // llama2.c itself ignores what follows; here it means a tokenizer of another vocabulary (a
  // 1024-token file with a 512-token model), which would decode the wrong pieces silently.
  Tokenizer t(std::move(pieces), std::move(scores), 1, 2);
  if (off != size)
    throw Error(Exit::data, path + ": " + std::to_string(size - off) + " bytes follow token " +
                                std::to_string(vocab_size - 1) +
                                ": a tokenizer of more tokens "
                                "than the model's " +
                                std::to_string(vocab_size) + "?");
  return t;
}

Tokenizer Tokenizer::from_gguf(const GgufFile& gguf) {
  const std::string& model = gguf.get("tokenizer.ggml.model").as_string("tokenizer.ggml.model");
  if (model != "llama")
    throw Error(Exit::data, gguf.name() + ": unsupported tokenizer model '" + model + "'");

  const char* tokens_key = "tokenizer.ggml.tokens";
  const GgufValue::Array& tokens = gguf.get(tokens_key).as_array(tokens_key);
  static const std::string kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space
  std::vector<std::string> pieces;
  pieces.reserve(tokens.size());
  for (const GgufValue& t : tokens) {
    const std::string& s = t.as_string(tokens_key);
    std::string p;
    p.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
      if (s.compare(i, kSpace.size(), kSpace) == 0) {
        p += ' ';
        i += kSpace.size();
      } else {
        p += s[i++];
      }
    }
    pieces.push_back(std::move(p));
  }

  // Scores are optional in llama.cpp (all 0 when absent).
  std::vector<float> scores(pieces.size(), 0.0f);
  const char* scores_key = "tokenizer.ggml.scores";
  if (gguf.has(scores_key)) {
    const GgufValue::Array& a = gguf.get(scores_key).as_array(scores_key);
    if (a.size() != pieces.size())
      throw Error(Exit::data, gguf.name() + ": " + scores_key + " has " + std::to_string(a.size()) +
                                  " entries but " + tokens_key + " has " +
                                  std::to_string(pieces.size()));
    for (size_t i = 0; i < a.size(); ++i) scores[i] = float(a[i].as_float(scores_key));
  }

  std::vector<int64_t> types;
  const char* types_key = "tokenizer.ggml.token_type";
  if (gguf.has(types_key)) {
    const GgufValue::Array& a = gguf.get(types_key).as_array(types_key);
    if (a.size() != pieces.size())
      throw Error(Exit::data, gguf.name() + ": " + types_key + " has " + std::to_string(a.size()) +
                                  " entries but " + tokens_key + " has " +
                                  std::to_string(pieces.size()));
    types.reserve(a.size());
    for (const GgufValue& v : a) types.push_back(v.as_int(types_key));
  }

  auto id = [&](const char* key, int64_t fallback) -> int64_t {
    return gguf.has(key) ? gguf.get(key).as_int(key) : fallback;
  };
  const int64_t n = int64_t(pieces.size());
  const int64_t bos = id("tokenizer.ggml.bos_token_id", 1);
  const int64_t eos = id("tokenizer.ggml.eos_token_id", 2);
  const int64_t unk = id("tokenizer.ggml.unknown_token_id", 0);
  for (auto [what, v] : {std::pair{"BOS", bos}, std::pair{"EOS", eos}})
    if (v < 0 || v >= n)
      throw Error(Exit::data, gguf.name() + ": " + what + " token id " + std::to_string(v) +
                                  " is outside the vocabulary (" + std::to_string(n) + " tokens)");

  Tokenizer t({std::string()}, {0.0f}, 0, 0);  // replaced below; index() validates the rest
  t.pieces_ = std::move(pieces);
  t.scores_ = std::move(scores);
  t.bos_ = int(bos);
  t.eos_ = int(eos);
  t.unk_ = unk >= 0 && unk < n ? int(unk) : 0;
  t.index(gguf.has(types_key) ? &types : nullptr);
  return t;
}

std::vector<int32_t> Tokenizer::encode(const std::string& text, bool add_bos) const {
  std::vector<int32_t> out;
  if (add_bos) out.push_back(bos_);
  if (text.empty()) return out;

  // One symbol per UTF-8 code point, grouped as llama2.c does: a byte and the continuation bytes
  // after it, 4 bytes at most. A code point that is not a piece becomes one <0xXX> per byte.
  struct Symbol {
    int32_t id, prev, next;
  };
  std::vector<Symbol> sym;
  sym.reserve(text.size() + 1);
  auto add = [&](int32_t id) {
    const int32_t k = int32_t(sym.size());
    sym.push_back({id, k - 1, k + 1});
  };
  std::string cp;
  auto add_code_point = [&](const char* p, size_t len) {
    cp.assign(p, len);
    const auto it = lookup_.find(cp);
    if (it != lookup_.end()) {
      add(it->second);
    } else {
      for (size_t j = 0; j < len; ++j) {
        const int32_t b = byte_id_[uint8_t(p[j])];
        add(b >= 0 ? b : unk_);
      }
    }
  };
  // SentencePiece's add_dummy_prefix: a space symbol of its own before the text (so it never
  // groups with continuation bytes at the start of the text).
  add_code_point(" ", 1);
  for (size_t i = 0; i < text.size();) {
    size_t len = 1;
    while (i + len < text.size() && len < 4 && (uint8_t(text[i + len]) & 0xC0) == 0x80) ++len;
    add_code_point(text.data() + i, len);
    i += len;
  }
  sym.back().next = -1;

  // Merge candidates: best score first, leftmost on ties. A candidate is stale once either side
  // has changed or they are no longer neighbours; each merge queues the two new pairs.
  struct Pair {
    float score;
    int32_t left, right;   // symbol indices
    int32_t lid, rid, id;  // the ids the pair was built from, and the merged id
  };
  struct Lower {
    bool operator()(const Pair& a, const Pair& b) const {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    }
  };
  std::priority_queue<Pair, std::vector<Pair>, Lower> queue;
  std::string joined;
  auto try_pair = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const std::string& a = pieces_[size_t(sym[size_t(l)].id)];
    const std::string& b = pieces_[size_t(sym[size_t(r)].id)];
    if (a.size() + b.size() > max_piece_) return;
    joined.assign(a);
    joined += b;
    const auto it = lookup_.find(joined);
    if (it == lookup_.end()) return;
    const float score = scores_[size_t(it->second)];
    if (!(score > kNoMerge)) return;
    queue.push({score, l, r, sym[size_t(l)].id, sym[size_t(r)].id, it->second});
  };
  for (int32_t k = 0; k + 1 < int32_t(sym.size()); ++k) try_pair(k, k + 1);

  while (!queue.empty()) {
    const Pair p = queue.top();
    queue.pop();
    Symbol& l = sym[size_t(p.left)];
    Symbol& r = sym[size_t(p.right)];
    if (l.id != p.lid || l.next != p.right || r.id != p.rid) continue;  // stale
    l.id = p.id;
    l.next = r.next;
    if (r.next >= 0) sym[size_t(r.next)].prev = p.left;
    r.id = -1;  // merged away
    try_pair(l.prev, p.left);
    try_pair(p.left, l.next);
  }

  for (int32_t k = 0; k >= 0; k = sym[size_t(k)].next) out.push_back(sym[size_t(k)].id);
  return out;
}

std::string Tokenizer::decode(int32_t prev, int32_t token) const {
  if (token < 0 || size_t(token) >= pieces_.size())
    throw Error(Exit::data, "token id " + std::to_string(token) + " is outside the vocabulary (" +
                                std::to_string(pieces_.size()) + " tokens)");
  const size_t t = size_t(token);
  if (control_[t]) return {};
  std::string text = byte_value_[t] >= 0 ? std::string(1, char(byte_value_[t])) : pieces_[t];
  // After BOS, SentencePiece's decoder drops the dummy-prefix space (llama2.c checks the piece
  // before turning <0xXX> into its byte; checking after also covers a vocabulary whose space is
  // only the byte token <0x20>).
  if (prev == bos_ && !text.empty() && text[0] == ' ') text.erase(0, 1);
  return text;
}

std::string Tokenizer::decode(const std::vector<int32_t>& tokens) const {
  std::string out;
  int32_t prev = -1;
  for (int32_t t : tokens) {
    out += decode(prev, t);
    prev = t;
  }
  return out;
}

}  // namespace kv
