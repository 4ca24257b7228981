// Picking the next token from a step's logits: greedy, temperature, top-k,
// top-p, repetition and frequency penalties. The last stage of a generation
// model runs it (the sample_tokens op), or the coordinator, for models whose
// logits cover every position. A seeded
// request draws token i with a generator seeded by (seed, i) alone, so its
// tokens depend on its own prompt and logits only: not on what else shares
// the batch, and not on whether a step ran twice (a sequence rebuilt after
// a failure draws the same numbers again).
//
//   SamplingParams p;  p.temperature = 0.8;  p.top_p = 0.95;  p.seed = 7;
//   RETURN_IF_ERROR(CheckSampling(p, vocab));
//   int64_t next = SampleToken(logits_row, p, context, generated.size());
#ifndef PIPESERVE_RUNTIME_SAMPLER_H_
#define PIPESERVE_RUNTIME_SAMPLER_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace pipeserve {

struct SamplingParams {
  double temperature = 0;          // under kGreedyBelow (1e-5): greedy (the most likely token)
  int64_t top_k = 0;               // 0: every token
  double top_p = 1;                // nucleus: the fewest tokens holding p
  double repetition_penalty = 1;   // > 1 discourages any token seen (prompt or output)
  double frequency_penalty = 0;    // subtracted once per earlier occurrence in the output
  std::vector<int64_t> stop_token_ids;
  int64_t max_tokens = 16;
  uint64_t seed = 0;
};

// The most tokens one request may ask for.
constexpr int64_t kMaxTokens = int64_t{1} << 24;

// kInvalidArgument naming the field out of range (temperature < 0 or not
// finite, top_p outside (0, 1], top_k < 0, repetition_penalty <= 0,
// max_tokens outside [1, kMaxTokens], a stop token outside the vocabulary).
// The floats travel to the last stage as float32 (sample_tokens' floats),
// so each is checked as float32 too: a temperature of 1e39 (inf there) or
// a top_p of 1e-46 (0 there) is refused here, not by the stage, where it
// would fail every sequence of the step.
absl::Status CheckSampling(const SamplingParams& p, int64_t vocab);

// The next token after `context` (prompt then output so far) of which
// `generated` are output, from `logits` (one row of the vocabulary).
int64_t SampleToken(absl::Span<const float> logits, const SamplingParams& p,
                    absl::Span<const int64_t> context, int64_t generated);

// The sample_tokens op's rows (graph/op_schema.cc): row i's parameters
// from floats [n, 4] (temperature, top_p, repetition, frequency) and ints
// [n, 3] (top_k, seed, tokens generated so far, >= 0), each checked
// against `vocab` (> 0 when n > 0), and its context ending at ends[i] (ends
// non-decreasing, at most `context`). kInvalidArgument "sample_tokens:
// sequence i..." naming the first row that does not fit.
absl::Status CheckSampleRows(const float* floats, const int64_t* ints, const int64_t* ends,
                             int64_t n, int64_t context, int64_t vocab);

// Row i's parameters, unchecked.
SamplingParams SampleRowAt(const float* floats, const int64_t* ints, int64_t i);

// The rows CheckSampleRows accepts, or its error.
absl::StatusOr<std::vector<SamplingParams>> SampleRows(const float* floats, const int64_t* ints,
                                                       const int64_t* ends, int64_t n,
                                                       int64_t context, int64_t vocab);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_SAMPLER_H_
