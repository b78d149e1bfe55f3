// The selection options kv-evict and kv-merge share (one definition, so the two tools accept and
// document the same scores and budgets): --score, --alloc, --budget/--ratio, --sink, --recent,
// --group-agg, --pool, --kernel, --beta, --alpha, --seed.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include "kv/evict.h"

namespace kvt {

class SelectionOptions {
 public:
  // Adds the options to `app`; `verb` ("keep", "merge into") words the --budget help.
  // `required`: --score must be given (kv-merge's heads method selects nothing).
  void add(CLI::App& app, const std::string& verb, bool required = true);
  // Whether --score, --budget or --ratio was given.
  bool given() const { return score_option_->count() || budget_->count() || ratio_->count(); }
  // After parsing: the names resolved and the values checked (Error(Exit::usage)).
  kv::EvictOptions resolve();

 private:
  kv::EvictOptions o_;
  std::string score_, alloc_ = "uniform", group_agg_ = "mean", pool_ = "avg";
  CLI::Option* score_option_ = nullptr;
  CLI::Option* budget_ = nullptr;
  CLI::Option* ratio_ = nullptr;
  // Options of one score or allocation: refused with the others rather than ignored.
  CLI::Option *pool_option_ = nullptr, *kernel_ = nullptr, *beta_ = nullptr, *alpha_ = nullptr,
              *seed_ = nullptr;
};

}  // namespace kvt
