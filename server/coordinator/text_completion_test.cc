#include "server/coordinator/text_completion.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/text/utf8.h"

namespace pipeserve {
namespace {

using ::testing::Each;
using ::testing::Not;
using ::testing::HasSubstr;

// Tokens of a made-up vocabulary: 4 and 5 are the two halves of "🚀"
// (F0 9F / 9A 80), 7 is the end of text.
const std::vector<std::string> kPieces = {"Hel", "lo", " wor", "ld", "\xF0\x9F", "\x9A\x80", "!",
                                          "", "x"};
constexpr int64_t kVocab = 9;
constexpr int64_t kEnd = 7;

class FakeTokenizer : public Tokenizer {
 public:
  FakeTokenizer() { stop_tokens_ = {kEnd}; }
  std::string TokenBytes(int64_t id) const override { return kPieces[id]; }
  int64_t size() const override { return kVocab; }

 private:
  absl::StatusOr<std::vector<int64_t>> EncodePlain(absl::string_view) const override {
    return std::vector<int64_t>{};
  }
};

// A model that answers any one-token prompt with kScript, then the end of
// text (greedy logits: the token at position p is followed by kScript[p]).
const std::vector<int64_t> kScript = {0, 1, 2, 3, 4, 5, 6, kEnd};

Generator::Forward ScriptedModel() {
  return [](const std::vector<Tensor>& in, absl::Time, int) -> absl::StatusOr<std::vector<Tensor>> {
    const auto* positions = static_cast<const int64_t*>(in[1].raw_data());
    const int64_t t = in[0].dim(1);
    Tensor logits = Tensor::Zeros({1, t, kVocab});
    for (int64_t i = 0; i < t; ++i) {
      const size_t next = std::min<size_t>(positions[i], kScript.size() - 1);
      logits.data()[i * kVocab + kScript[next]] = 5.0f;
    }
    return std::vector<Tensor>{logits};
  };
}

GenerationConfig Config() {
  GenerationConfig c;
  c.spec.set_tokens("ids");
  c.spec.set_logits("logits");
  c.spec.set_block_size(4);
  c.spec.set_max_positions(100);
  c.spec.set_vocab(kVocab);
  c.spec.set_num_blocks(64);
  c.input_names = {"ids", "kv_positions", "kv_seq", "kv_blocks", "kv_seq_ids"};
  return c;
}

struct Outcome {
  absl::StatusOr<Completion> completion;
  std::vector<std::string> pieces;
  std::string text;
};

Outcome CompleteWith(std::vector<std::string> stop, int64_t max_tokens = 100,
                 bool hang_up = false) {
  Generator gen(Config(), GeneratorOptions{}, ScriptedModel());
  FakeTokenizer tokenizer;
  GenerationRequest r;
  r.prompt = {8};
  r.sampling.max_tokens = max_tokens;
  Outcome run;
  run.completion = Complete(gen, tokenizer, r, stop, [&](absl::string_view s) {
    run.pieces.emplace_back(s);
    run.text += std::string(s);
    return !hang_up;
  });
  return run;
}

TEST(TextCompletionTest, StreamsWholeCharactersAndStopsAtTheEndOfText) {
  Outcome run = CompleteWith({});
  ASSERT_TRUE(run.completion.ok()) << run.completion.status();
  EXPECT_EQ(run.text, "Hello world\xF0\x9F\x9A\x80!");
  EXPECT_EQ(run.completion->finish_reason, "stop");
  EXPECT_EQ(run.completion->tokens, 8) << "the end-of-text token counts, and adds no text";
  for (const std::string& p : run.pieces) EXPECT_TRUE(DecodeUtf8(p).ok()) << "a split character";
}

TEST(TextCompletionTest, AStopStringEndsItAndIsNeverSent) {
  Outcome run = CompleteWith({"ld\xF0\x9F\x9A\x80"});
  ASSERT_TRUE(run.completion.ok()) << run.completion.status();
  EXPECT_EQ(run.text, "Hello wor");
  EXPECT_EQ(run.completion->finish_reason, "stop");
  EXPECT_EQ(run.completion->tokens, 6);
  EXPECT_THAT(run.pieces, Each(Not(HasSubstr("l" "d"))));
}

TEST(TextCompletionTest, HeldBackTextIsSentOnceItIsNoStop) {
  Outcome run = CompleteWith({"lo!", "world?"});
  ASSERT_TRUE(run.completion.ok()) << run.completion.status();
  EXPECT_EQ(run.text, "Hello world\xF0\x9F\x9A\x80!");
  EXPECT_EQ(run.pieces.front(), "He") << "\"l\" may begin \"lo!\": held back";
}

TEST(TextCompletionTest, MaxTokensEndsItWithLength) {
  Outcome run = CompleteWith({"ld"}, 3);
  ASSERT_TRUE(run.completion.ok()) << run.completion.status();
  EXPECT_EQ(run.text, "Hello wor") << "nothing held back at the end";
  EXPECT_EQ(run.completion->finish_reason, "length");
}

TEST(TextCompletionTest, AClientThatHangsUpCancels) {
  Outcome run = CompleteWith({}, 100, /*hang_up=*/true);
  EXPECT_EQ(run.completion.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(run.pieces.size(), 1u);
}

TEST(TextCompletionTest, StopPrefixAtEnd) {
  EXPECT_EQ(StopPrefixAtEnd("Hello", {"lo!"}), 2u);
  EXPECT_EQ(StopPrefixAtEnd("Hello", {"x", "o wo", "llo there"}), 3u);
  EXPECT_EQ(StopPrefixAtEnd("Hello", {"Hello"}), 0u) << "a whole stop string is found, not held";
  EXPECT_EQ(StopPrefixAtEnd("Hello", {""}), 0u);
}

}  // namespace
}  // namespace pipeserve
