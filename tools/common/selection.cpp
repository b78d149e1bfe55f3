#include "common/selection.h"

#include <cstdint>
#include <limits>

#include "common/tool.h"
#include "kv/error.h"
#include "kv/str.h"

namespace kvt {

void SelectionOptions::add(CLI::App& app, const std::string& verb, bool required) {
  score_option_ =
      app.add_option("-s,--score", score_,
                     "What to keep: window (StreamingLLM sinks + recent), h2o (accumulated "
                     "attention + recent), tova (last query's attention), snapkv (pooled "
                     "observation-window attention), knorm (low key norm), random")
          ->required(required)
          ->check(CLI::IsMember({"window", "h2o", "tova", "snapkv", "knorm", "random"}));
  app.add_option("-a,--alloc", alloc_,
                 "Budget per layer and head: uniform, pyramid (PyramidKV), adaptive (AdaKV)")
      ->default_val("uniform")
      ->check(CLI::IsMember({"uniform", "pyramid", "adaptive"}));
  budget_ = app.add_option("-b,--budget", o_.budget,
                           "Entries each KV head keeps (the mean per head for pyramid and "
                           "adaptive); sinks, recent and window count inside it; the rest are " +
                               verb);
  ratio_ =
      app.add_option("-r,--ratio", o_.ratio, "Fraction of each head's entries to keep, in (0, 1]")
          ->excludes(budget_);
  app.add_option("--sink", o_.sink,
                 "First entries of each head always kept (default: 4 for window, else 0)")
      ->check(integer_in(0, 1 << 30));
  app.add_option("--recent", o_.recent,
                 "Most recent entries always kept (default: half the budget for h2o, else 0; "
                 "window without a budget keeps --sink + --recent)")
      ->check(integer_in(0, 1 << 30));
  app.add_option("--group-agg", group_agg_,
                 "How the query heads of a KV group combine their attention: mean or max")
      ->default_val("mean")
      ->check(CLI::IsMember({"mean", "max"}));
  pool_option_ =
      app.add_option("--pool", pool_, "snapkv: pooling of the votes along the tokens, avg or max")
          ->default_val("avg")
          ->check(CLI::IsMember({"avg", "max"}));
  kernel_ = app.add_option("--kernel", o_.kernel, "snapkv: pooling width (odd)")->default_val(5);
  beta_ = app.add_option("--beta", o_.beta, "pyramid: how steep the schedule is (>= 1)")
              ->default_val(20);
  alpha_ = app.add_option("--alpha", o_.alpha,
                          "adaptive: fraction of the budget every head keeps of its own")
               ->default_val(0.2);
  seed_ = app.add_option("--seed", o_.seed, "random: seed (same seed, same selection)")
              ->check(integer_in<uint64_t>(0, std::numeric_limits<uint64_t>::max()))
              ->default_val(1);
}

kv::EvictOptions SelectionOptions::resolve() {
  // 0 means "not given" inside EvictOptions; given on the command line it is impossible.
  if (budget_->count() && o_.budget < 1)
    throw kv::Error(kv::Exit::usage, kv::str("--budget ", o_.budget, " must be at least 1"));
  if (ratio_->count() && !(o_.ratio > 0 && o_.ratio <= 1))
    throw kv::Error(kv::Exit::usage, kv::str("--ratio ", o_.ratio, " must be in (0, 1]"));
  if (score_.empty()) throw kv::Error(kv::Exit::usage, "--score is required");
  refuse_ignored({{pool_option_, "--score snapkv", score_ == "snapkv"},
                  {kernel_, "--score snapkv", score_ == "snapkv"},
                  {seed_, "--score random", score_ == "random"},
                  {beta_, "--alloc pyramid", alloc_ == "pyramid"},
                  {alpha_, "--alloc adaptive", alloc_ == "adaptive"}});
  o_.score = kv::parse_evict_score(score_);
  o_.alloc = kv::parse_evict_alloc(alloc_);
  o_.group_agg = kv::parse_group_agg(group_agg_);
  o_.pool = kv::parse_pool(pool_);
  return o_;
}

}  // namespace kvt
