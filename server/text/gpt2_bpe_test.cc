#include "server/text/gpt2_bpe.h"

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/text/utf8.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

class Gpt2BpeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto bpe = Gpt2Bpe::Load(Read("third_party/gpt2_bpe/encoder.json"),
                             Read("third_party/gpt2_bpe/vocab.bpe"));
    ASSERT_TRUE(bpe.ok()) << bpe.status();
    bpe_ = bpe->release();
  }
  static void TearDownTestSuite() { delete bpe_; }
  static Gpt2Bpe* bpe_;
};
Gpt2Bpe* Gpt2BpeTest::bpe_ = nullptr;

TEST_F(Gpt2BpeTest, LoadsGpt2sVocabulary) {
  EXPECT_EQ(bpe_->vocab_size(), 50257);
  EXPECT_EQ(*bpe_->TokenBytes(50256), "<|endoftext|>");
  EXPECT_EQ(*bpe_->TokenBytes(220), " ");
}

// 441 texts through every branch of the pre-tokenizer and many scripts
// (tools/gpt2_bpe_oracle/make_fixture.py): the ids npm gpt-3-encoder gives.
TEST_F(Gpt2BpeTest, EncodesAsGpt3EncoderDoesAndDecodesBack) {
  std::ifstream in("server/text/testdata/gpt2_bpe_oracle.jsonl");
  std::string line;
  int texts = 0;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    const std::string text = j["text"].get<std::string>();
    const std::vector<int64_t> want = j["ids"].get<std::vector<int64_t>>();
    auto ids = bpe_->Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, want) << "text " << texts << ": " << j["text"].dump();
    EXPECT_EQ(*bpe_->Decode(want), text) << "text " << texts;
    ++texts;
  }
  EXPECT_EQ(texts, 441);
}

TEST_F(Gpt2BpeTest, StreamedTokensNeverSplitACharacter) {
  auto ids = bpe_->Encode("café 🚀");
  ASSERT_TRUE(ids.ok());
  Utf8Stream stream;
  std::vector<std::string> pieces;
  for (int64_t id : *ids) pieces.push_back(stream.Push(*bpe_->TokenBytes(id)));
  pieces.push_back(stream.Finish());
  std::string joined;
  for (const std::string& p : pieces) {
    EXPECT_TRUE(DecodeUtf8(p).ok()) << "a piece that is not whole characters";
    joined += p;
  }
  EXPECT_EQ(joined, "café 🚀");
  EXPECT_THAT(pieces, ::testing::Contains("")) << "🚀's first bytes waited for its last";
}

// One piece of 1 MiB of random letters (a single "word": the pattern never
// splits a run of letters), so thousands of distinct merges apply.
// Rescanning the piece once per merge rank took hours at this size.
TEST_F(Gpt2BpeTest, AHugeWordEncodesInLinearishTime) {
  std::string word;
  uint64_t x = 12345;
  for (int i = 0; i < (1 << 20); ++i) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    word.push_back(static_cast<char>('a' + (x >> 33) % 26));
  }
  const absl::Time start = absl::Now();
  auto ids = bpe_->Encode(word);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_LT(ids->size(), word.size() * 2 / 3);  // merged: 1.68 bytes a token
  EXPECT_EQ(*bpe_->Decode(*ids), word);
  EXPECT_LT(absl::Now() - start, absl::Seconds(60));
}

TEST_F(Gpt2BpeTest, BadTextAndBadIdsAreRefusedNamingThem) {
  auto text = bpe_->Encode("ok\xFF");
  EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(text.status().message()), HasSubstr("offset 2"));
  auto id = bpe_->Decode({15496, 50257});
  EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(id.status().message()),
              HasSubstr("token id 50257 is not in the vocabulary [0, 50257)"));
}

TEST(Gpt2BpeLoadTest, FilesThatDoNotParseAreRefusedNamingWhy) {
  auto not_json = Gpt2Bpe::Load("[1, 2", "");
  EXPECT_THAT(std::string(not_json.status().message()), HasSubstr("not a JSON object"));
  auto twice = Gpt2Bpe::Load(R"({"a": 0, "b": 0})", "");
  EXPECT_THAT(std::string(twice.status().message()), HasSubstr("ids must be distinct"));
  auto stray = Gpt2Bpe::Load(R"({"\u0100": 0, "\u4e00": 1})", "");
  EXPECT_THAT(std::string(stray.status().message()), HasSubstr("U+4E00, which stands for no byte"));
  auto merge = Gpt2Bpe::Load(R"({"a": 0})", "#version: 0.2\na b c\n");
  EXPECT_THAT(std::string(merge.status().message()), HasSubstr("merge 1 is \"a b c\""));
}

TEST(Gpt2PiecesTest, SplitsAsGpt2sPatternDoes) {
  auto pieces = [](const std::string& text) {
    std::vector<uint32_t> cps = *DecodeUtf8(text);
    std::vector<std::string> out;
    for (auto [b, e] : Gpt2Pieces(cps)) {
      std::string s;
      for (size_t i = b; i < e; ++i) AppendUtf8(cps[i], &s);
      out.push_back(s);
    }
    return out;
  };
  EXPECT_THAT(pieces("it's  x1 ٣٤!"), ElementsAre("it", "'s", " ", " x", "1", " ٣٤", "!"));
  EXPECT_THAT(pieces("a\n\nb  "), ElementsAre("a", "\n", "\n", "b", "  "));
  EXPECT_THAT(pieces("IT'S"), ElementsAre("IT", "'", "S"));
}

}  // namespace
}  // namespace pipeserve
