#include "server/coordinator/generator.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kVocab = 37;

// The next token after `context`: what FakeModel's logits pick greedily.
int64_t NextToken(const std::vector<int64_t>& context) {
  int64_t h = 7;
  for (int64_t t : context) h = (h * 31 + t) % 1000003;
  return h % kVocab;
}

std::vector<int64_t> Reference(std::vector<int64_t> prompt, int64_t n) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(NextToken(prompt));
    prompt.push_back(out.back());
  }
  return out;
}

// A cache-aware model as the stages run it: it keeps each sequence's
// tokens by id (its "cache"), refuses a step whose positions it does not
// hold (as KvCache does), and returns, for every token, logits whose
// largest entry is NextToken of the sequence up to that token.
class FakeModel {
 public:
  absl::StatusOr<std::vector<Tensor>> Step(const std::vector<Tensor>& in) {
    const auto* tokens = static_cast<const int64_t*>(in[0].raw_data());
    const auto* positions = static_cast<const int64_t*>(in[1].raw_data());
    const auto* seq = static_cast<const int64_t*>(in[2].raw_data());
    const auto* ids = static_cast<const int64_t*>(in[4].raw_data());
    const int64_t t = in[0].dim(1);
    Tensor logits = Tensor::Zeros({1, t, kVocab});
    absl::SleepFor(step_time);
    absl::MutexLock l(&mu_);
    ++steps_;
    max_tokens_per_step_ = std::max(max_tokens_per_step_, t);
    for (int64_t i = 0; i < t; ++i) {
      std::vector<int64_t>& held = cache_[ids[seq[i]]];
      if (positions[i] > static_cast<int64_t>(held.size())) {
        return absl::FailedPreconditionError(absl::StrCat(
            "sequence ", ids[seq[i]], ": position ", held.size(), " is not in this stage's cache"));
      }
      held.resize(positions[i]);
      held.push_back(tokens[i]);
      for (int64_t v = 0; v < kVocab; ++v) logits.data()[i * kVocab + v] = 0.01f * (v % 5);
      logits.data()[i * kVocab + NextToken(held)] = 3.0f;
    }
    return std::vector<Tensor>{logits};
  }
  void Lose() {  // a stage server replaced
    absl::MutexLock l(&mu_);
    cache_.clear();
  }
  int64_t steps() {
    absl::MutexLock l(&mu_);
    return steps_;
  }
  int64_t max_tokens_per_step() {
    absl::MutexLock l(&mu_);
    return max_tokens_per_step_;
  }

  // How long a step takes (a step that returns at once lets a whole
  // generation finish before a test can act on it).
  absl::Duration step_time = absl::ZeroDuration();

 private:
  absl::Mutex mu_;
  std::map<int64_t, std::vector<int64_t>> cache_;
  int64_t steps_ = 0, max_tokens_per_step_ = 0;
};

GenerationConfig Config(int64_t blocks) {
  GenerationConfig c;
  c.spec.set_tokens("ids");
  c.spec.set_logits("logits");
  c.spec.set_block_size(4);
  c.spec.set_max_positions(1000);
  c.spec.set_vocab(kVocab);
  c.spec.set_num_blocks(blocks);
  c.input_names = {"ids", "kv_positions", "kv_seq", "kv_blocks", "kv_seq_ids"};
  return c;
}

struct Outcome {
  absl::Status status;
  std::vector<int64_t> tokens;
  std::string finish;
};

Outcome GenerateOne(Generator& gen, std::vector<int64_t> prompt, int64_t max_tokens,
                SamplingParams sampling = {}) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.sampling = sampling;
  r.sampling.max_tokens = max_tokens;
  Outcome run;
  run.status = gen.Generate(r, [&](const GeneratedToken& t) {
    EXPECT_EQ(t.index, static_cast<int64_t>(run.tokens.size()));
    run.tokens.push_back(t.id);
    run.finish = t.finish_reason;
    return true;
  });
  return run;
}

class GeneratorTest : public ::testing::Test {
 protected:
  // Generates `max_tokens` after `prompt` on a thread of its own, returned
  // once the sequence holds its blocks; *out gets the outcome.
  std::thread StartRunning(Generator& gen, std::vector<int64_t> prompt, int64_t max_tokens,
                           Outcome* out) {
    std::thread t([&gen, prompt, max_tokens, out] { *out = GenerateOne(gen, prompt, max_tokens); });
    while (gen.Stats().running == 0) absl::SleepFor(absl::Milliseconds(1));
    return t;
  }

  std::unique_ptr<Generator> Make(int64_t blocks = 512, GeneratorOptions options = {}) {
    return std::make_unique<Generator>(Config(blocks), options,
                                       [this](const std::vector<Tensor>& in, absl::Time, int) {
                                         return model_.Step(in);
                                       });
  }
  FakeModel model_;
};

TEST_F(GeneratorTest, MaxPositionsIsTheModelsOrWhatTheCacheHolds) {
  EXPECT_EQ(Make(512)->MaxPositions(), 1000);  // the model's
  EXPECT_EQ(Make(10)->MaxPositions(), 40);     // 10 blocks of 4 tokens
  auto gen = Make(10);
  GenerationRequest r;
  r.prompt = {1, 2};
  r.sampling.max_tokens = 40;
  EXPECT_EQ(gen->Check(r).code(), absl::StatusCode::kInvalidArgument) << "41 positions";
  r.sampling.max_tokens = 39;
  EXPECT_TRUE(gen->Check(r).ok());
}

TEST_F(GeneratorTest, GreedyTokensEqualTheReference) {
  auto gen = Make();
  Outcome run = GenerateOne(*gen, {1, 2, 3}, 12);
  ASSERT_TRUE(run.status.ok()) << run.status;
  EXPECT_EQ(run.tokens, Reference({1, 2, 3}, 12));
  EXPECT_EQ(run.finish, "length");
  EXPECT_EQ(gen->Stats().blocks_used, 0);
}

TEST_F(GeneratorTest, SixtyFourConcurrentSequencesEachEqualItsRunAlone) {
  GeneratorOptions options;
  options.max_step_tokens = 24;  // prompts of up to 40 tokens prefill in chunks
  auto gen = Make(512, options);
  std::vector<Outcome> runs(64);
  std::vector<std::vector<int64_t>> prompts(64);
  std::vector<std::thread> threads;
  for (int i = 0; i < 64; ++i) {
    for (int k = 0; k < 1 + (i * 7) % 40; ++k) prompts[i].push_back((i * 13 + k * 5) % kVocab);
    threads.emplace_back([&, i] { runs[i] = GenerateOne(*gen, prompts[i], 1 + i % 17); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 64; ++i) {
    ASSERT_TRUE(runs[i].status.ok()) << i << ": " << runs[i].status;
    EXPECT_EQ(runs[i].tokens, Reference(prompts[i], 1 + i % 17)) << "sequence " << i;
  }
  EXPECT_LE(model_.max_tokens_per_step(), 24);
  EXPECT_LT(model_.steps(), 64 * 17) << "sequences shared steps";
  EXPECT_EQ(gen->Stats().blocks_used, 0);
}

// With replicas, every step holds sequences of one home lane and asks to
// run on that lane, where their caches are.
TEST_F(GeneratorTest, EachStepRunsOnTheLaneHoldingItsSequences) {
  GenerationConfig config = Config(512);
  config.lanes = 3;
  absl::Mutex mu;
  std::map<int, int> steps_per_lane;
  int misplaced = 0;
  Generator gen(config, GeneratorOptions{}, [&](const std::vector<Tensor>& in, absl::Time, int lane) {
    const auto* ids = static_cast<const int64_t*>(in[4].raw_data());
    absl::MutexLock l(&mu);
    ++steps_per_lane[lane];
    for (int64_t i = 0; i < in[4].numel(); ++i) misplaced += ids[i] % 3 != lane ? 1 : 0;
    return model_.Step(in);
  });
  std::vector<Outcome> runs(12);
  std::vector<std::thread> threads;
  for (int i = 0; i < 12; ++i) {
    threads.emplace_back([&, i] { runs[i] = GenerateOne(gen, {i % kVocab, 1}, 5); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 12; ++i) {
    ASSERT_TRUE(runs[i].status.ok()) << runs[i].status;
    EXPECT_EQ(runs[i].tokens, Reference({i % kVocab, 1}, 5));
  }
  absl::MutexLock l(&mu);
  EXPECT_EQ(misplaced, 0);
  EXPECT_EQ(steps_per_lane.size(), 3u) << "12 sequences spread over the 3 lanes";
  EXPECT_EQ(steps_per_lane.count(-1), 0u);
}

// With one step in flight (stages sharing cores) the lanes take turns: a
// second lane's sequences start within the first steps, not once the
// first lane's have all finished (they held their blocks unprefilled).
TEST_F(GeneratorTest, OneStepInFlightServesEveryLaneInTurn) {
  GenerationConfig config = Config(512);
  config.lanes = 2;
  GeneratorOptions options;
  options.steps_in_flight = 1;
  absl::Mutex mu;
  std::vector<int> lanes;  // each step's lane, in order
  std::atomic<Generator*> generator{nullptr};
  Generator gen(config, options, [&](const std::vector<Tensor>& in, absl::Time, int lane) {
    // The first step waits for all 8 sequences to have come.
    auto came = [&] {
      GeneratorStats s = generator.load()->Stats();
      return s.running + s.waiting;
    };
    bool first;
    {
      absl::MutexLock l(&mu);
      first = lanes.empty();
      lanes.push_back(lane);
    }
    while (first && came() < 8) absl::SleepFor(absl::Milliseconds(1));
    return model_.Step(in);
  });
  generator = &gen;
  std::vector<Outcome> runs(8);
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] { runs[i] = GenerateOne(gen, {i % kVocab, 1}, 20); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(runs[i].status.ok()) << runs[i].status;
    EXPECT_EQ(runs[i].tokens, Reference({i % kVocab, 1}, 20));
  }
  absl::MutexLock l(&mu);
  ASSERT_GE(lanes.size(), 10u);
  std::string order;
  for (int lane : lanes) absl::StrAppend(&order, lane);
  const int64_t first_ten_on_0 = std::count(lanes.begin(), lanes.begin() + 10, 0);
  EXPECT_GE(first_ten_on_0, 4) << "steps' lanes: " << order;
  EXPECT_LE(first_ten_on_0, 6) << "steps' lanes: " << order;
}

TEST_F(GeneratorTest, ACacheLostMidwayIsRebuiltWithNoTokenLostOrRepeated) {
  model_.step_time = absl::Milliseconds(1);
  auto gen = Make();
  std::vector<Outcome> runs(16);
  std::vector<std::thread> threads;
  for (int i = 0; i < 16; ++i) {
    threads.emplace_back([&, i] { runs[i] = GenerateOne(*gen, {i, i + 1}, 40); });
  }
  while (model_.steps() < 60) absl::SleepFor(absl::Milliseconds(1));
  model_.Lose();
  for (auto& t : threads) t.join();
  for (int i = 0; i < 16; ++i) {
    ASSERT_TRUE(runs[i].status.ok()) << runs[i].status;
    EXPECT_EQ(runs[i].tokens, Reference({i, i + 1}, 40)) << "sequence " << i;
  }
  EXPECT_GT(gen->Stats().rebuilt, 0u);
}

TEST_F(GeneratorTest, SeededSamplingIsTheSameAloneAndInABatch) {
  auto gen = Make();
  SamplingParams p;
  p.temperature = 1.5;
  p.seed = 99;
  Outcome alone = GenerateOne(*gen, {5, 6}, 20, p);
  ASSERT_TRUE(alone.status.ok());
  std::vector<std::thread> others;
  for (int i = 0; i < 8; ++i) {
    others.emplace_back([&, i] { GenerateOne(*gen, {i}, 30); });
  }
  Outcome batched = GenerateOne(*gen, {5, 6}, 20, p);
  for (auto& t : others) t.join();
  EXPECT_EQ(alone.tokens, batched.tokens);
  EXPECT_NE(alone.tokens, Reference({5, 6}, 20)) << "temperature 1.5 should not be greedy";
}

TEST_F(GeneratorTest, AStopTokenEndsTheSequence) {
  auto gen = Make();
  std::vector<int64_t> ref = Reference({9}, 10);
  SamplingParams p;
  p.stop_token_ids = {ref[3]};
  Outcome run = GenerateOne(*gen, {9}, 10, p);
  ASSERT_TRUE(run.status.ok());
  const auto first = std::find(ref.begin(), ref.end(), ref[3]) - ref.begin();
  EXPECT_EQ(run.tokens, std::vector<int64_t>(ref.begin(), ref.begin() + first + 1));
  EXPECT_EQ(run.finish, "stop");
}

TEST_F(GeneratorTest, AClientThatStopsReadingFreesItsBlocksAtOnce) {
  model_.step_time = absl::Milliseconds(1);
  auto gen = Make(64);
  GenerationRequest r;
  r.prompt = {1, 2};
  r.sampling.max_tokens = 200;
  int seen = 0;
  absl::Status s = gen->Generate(r, [&](const GeneratedToken&) { return ++seen < 3; });
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(seen, 3);
  EXPECT_EQ(gen->Stats().blocks_used, 0);
  std::atomic<bool> cancel{false};
  std::thread t([&] {
    EXPECT_EQ(gen->Generate(r, [&](const GeneratedToken&) { return true; },
                            [&] { return cancel.load(); }).code(),
              absl::StatusCode::kCancelled);
  });
  while (gen->Stats().blocks_used == 0) absl::SleepFor(absl::Milliseconds(1));
  cancel = true;
  t.join();
  EXPECT_EQ(gen->Stats().blocks_used, 0);
}

TEST_F(GeneratorTest, RequestsBeyondTheCacheOrTheQueueAreRefusedNamingTheLimit) {
  GeneratorOptions options;
  options.max_waiting = 1;
  options.reserve_blocks = 8;  // nothing starts beside a running sequence
  model_.step_time = absl::Milliseconds(20);  // the first request holds its blocks for 0.6 s
  auto gen = Make(8, options);  // 8 blocks of 4 tokens
  Outcome big = GenerateOne(*gen, {1}, 40);
  // Never fits: not a status a client retries (kResourceExhausted, 429).
  EXPECT_EQ(big.status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(big.status.message(), HasSubstr("needs 10 KV cache blocks"));
  EXPECT_THAT(big.status.message(), HasSubstr("each stage holds 8"));
  // One runs, one waits for its blocks, a third is refused at once.
  std::atomic<bool> release{false};
  auto slow = [&] {
    GenerationRequest r;
    r.prompt = {1};
    r.sampling.max_tokens = 30;  // every block by its end
    return gen->Generate(r, [&](const GeneratedToken&) {
      while (!release) absl::SleepFor(absl::Milliseconds(1));
      return true;
    });
  };
  std::thread a([&] { EXPECT_TRUE(slow().ok()); });
  while (gen->Stats().running == 0) absl::SleepFor(absl::Milliseconds(1));
  std::thread b([&] { EXPECT_TRUE(slow().ok()); });
  while (gen->Stats().waiting == 0) absl::SleepFor(absl::Milliseconds(1));
  Outcome third = GenerateOne(*gen, {2}, 3);
  EXPECT_EQ(third.status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(third.status.message(), HasSubstr("already wait for KV cache blocks"));
  EXPECT_THAT(third.status.message(), HasSubstr("--max_generation_waiting"));
  release = true;
  a.join();
  b.join();
}

// Blocks are taken as sequences grow, so two that would each fill the
// cache by their end run together; when it is full, the one admitted last
// gives its blocks up, waits, and is prefilled again: both still get
// exactly their tokens, and every block comes back.
TEST_F(GeneratorTest, WhenTheCacheIsFullTheLastAdmittedIsPreemptedAndResumes) {
  model_.step_time = absl::Milliseconds(2);
  GeneratorOptions options;
  options.steps_in_flight = 2;
  auto gen = Make(8, options);  // 8 blocks of 4 tokens: 32 positions
  std::atomic<bool> done{false};
  std::atomic<int64_t> most_running{0};
  std::thread watch([&] {
    while (!done) {
      most_running = std::max(most_running.load(), gen->Stats().running);
      absl::SleepFor(absl::Microseconds(200));
    }
  });
  Outcome a, b;
  std::thread ta([&] { a = GenerateOne(*gen, {1, 2}, 30); });  // 31 positions: 8 blocks
  std::thread tb([&] { b = GenerateOne(*gen, {3, 4}, 30); });
  ta.join();
  tb.join();
  done = true;
  watch.join();
  ASSERT_TRUE(a.status.ok()) << a.status;
  ASSERT_TRUE(b.status.ok()) << b.status;
  EXPECT_EQ(a.tokens, Reference({1, 2}, 30));
  EXPECT_EQ(b.tokens, Reference({3, 4}, 30));
  EXPECT_EQ(most_running.load(), 2) << "both started before either's end was reserved";
  const GeneratorStats stats = gen->Stats();
  EXPECT_GE(stats.preempted, 1u);
  EXPECT_EQ(stats.blocks_used, 0);
  EXPECT_EQ(stats.running + stats.waiting, 0);
}

TEST_F(GeneratorTest, WithNoQueueARequestThatFitsStillRuns) {
  GeneratorOptions options;
  options.max_waiting = 0;
  auto gen = Make(64, options);
  Outcome run = GenerateOne(*gen, {4, 5}, 6);
  ASSERT_TRUE(run.status.ok()) << run.status;
  EXPECT_EQ(run.tokens, Reference({4, 5}, 6));
}

TEST_F(GeneratorTest, OneSequencesShortDeadlineFailsOnlyThatSequence) {
  model_.step_time = absl::Milliseconds(5);
  auto gen = Make();
  Outcome long_run;
  std::thread other = StartRunning(*gen, {1, 2}, 40, &long_run);
  GenerationRequest r;
  r.prompt = {3};
  r.sampling.max_tokens = 40;
  r.deadline = absl::Now() + absl::Milliseconds(30);
  absl::Status short_run = gen->Generate(r, [](const GeneratedToken&) { return true; });
  other.join();
  EXPECT_EQ(short_run.code(), absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(long_run.status.ok()) << long_run.status;
  EXPECT_EQ(long_run.tokens, Reference({1, 2}, 40));
}

TEST_F(GeneratorTest, AStoppedGeneratorEndsItsSequencesAndTakesNoMore) {
  model_.step_time = absl::Milliseconds(2);
  auto gen = Make();
  Outcome run;
  std::thread t = StartRunning(*gen, {1}, 200, &run);
  gen->Stop(absl::UnavailableError("replaced by a new version"));
  t.join();
  EXPECT_EQ(run.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(gen->Stats().blocks_used, 0);
  EXPECT_EQ(GenerateOne(*gen, {1}, 2).status.code(), absl::StatusCode::kUnavailable);
}

TEST_F(GeneratorTest, BadRequestsAreRefusedNamingWhatIsWrong) {
  auto gen = Make();
  EXPECT_THAT(GenerateOne(*gen, {}, 3).status.message(), HasSubstr("the prompt has no tokens"));
  EXPECT_THAT(GenerateOne(*gen, {1, kVocab}, 3).status.message(),
              HasSubstr("prompt token 1 is 37, not in [0, 37)"));
  EXPECT_THAT(GenerateOne(*gen, std::vector<int64_t>(990, 1), 20).status.message(),
              HasSubstr("need 1009 positions; the model has 1000"));
}

}  // namespace
}  // namespace pipeserve
