// SentencePiece-style BPE tokenizer with scores and byte fallback, as llama2.c and llama.cpp's
// "llama" vocabulary use it: add a dummy-prefix space, split into UTF-8 code points (unknown
// ones become <0xXX> byte tokens), then repeatedly merge the adjacent pair whose concatenation is
// a vocabulary entry with the highest score.
#pragma once
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
  // <0xXX> into its byte).
  std::string decode(int32_t prev, int32_t token) const;
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
};

}  // namespace kv
