#include "kv/snapshot.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>

#include "kv/error.h"
#include "kv/str.h"
#include "kv/version.h"

namespace kv {

std::string errno_text() {
  return std::strerror(errno);
}

namespace {

[[noreturn]] void bad(const std::string& msg) {
  throw Error(Exit::data, msg);
}

void check_tensor(const char* name, const Tensor& t, int64_t rows, int64_t cols, int layer) {
  if (t.rows() != rows || t.cols() != cols)
    bad(str("layer ", layer, ": ", name, " has shape [", t.rows(), ", ", t.cols(), "], expected [",
            rows, ", ", cols, "]"));
}

}  // namespace

void validate_header(const Header& h) {
  const ModelInfo& m = h.model;
  if (m.n_layers <= 0 || m.n_q_heads <= 0 || m.n_kv_heads <= 0 || m.head_dim <= 0)
    bad(str("model shape must be positive (n_layers ", m.n_layers, ", n_q_heads ", m.n_q_heads,
            ", n_kv_heads ", m.n_kv_heads, ", head_dim ", m.head_dim, ")"));
  if (m.n_q_heads % m.n_kv_heads != 0)
    bad(str("n_q_heads ", m.n_q_heads, " is not a multiple of n_kv_heads ", m.n_kv_heads));
  if (m.rope_dims < 0 || m.rope_dims > m.head_dim || m.rope_dims % 2)
    bad(str("rope_dims ", m.rope_dims, " must be even and at most head_dim ", m.head_dim));
  if (m.rope_style != "pairs" && m.rope_style != "halves")
    bad("rope_style '" + m.rope_style + "' is not 'pairs' or 'halves'");
  if (m.key_rope != "applied") bad("key_rope '" + m.key_rope + "' is not supported");
  if (h.n_tokens < 0 || int64_t(h.tokens.size()) != h.n_tokens)
    bad(str("tokens has ", h.tokens.size(), " ids but n_tokens is ", h.n_tokens));
  for (int32_t p : h.window_positions)
    if (p < 0 || p >= h.n_tokens)
      bad(str("window position ", p, " is outside [0, ", h.n_tokens, ")"));
  if (h.probe_positions.size() != h.probe_tokens.size())
    bad("probe positions and probe tokens differ in length");
  if (!h.probe_logits.empty() && h.probe_logits.rows() != int64_t(h.probe_tokens.size()))
    bad("probe logits rows differ from the number of probe tokens");
}

void validate_layer(const Header& h, int l, const Layer& layer, bool check_values) {
  const ModelInfo& m = h.model;
  const int64_t n = layer.entries();
  const auto& off = layer.head_offsets;
  if (int64_t(off.size()) != m.n_kv_heads + 1)
    bad(str("layer ", l, ": head_offsets has ", off.size(),
            " values, expected n_kv_heads + 1 = ", m.n_kv_heads + 1));
  if (off.front() != 0 || off.back() != n)
    bad(str("layer ", l, ": head_offsets must start at 0 and end at ", n, " entries"));
  // Every offset is checked before any is used as an index (found by fuzz.snapshot_reader:
  // {0, 100, 5} would otherwise walk head 0 past the end).
  for (int hd = 0; hd < m.n_kv_heads; ++hd)
    if (off[hd + 1] < off[hd]) bad(str("layer ", l, ": head_offsets decrease at head ", hd));
  for (int hd = 0; hd < m.n_kv_heads; ++hd) {
    for (int64_t i = off[hd]; i < off[hd + 1]; ++i) {
      int32_t p = layer.positions[i];
      if (p < 0 || p >= h.n_tokens)
        bad(str("layer ", l, " head ", hd, ": position ", p, " is outside [0, ", h.n_tokens, ")"));
      if (i > off[hd] && p <= layer.positions[i - 1])
        bad(str("layer ", l, " head ", hd, ": positions not strictly increasing at entry ",
                i - off[hd]));
    }
  }
  check_tensor("k", layer.k, n, m.head_dim, l);
  check_tensor("v", layer.v, n, m.head_dim, l);
  if (!layer.mass.empty()) {
    if (int64_t(layer.mass.size()) != n)
      bad(str("layer ", l, ": mass has ", layer.mass.size(), " values for ", n, " entries"));
    for (float w : layer.mass)
      if (!(w > 0.0f) || !std::isfinite(w))
        bad(str("layer ", l, ": mass ", w, " is not a finite positive value"));
  }
  const int64_t W = int64_t(h.window_positions.size()), P = int64_t(h.probe_tokens.size());
  if (W) check_tensor("window_q", layer.window_q, m.n_q_heads * W, m.head_dim, l);
  if (h.has_attn_stats) {
    check_tensor("attn_acc", layer.attn_acc, m.n_q_heads, h.n_tokens, l);
    check_tensor("attn_last", layer.attn_last, m.n_q_heads, h.n_tokens, l);
  }
  if (P) check_tensor("probe_q", layer.probe_q, m.n_q_heads * P, m.head_dim, l);
  if (check_values) {
    for (const Tensor* t : {&layer.k, &layer.v}) {
      size_t bad_values = kvk::count_nonfinite(t->dtype(), t->data(), t->size());
      if (bad_values)
        bad(str("layer ", l, ": ", t == &layer.k ? "k" : "v", " holds ", bad_values,
                " NaN/Inf values (--allow-nonfinite reads it anyway)"));
    }
    check_side_values(l, layer);
  }
}

void check_side_values(int l, const Layer& layer) {
  for (const auto& [name, t] : {std::pair{"window_q", &layer.window_q},
                                {"attn_acc", &layer.attn_acc},
                                {"attn_last", &layer.attn_last},
                                {"probe_q", &layer.probe_q}})
    if (const size_t n = kvk::count_nonfinite(t->dtype(), t->data(), t->size()))
      bad(str("layer ", l, ": ", name, " holds ", n,
              " NaN/Inf values (--allow-nonfinite reads it anyway)"));
}

std::string quote_command_line(int argc, const char* const* argv) {
  std::string out;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    bool plain = !a.empty() && a.find_first_not_of(
                                   "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                   "0123456789-_./=:,+@%") == std::string::npos;
    if (i) out += ' ';
    const bool control = std::any_of(a.begin(), a.end(), [](char c) {
      return static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
    });
    if (plain) {
      out += a;
    } else if (control) {
      // Bash's $'...' with escapes, so a record (and the history) stays one line: a newline
      // in an argument split kv-inspect's provenance list and the history's lines.
      out += "$'";
      for (char c : a) {
        const auto u = static_cast<unsigned char>(c);
        if (c == '\\' || c == '\'')
          out += std::string("\\") + c;
        else if (c == '\n')
          out += "\\n";
        else if (c == '\t')
          out += "\\t";
        else if (c == '\r')
          out += "\\r";
        else if (u < 0x20 || u == 0x7f)
          out += str("\\x", "0123456789abcdef"[u >> 4], "0123456789abcdef"[u & 15]);
        else
          out += c;
      }
      out += '\'';
    } else {
      out += '\'';
      for (char c : a) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
      out += '\'';
    }
  }
  return out;
}

void append_provenance(Header& h, const std::string& program, int argc, const char* const* argv) {
  Provenance rec;
  rec.program = program;
  rec.version = version();
  // The program's name, not the path it was run by, leads the line (as samtools records it).
  std::vector<const char*> args(argv, argv + argc);
  if (!args.empty()) args[0] = program.c_str();
  rec.command_line = quote_command_line(argc, args.data());
  rec.previous = h.provenance.empty() ? "" : h.provenance.back().id;
  // Unique ids as samtools makes them: the program name, then ".1", ".2", ... on repeats.
  rec.id = program;
  for (int n = 1;; ++n) {
    bool taken = false;
    for (const auto& p : h.provenance) taken |= p.id == rec.id;
    if (!taken) break;
    rec.id = program + "." + std::to_string(n);
  }
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char iso[32], nco[64];
  std::strftime(iso, sizeof iso, "%Y-%m-%dT%H:%M:%SZ", &utc);
  std::strftime(nco, sizeof nco, "%a %b %e %H:%M:%S %Y", &utc);
  rec.time = iso;
  std::string line = std::string(nco) + ": " + rec.command_line;
  h.history = h.history.empty() ? line : line + "\n" + h.history;
  h.provenance.push_back(std::move(rec));
}

}  // namespace kv
