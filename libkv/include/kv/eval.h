// Evaluation: what a candidate cache (evicted, merged, compressed...) costs against the reference
// cache it came from. Attention fidelity compares the attention outputs of the probe queries over
// both caches; model fidelity teacher-forces the probe through the runtime with each cache.
// Definitions follow ../shared/METHODS.md ("Evaluation"); man/kv-eval.1 states them for users.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kv/model.h"
#include "kv/snapshot.h"
#include "kv/tokenizer.h"

namespace kv {

// Throws Error(Exit::data) naming the first field in which the two snapshots differ, when they
// are not two caches of the same token sequence under the same model. The candidate may hold
// fewer KV heads, dividing the reference's (kv-merge -m heads).
void check_comparable(const Header& reference, const Header& candidate);

// Attention fidelity of one layer, as sums over (query head, probe query) rows, so layers and
// files add up; divide by `rows` for means.
struct AttentionFidelity {
  int64_t rows = 0;
  double rel_error = 0;    // ||o_cand - o_ref|| / ||o_ref||
  double cosine = 0;       // o_cand . o_ref / (||o_cand|| ||o_ref||)
  double mass_recall = 0;  // reference attention on positions the candidate still holds
  double topk_recall = 0;  // share of the reference's top-k positions the candidate holds
  AttentionFidelity& operator+=(const AttentionFidelity& o);
};

// Compares layer l of both caches on the probe queries stored in the reference (`topk` for the
// top-k recall). Needs header.has_probe() (Error(Exit::data) naming kv-capture --probe).
AttentionFidelity attention_fidelity(const Header& reference, const Layer& ref_layer,
                                     const Layer& cand_layer, int topk);

// Next-token fidelity over the probe tokens, from the runtime with each cache loaded.
struct ModelFidelity {
  int64_t tokens = 0;        // probe rows compared
  double ppl_reference = 0;  // perplexity of probe[1..P-1] given the reference cache
  double ppl_candidate = 0;
  double kl = 0;              // mean KL(p_ref || p_cand) over the probe rows
  double top1_agreement = 0;  // share of rows whose argmax agrees
};

// Next-token logits [P, vocab] of the probe teacher-forced after the snapshot's cache.
std::vector<float> probe_logits(const Model& model, const Header& header,
                                const std::vector<Layer>& layers);

// Checks that `model` is the one the reference was captured with: its probe logits after the
// reference cache (probe_logits) must match the ones kv-capture stored in the header, to within
// a mean KL of kModelCheckKl. An f32 cache gives them bit for bit; stories260K's f16 cache, KL
// 1.5e-7 (its keys and values rounded); the same model with its attention norms scaled by 1.02,
// 6e-4. kvtk's GGUF and llama2.c loaders give identical logits. Error(Exit::data) otherwise;
// nothing to check without stored logits.
constexpr double kModelCheckKl = 1e-4;
void check_model_reproduces_capture(const Header& reference, const std::vector<float>& logits);

// Compares two probe logit tables [P, vocab] (reference first) for the probe tokens.
ModelFidelity compare_logits(const std::vector<float>& ref, const std::vector<float>& cand,
                             int64_t vocab, const std::vector<int32_t>& probe_tokens);

// Seconds of one decode step of attention over every layer and KV head of a cache (best of
// `reps`): each head's entries are read in their stored type for the query heads of its group;
// mass enters as a log bias. `queries` holds [n_layers][H_q][D] f32. On the CPU, OpenMP threads
// over KV heads (kvk::attend_head); a layer whose k and v are kept as stored codes
// (ReadOptions::keep_stored) is timed on them where a kernel exists: q4_0 blocks
// (kvk::attend_head_q4_0; not Hadamard-rotated, kvk::q4_0_codes_supported) and KIVI-2
// (kvk::attend_head_kivi2 through kv::kivi2_heads, kvk::kivi2_codes_supported); other encoded
// layers on their decoded values. With `cuda`, the cache is uploaded first (heads padded to the
// layer's longest, padding masked) and each layer is one kvk::cuda::attend_heads.
// The codes decode_step_seconds times every layer of `layers` on (CPU only): "q4_0", "kivi2",
// or "" when some layer is timed on decoded values.
std::string decodes_on_codes(const ModelInfo& model, const std::vector<Layer>& layers);

double decode_step_seconds(const ModelInfo& model, const std::vector<Layer>& layers,
                           const std::vector<float>& queries, int reps, bool cuda = false);

// Teacher-forces `cue` after the snapshot's cache, then decodes up to `steps` tokens greedily
// (stopping after EOS). Returns the generated tokens.
std::vector<int32_t> generate_after(const Model& model, const Header& header,
                                    const std::vector<Layer>& layers,
                                    const std::vector<int32_t>& cue, int64_t steps);

// The recall task: a sentence of the prompt's first half, cued after the prompt by its first
// tokens, must be continued exactly.
struct RecallItem {
  int64_t start = 0;            // position of the sentence in the prompt
  std::vector<int32_t> cue;     // its first kRecallCue tokens
  std::vector<int32_t> target;  // the next kRecallTarget tokens
};
constexpr int kRecallCue = 4, kRecallTarget = 2;

// Up to `max_items` items, deterministic: sentence starts (tokens after one whose text ends in
// '.', '!', '?' or a newline) in the first half of the prompt whose cue occurs nowhere else in
// the prompt, spread evenly over the candidates.
std::vector<RecallItem> recall_items(const Tokenizer& tokenizer, const std::vector<int32_t>& prompt,
                                     int max_items);

// Exact-match rate of the items with the given cache.
double recall_rate(const Model& model, const Header& header, const std::vector<Layer>& layers,
                   const std::vector<RecallItem>& items);

}  // namespace kv
