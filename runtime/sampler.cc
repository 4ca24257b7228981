#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "runtime/sample_draw.h"

namespace pipeserve {
namespace {

std::vector<double> Penalised(absl::Span<const float> logits, const SamplingParams& p,
                              absl::Span<const int64_t> context, int64_t generated) {
  std::vector<double> x(logits.begin(), logits.end());
  const int64_t vocab = static_cast<int64_t>(x.size());
  if (p.repetition_penalty != 1) {
    std::vector<bool> seen(vocab, false);
    for (int64_t t : context) {
      if (t >= 0 && t < vocab) seen[t] = true;
    }
    for (int64_t t = 0; t < vocab; ++t) {
      if (seen[t]) x[t] = x[t] > 0 ? x[t] / p.repetition_penalty : x[t] * p.repetition_penalty;
    }
  }
  if (p.frequency_penalty != 0) {
    for (size_t i = context.size() - std::min<size_t>(generated, context.size());
         i < context.size(); ++i) {
      if (context[i] >= 0 && context[i] < vocab) x[context[i]] -= p.frequency_penalty;
    }
  }
  return x;
}

}  // namespace

absl::Status CheckSampling(const SamplingParams& p, int64_t vocab) {
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  // As the last stage reads them (float32).
  const float temperature = static_cast<float>(p.temperature);
  const float top_p = static_cast<float>(p.top_p);
  const float repetition = static_cast<float>(p.repetition_penalty);
  const float frequency = static_cast<float>(p.frequency_penalty);
  if (!(p.temperature >= 0) || !std::isfinite(temperature)) {
    return bad("temperature must be a finite float32 number >= 0, got ", p.temperature);
  }
  if (!(p.top_p > 0 && p.top_p <= 1 && top_p > 0)) {
    return bad("top_p must be in (0, 1] and above 0 as a float32 number, got ", p.top_p);
  }
  if (p.top_k < 0) return bad("top_k must be >= 0 (0: every token), got ", p.top_k);
  if (!(repetition > 0) || !std::isfinite(repetition)) {
    return bad("repetition_penalty must be a finite float32 number > 0, got ",
               p.repetition_penalty);
  }
  if (!std::isfinite(frequency)) {
    return bad("frequency_penalty must be a finite float32 number, got ", p.frequency_penalty);
  }
  if (p.max_tokens < 1 || p.max_tokens > kMaxTokens) {
    return bad("max_tokens must be in [1, ", kMaxTokens, "], got ", p.max_tokens);
  }
  for (int64_t t : p.stop_token_ids) {
    if (t < 0 || t >= vocab) return bad("stop token id ", t, " is not in [0, ", vocab, ")");
  }
  return absl::OkStatus();
}

int64_t SampleToken(absl::Span<const float> logits, const SamplingParams& p,
                    absl::Span<const int64_t> context, int64_t generated) {
  std::vector<double> x = Penalised(logits, p, context, generated);
  if (p.temperature < kGreedyBelow) {  // the first of the largest: ties go to the lowest id
    return std::max_element(x.begin(), x.end()) - x.begin();
  }
  std::vector<int64_t> order(x.size());
  std::iota(order.begin(), order.end(), 0);
  // Most likely first; equal logits by id, so the order is deterministic.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x[a] > x[b]; });
  size_t keep = p.top_k > 0 ? std::min<size_t>(p.top_k, order.size()) : order.size();
  std::vector<double> prob(keep);
  const double top = x[order[0]] / p.temperature;
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += prob[i] = std::exp(x[order[i]] / p.temperature - top);
  if (p.top_p < 1) {
    double acc = 0;
    size_t n = 0;
    while (n < keep && acc < p.top_p * sum) acc += prob[n++];
    keep = std::max<size_t>(n, 1);
    sum = acc;
  }
  const double u = UniformDraw(p.seed, generated) * sum;
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += prob[i];
    if (u < acc) return order[i];
  }
  return order[keep - 1];
}

SamplingParams SampleRowAt(const float* floats, const int64_t* ints, int64_t i) {
  SamplingParams p;
  p.temperature = floats[i * 4];
  p.top_p = floats[i * 4 + 1];
  p.repetition_penalty = floats[i * 4 + 2];
  p.frequency_penalty = floats[i * 4 + 3];
  p.top_k = ints[i * 3];
  p.seed = static_cast<uint64_t>(ints[i * 3 + 1]);
  return p;
}

absl::Status CheckSampleRows(const float* floats, const int64_t* ints, const int64_t* ends,
                             int64_t n, int64_t context, int64_t vocab) {
  if (n > 0 && vocab <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sample_tokens: the logits have an empty vocabulary ([", n, ", 0]): no token to pick"));
  }
  int64_t begin = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (ends[i] < begin || ends[i] > context) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sample_tokens: sequence ", i, "'s context ends at ", ends[i], ", outside [", begin,
          ", ", context, "]"));
    }
    if (ints[i * 3 + 2] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("sample_tokens: sequence ", i,
                                                     ": tokens generated so far must be >= 0, got ",
                                                     ints[i * 3 + 2]));
    }
    if (absl::Status s = CheckSampling(SampleRowAt(floats, ints, i), vocab); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("sample_tokens: sequence ", i, ": ", s.message()));
    }
    begin = ends[i];
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SamplingParams>> SampleRows(const float* floats, const int64_t* ints,
                                                       const int64_t* ends, int64_t n,
                                                       int64_t context, int64_t vocab) {
  absl::Status s = CheckSampleRows(floats, ints, ends, n, context, vocab);
  if (!s.ok()) return s;
  std::vector<SamplingParams> rows(n);
  for (int64_t i = 0; i < n; ++i) rows[i] = SampleRowAt(floats, ints, i);
  return rows;
}

}  // namespace pipeserve
