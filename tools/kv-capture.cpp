// kv-capture: run a real model over a prompt and write its KV cache with side data.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits>
#include <sstream>

#include "common/tool.h"
#include "kv/capture.h"
#include "kv/error.h"
#include "kv/file.h"
#include "kv/json.h"
#include "kv/str.h"

namespace {

std::string read_text(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    throw kv::Error(kv::Exit::no_input, "cannot open '" + path + "': Is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw kv::Error(kv::Exit::no_input, "cannot open '" + path + "': " + kv::errno_text());
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw kv::Error(kv::Exit::io, "cannot read '" + path + "': " + kv::errno_text());
  return ss.str();
}

// Text the tokenizer and the snapshot's /text take: no NUL (HDF5 strings end there).
std::string checked_text(std::string text, const std::string& what) {
  if (const size_t at = text.find('\0'); at != std::string::npos)
    throw kv::Error(kv::Exit::data, kv::str(what, " holds a NUL byte (at byte ", at, ")"));
  return text;
}

std::vector<int32_t> read_token_ids(const std::string& path) {
  std::istringstream in(read_text(path));
  std::vector<int32_t> ids;
  std::string word;
  while (in >> word) {
    char* end = nullptr;
    long v = std::strtol(word.c_str(), &end, 10);
    if (*end || v < 0 || v > INT32_MAX)
      throw kv::Error(kv::Exit::data, "'" + path + "': '" + word + "' is not a token id");
    ids.push_back(int32_t(v));
  }
  return ids;
}

// Paragraphs separated by blank lines, in order, without surrounding whitespace.
std::vector<std::string> paragraphs(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string line, cur;
  auto flush = [&] {
    size_t a = cur.find_first_not_of(" \t\r\n"), b = cur.find_last_not_of(" \t\r\n");
    if (a != std::string::npos) out.push_back(cur.substr(a, b - a + 1));
    cur.clear();
  };
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos)
      flush();
    else
      cur += (cur.empty() ? "" : "\n") + line;
  }
  flush();
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  kvt::Tool tool("kv-capture",
                 "Run a Llama-family model (GGUF or llama2.c checkpoint) over a prompt and write "
                 "its KV cache (post-RoPE keys, values) with side data for strategies and "
                 "evaluation.");
  auto& app = tool.app();
  std::string model_path, tokenizer_path, prompt_text, text_file, tokens_file, probe_file,
      dtype = "f16";
  int window = 0;
  int64_t probe = 0, generate = 0, ctx = 0, n_paragraphs = 50;
  bool attn_stats = false, ppl = false;
  const char* env_model = std::getenv("KV_MODEL");
  app.add_option("-m,--model", model_path,
                 "Model file: GGUF v2/v3 or llama2.c checkpoint (default: $KV_MODEL)");
  app.add_option("--tokenizer", tokenizer_path, "tokenizer.bin for a llama2.c checkpoint");
  auto* p_opt = app.add_option("-p,--prompt", prompt_text, "Prompt text");
  auto* f_opt = app.add_option("-f,--file", text_file, "Read the prompt text from FILE");
  auto* t_opt =
      app.add_option("--tokens", tokens_file,
                     "Read whitespace-separated token ids from FILE (no tokenizer, no BOS added)");
  p_opt->excludes(f_opt)->excludes(t_opt);
  f_opt->excludes(t_opt);
  app.add_option("--dtype", dtype, "Storage type of k and v: f32, f16, bf16")
      ->default_val("f16")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  app.add_option(
         "--window", window,
         "Store the post-RoPE queries of the last W prompt tokens (SnapKV, PyramidKV, AdaKV)")
      ->default_val(0)
      ->check(kvt::integer_in(0, 1 << 24));
  app.add_flag("--attn-stats", attn_stats,
               "Store per layer and query head the attention each token received, summed over all "
               "later prompt queries (H2O) and from the last query (TOVA)");
  app.add_option("--probe", probe,
                 "Teacher-force the N tokens that follow the prompt and store their tokens, "
                 "queries and logits (for kv-eval)")
      ->default_val(0)
      ->check(kvt::integer_in(int64_t(0), int64_t(1) << 24));
  app.add_option("--probe-file", probe_file,
                 "Take the probe tokens from FILE's text instead of the input's continuation");
  app.add_option("--ctx", ctx,
                 "Cap the prompt at N tokens (the rest of the input can feed --probe)")
      ->check(kvt::integer_in(int64_t(1), int64_t(1) << 24));
  app.add_option("--generate", generate,
                 "Print a greedy continuation of N tokens of the prompt as text on stdout (the "
                 "snapshot then needs -o)")
      ->default_val(0)
      ->check(kvt::integer_in(int64_t(0), std::numeric_limits<int64_t>::max()));
  app.add_flag("--perplexity", ppl,
               "Print the teacher-forced perplexity of the first --paragraphs blank-line-separated "
               "paragraphs of -f FILE (each with BOS, capped at --ctx or the context) and exit");
  app.add_option("--paragraphs", n_paragraphs, "Paragraphs scored by --perplexity")
      ->default_val(50)
      ->check(kvt::integer_in(int64_t(1), int64_t(1) << 30));
  tool.add_output_options();
  tool.add_json_option();

  return tool.run(argc, argv, [&] {
    if (ppl && text_file.empty()) throw kv::Error(kv::Exit::usage, "--perplexity needs -f FILE");
    // --perplexity scores -f FILE and writes nothing: what a capture reads, stores or writes
    // would be ignored, as would --perplexity's own options in a capture.
    const std::string capture = "a capture (without --perplexity)";
    const auto option = [&](const char* name) { return app.get_option(name); };
    std::vector<kvt::OptionFor> ignored;
    for (const char* name :
         {"--prompt", "--tokens", "--dtype", "--window", "--attn-stats", "--probe", "--probe-file",
          "--generate", "--output", "--codec", "--no-provenance", "--force", "--allow-nonfinite"})
      ignored.push_back({option(name), capture, !ppl});
    for (const char* name : {"--paragraphs", "--json"})
      ignored.push_back({option(name), "--perplexity", ppl});
    kvt::refuse_ignored(ignored);
    if (model_path.empty()) {
      if (!env_model || !*env_model)
        throw kv::Error(
            kv::Exit::usage,
            "no model: pass -m FILE (a GGUF file or llama2.c checkpoint) or set KV_MODEL");
      model_path = env_model;
    }
    if (!ppl && (generate == 0 || tool.output != "-"))
      tool.check_output();    // fail before the model runs
    if (!ppl && !tool.force)  // the snapshot must not land on a file this run reads
      for (const auto& [path, what] : {std::pair{&model_path, "the model (-m)"},
                                       {&tokenizer_path, "the tokenizer (--tokenizer)"},
                                       {&text_file, "the prompt file (-f)"},
                                       {&tokens_file, "the token file (--tokens)"},
                                       {&probe_file, "the probe file (--probe-file)"}})
        if (kv::same_file(*path, tool.output))
          throw kv::Error(
              kv::Exit::usage,
              kv::str("output ", tool.output == "-" ? "stdout" : "'" + tool.output + "'", " is ",
                      what, "; choose another name (or --force to replace it)"));
    auto model = kv::Model::load(model_path, tokenizer_path);
    const kv::ModelConfig& c = model->config();
    const int64_t cap = ctx ? std::min<int64_t>(ctx, c.context) : c.context;

    if (ppl) {
      auto paras = paragraphs(read_text(text_file));
      if (int64_t(paras.size()) > n_paragraphs) paras.resize(size_t(n_paragraphs));
      std::vector<std::vector<int32_t>> docs;
      for (const auto& p : paras) {
        auto ids = model->tokenizer().encode(p, true);
        if (int64_t(ids.size()) > cap) ids.resize(size_t(cap));
        docs.push_back(std::move(ids));
      }
      int64_t scored = 0;
      auto t0 = std::chrono::steady_clock::now();
      double value = kv::perplexity(*model, docs, &scored);
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (!std::isfinite(value))
        throw kv::Error(kv::Exit::data, kv::str("the model's perplexity is ", value,
                                                ": its weights or settings are not usable"));
      if (tool.json) {
        kv::Json j = kv::Json::object();
        j.set("model", c.name).set("paragraphs", int64_t(docs.size()));
        j.set("tokens_scored", scored).set("perplexity", value).set("seconds", secs);
        std::printf("%s\n", j.dump().c_str());
      } else
        std::printf("perplexity %.4f over %lld tokens of %zu paragraphs (%s, %.1f tokens/s)\n",
                    value, (long long)scored, docs.size(), c.name.c_str(), double(scored) / secs);
      return;
    }

    // The input as tokens: text gets BOS and the model's tokenizer; --tokens is taken as is.
    std::vector<int32_t> all;
    std::string text;
    if (!tokens_file.empty()) {
      all = read_token_ids(tokens_file);
    } else {
      if (!text_file.empty())
        text = checked_text(read_text(text_file), "'" + text_file + "'");
      else if (p_opt->count())
        text = checked_text(prompt_text, "the prompt");
      else
        throw kv::Error(kv::Exit::usage, "no prompt: pass -p TEXT, -f FILE or --tokens FILE");
      all = model->tokenizer().encode(text, true);
    }
    if (all.empty() || (all.size() == 1 && tokens_file.empty()))
      throw kv::Error(kv::Exit::data, "the prompt is empty (no tokens besides BOS)");
    std::vector<int32_t> probe_tokens;
    if (!probe_file.empty()) {
      probe_tokens = model->tokenizer().encode(
          checked_text(read_text(probe_file), "'" + probe_file + "'"), false);
      if (probe && int64_t(probe_tokens.size()) > probe) probe_tokens.resize(size_t(probe));
    }
    const int64_t from_input = probe_file.empty() ? probe : 0;
    int64_t T = int64_t(all.size()) - from_input;
    if (ctx) T = std::min<int64_t>(T, ctx);
    if (T < 1 || T + from_input > int64_t(all.size()))
      throw kv::Error(kv::Exit::usage,
                      kv::str("the input has ", all.size(), " tokens; a prompt plus --probe ",
                              probe, " needs more"));
    if (T > c.context)
      throw kv::Error(kv::Exit::usage,
                      kv::str("the prompt has ", T, " tokens but the model's context is ",
                              c.context, "; cap it with --ctx N"));
    std::vector<int32_t> prompt(all.begin(), all.begin() + T);
    if (probe_file.empty()) probe_tokens.assign(all.begin() + T, all.begin() + T + from_input);
    std::string prompt_text_out =
        tokens_file.empty() && model->has_tokenizer() ? model->tokenizer().decode(prompt) : "";

    if (generate > 0) {
      auto out = kv::generate_greedy(*model, prompt, generate);
      std::string s = model->has_tokenizer() ? model->tokenizer().decode(out) : "";
      if (!model->has_tokenizer())
        for (int32_t id : out) s += std::to_string(id) + " ";
      s += "\n";
      std::fwrite(s.data(), 1, s.size(), stdout);  // (whole: a token may decode to a NUL)
      std::fflush(stdout);
      if (tool.output == "-") return;  // stdout carried the text: no snapshot without -o
    }

    kv::CaptureOptions opt;
    opt.dtype = dtype == "f32"    ? kv::DType::f32
                : dtype == "bf16" ? kv::DType::bf16
                                  : kv::DType::f16;
    opt.window = window;
    opt.attn_stats = attn_stats;
    auto t0 = std::chrono::steady_clock::now();
    opt.progress = [&](int64_t done, int64_t total) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      tool.progress(
          kv::str("prefill ", int64_t(double(done) / std::max(s, 1e-9)), " tokens/s, tokens"), done,
          total);
    };
    kv::Snapshot snap = kv::capture(*model, prompt, probe_tokens, prompt_text_out, opt);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    tool.progress_done();
    if (!tool.quiet && isatty(2))
      std::fprintf(stderr, "kv-capture: %lld tokens in %.2f s (%.1f tokens/s)\n",
                   (long long)(T + int64_t(probe_tokens.size())), secs,
                   double(T + int64_t(probe_tokens.size())) / secs);
    tool.stamp(snap.header);
    kv::write_snapshot(tool.output, snap, tool.write_options(""));
  });
}
