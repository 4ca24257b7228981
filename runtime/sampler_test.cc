#include "runtime/sampler.h"

#include <map>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

TEST(SamplerTest, GreedyTakesTheLargestAndTheLowestIdOnTies) {
  SamplingParams p;
  EXPECT_EQ(SampleToken({0.1f, 2.0f, -1.0f, 2.0f}, p, {}, 0), 1);
}

TEST(SamplerTest, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  SamplingParams p;
  p.repetition_penalty = 2;
  // Token 1 (3.0 -> 1.5) was seen, token 0 (2.0) was not.
  EXPECT_EQ(SampleToken({2.0f, 3.0f}, p, {1}, 0), 0);
  // A negative logit seen gets more negative: -0.5 -> -1.0 < -0.8.
  EXPECT_EQ(SampleToken({-0.8f, -0.5f}, p, {1}, 0), 0);
}

TEST(SamplerTest, FrequencyPenaltyCountsOnlyTheOutput) {
  SamplingParams p;
  p.frequency_penalty = 0.6;
  // Token 1 appears twice in the output (-1.2): 2.0 - 1.2 < 1.0. The
  // prompt's token 1 is not counted.
  EXPECT_EQ(SampleToken({1.0f, 2.0f}, p, {1, 1, 1}, 2), 0);
  EXPECT_EQ(SampleToken({1.0f, 2.0f}, p, {1, 1, 1}, 1), 1);
}

TEST(SamplerTest, TheSameSeedAndIndexDrawTheSameToken) {
  SamplingParams p;
  p.temperature = 1;
  p.seed = 1234;
  std::vector<float> logits(50, 0.0f);
  for (int i = 0; i < 50; ++i) logits[i] = 0.1f * (i % 7);
  for (int64_t index = 0; index < 20; ++index) {
    EXPECT_EQ(SampleToken(logits, p, {}, index), SampleToken(logits, p, {3, 4}, index));
  }
}

TEST(SamplerTest, DrawsFollowTheDistribution) {
  SamplingParams p;
  p.temperature = 1;
  // Probabilities 0.1, 0.2, 0.7.
  std::vector<float> logits = {std::log(0.1f), std::log(0.2f), std::log(0.7f)};
  std::map<int64_t, int> n;
  for (int64_t i = 0; i < 20000; ++i) ++n[SampleToken(logits, p, {}, i)];
  EXPECT_NEAR(n[0] / 20000.0, 0.1, 0.015);
  EXPECT_NEAR(n[1] / 20000.0, 0.2, 0.015);
  EXPECT_NEAR(n[2] / 20000.0, 0.7, 0.015);
}

TEST(SamplerTest, TopKAndTopPKeepOnlyTheMostLikely) {
  SamplingParams p;
  p.temperature = 1;
  std::vector<float> logits = {std::log(0.1f), std::log(0.25f), std::log(0.65f)};
  p.top_k = 1;
  for (int64_t i = 0; i < 200; ++i) EXPECT_EQ(SampleToken(logits, p, {}, i), 2);
  p.top_k = 0;
  p.top_p = 0.8;  // 0.65 < 0.8 <= 0.9: tokens 2 and 1
  std::map<int64_t, int> n;
  for (int64_t i = 0; i < 2000; ++i) ++n[SampleToken(logits, p, {}, i)];
  EXPECT_EQ(n[0], 0);
  EXPECT_GT(n[1], 0);
}

TEST(SamplerTest, ParametersOutOfRangeAreRefusedNamingThem) {
  SamplingParams p;
  p.top_p = 0;
  EXPECT_THAT(CheckSampling(p, 10).message(), HasSubstr("top_p must be in (0, 1]"));
  p = SamplingParams();
  p.temperature = -1;
  EXPECT_THAT(CheckSampling(p, 10).message(), HasSubstr("temperature"));
  p = SamplingParams();
  p.stop_token_ids = {10};
  EXPECT_THAT(CheckSampling(p, 10).message(), HasSubstr("stop token id 10 is not in [0, 10)"));
  p = SamplingParams();
  p.max_tokens = 0;
  EXPECT_THAT(CheckSampling(p, 10).message(), HasSubstr("max_tokens"));
  p.max_tokens = int64_t{1} << 62;  // prompt + max_tokens would overflow
  EXPECT_THAT(CheckSampling(p, 10).message(), HasSubstr("max_tokens must be in [1, 16777216]"));
  EXPECT_TRUE(CheckSampling(SamplingParams(), 10).ok());
}

// The sampling floats reach the last stage as float32: a value fine as a
// double but not as float32 (1e39 is inf there, 1e-46 and 1e-300 are 0)
// was accepted here and refused by the stage's sample_tokens, failing
// every sequence that shared the step.
TEST(SamplerTest, ValuesTheLastStageReadsAsInfOrZeroAreRefusedHere) {
  SamplingParams p;
  p.temperature = 1e39;
  EXPECT_THAT(CheckSampling(p, 10).message(), HasSubstr("temperature must be a finite float32"));
  p = SamplingParams();
  p.top_p = 1e-46;
  EXPECT_THAT(CheckSampling(p, 10).message(), HasSubstr("top_p must be in (0, 1]"));
  p = SamplingParams();
  p.repetition_penalty = 1e-300;
  EXPECT_THAT(CheckSampling(p, 10).message(), HasSubstr("repetition_penalty"));
  p = SamplingParams();
  p.frequency_penalty = -1e39;
  EXPECT_THAT(CheckSampling(p, 10).message(), HasSubstr("frequency_penalty"));
  p = SamplingParams();
  p.temperature = 3e38;  // the largest float32 values still pass
  p.frequency_penalty = 3e38;
  EXPECT_TRUE(CheckSampling(p, 10).ok());
}

// A temperature far below kGreedyBelow made x / t infinite and every
// probability NaN, so the draw fell through to the least likely token.
TEST(SamplerTest, ATinyTemperatureIsGreedy) {
  const std::vector<float> logits = {1, 5, 3, -2};
  SamplingParams p;
  for (double t : {1e-320, 1e-30, 1e-6}) {
    p.temperature = t;
    EXPECT_EQ(SampleToken(logits, p, {}, 0), 1) << t;
  }
}

// sample_tokens' rows: an empty vocabulary has no token to pick (the
// sampler read order[0] of nothing), and a negative count of tokens
// generated is no count (the frequency penalty read it as the whole
// context).
TEST(SamplerTest, SampleRowsRefuseAnEmptyVocabularyAndANegativeCount) {
  const float floats[4] = {0.5f, 1, 1, 0};
  int64_t ints[3] = {0, 7, 0};
  const int64_t ends[1] = {0};
  EXPECT_TRUE(SampleRows(floats, ints, ends, 1, 0, 10).ok());
  EXPECT_THAT(SampleRows(floats, ints, ends, 1, 0, 0).status().message(),
              HasSubstr("empty vocabulary ([1, 0])"));
  EXPECT_TRUE(SampleRows(floats, ints, ends, 0, 0, 0).ok());  // no rows, nothing to pick
  ints[2] = -1;
  EXPECT_THAT(SampleRows(floats, ints, ends, 1, 0, 10).status().message(),
              HasSubstr("sequence 0: tokens generated so far must be >= 0, got -1"));
}

}  // namespace
}  // namespace pipeserve
