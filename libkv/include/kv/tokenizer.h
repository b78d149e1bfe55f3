// SentencePiece-style BPE tokenizer with scores and byte fallback, as llama2.c and llama.cpp's
// "llama" vocabulary use it: add a dummy-prefix space, split into UTF-8 code points (unknown
// ones become <0xXX> byte tokens), then repeatedly merge the adjacent pair whose concatenation is
// a vocabulary entry with the highest score.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace kv {

class GgufFile;

class Tokenizer {
 public:
  // From GGUF metadata (tokenizer.ggml.tokens / scores / token_type / bos / eos ids).
  static Tokenizer from_gguf(const GgufFile& gguf);
  // From a llama2.c tokenizer.bin (int32 max_token_length, then per token: f32 score, int32
  // length, bytes). `vocab_size` comes from the checkpoint header.
  static Tokenizer from_llama2c(const std::string& path, int vocab_size);
  // From explicit pieces (tests). Pieces use ' ' for spaces (GGUF's U+2581 is converted).
  Tokenizer(std::vector<std::string> pieces, std::vector<float> scores, int bos, int eos);

  std::vector<int32_t> encode(const std::string& text, bool add_bos) const;
  // Text of one token as it follows `prev` (strips the dummy-prefix space after BOS, turns
  // <0xXX> into its byte). Control tokens (BOS, EOS, GGUF type 3) decode to "". Throws
  // Error(Exit::data) for an id outside the vocabulary.
  std::string decode(int32_t prev, int32_t token) const;
  // Concatenation of decode(previous, token) over `tokens` (the first token follows nothing), so
  // decode(encode(s, true)) == s.
  std::string decode(const std::vector<int32_t>& tokens) const;

  int vocab_size() const { return int(pieces_.size()); }
  int bos() const { return bos_; }
  int eos() const { return eos_; }
  const std::string& piece(int32_t id) const { return pieces_.at(size_t(id)); }

 private:
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> lookup_;
  int bos_ = 1, eos_ = 2;
  int byte_base_ = -1;  // id of <0x00>, when the vocabulary has byte tokens
  int unk_ = 0;         // stands in for a byte that has no <0xXX> token
  size_t max_piece_ = 0;                 // longest piece, in bytes: longer pairs cannot merge
  std::array<int32_t, 256> byte_id_{};   // id of <0xXX> per byte value, or -1
  std::vector<int16_t> byte_value_;      // per id: the byte a <0xXX> token stands for, or -1
  std::vector<uint8_t> control_;         // per id: 1 for control tokens (decode to "")

  // Checks sizes and special ids, and builds lookup_, byte_id_, byte_value_ and control_.
  // `types` holds GGUF token types (may be null): 6 marks byte tokens, 3 control tokens.
  void index(const std::vector<int64_t>* types);
};

}  // namespace kv
