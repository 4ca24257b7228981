#include "server/text/tokenizer.h"

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

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

TokenizerSpec SentencePieceSpec() {
  TokenizerSpec spec;
  spec.set_sentencepiece_model(Read("server/text/testdata/sentencepiece.model"));
  return spec;
}

TokenizerSpec Gpt2Spec() {
  TokenizerSpec spec;
  spec.mutable_gpt2_bpe()->set_vocab_json(Read("third_party/gpt2_bpe/encoder.json"));
  spec.mutable_gpt2_bpe()->set_merges(Read("third_party/gpt2_bpe/vocab.bpe"));
  return spec;
}

// Sanitized builds cannot load libsentencepiece (sentencepiece_model.h).
class SentencePieceTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = MakeTokenizer(SentencePieceSpec());
    if (!t.ok() && absl::StrContains(t.status().message(), "sanitized")) {
      GTEST_SKIP() << t.status();
    }
  }
};

// tools/sentencepiece_oracle/make_fixture.py wrote what Debian's
// python3-sentencepiece encodes each text to and decodes those ids to.
TEST_F(SentencePieceTokenizerTest, EncodesAndDecodesAsSentencePieceDoes) {
  auto t = MakeTokenizer(SentencePieceSpec());
  ASSERT_TRUE(t.ok()) << t.status();
  std::ifstream in("server/text/testdata/sentencepiece_oracle.jsonl");
  std::string line;
  int texts = 0, encoded = 0;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    const std::string text = j["text"];
    const std::vector<int64_t> ids = j["ids"].get<std::vector<int64_t>>();
    ++texts;
    // SentencePiece itself reads "<s>" in a text as characters; ours as the token.
    if (!absl::StrContains(text, "<s>") && !absl::StrContains(text, "</s>")) {
      auto got = (*t)->Encode(text, /*add_bos=*/false);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(*got, ids) << text;
      ++encoded;
    }
    EXPECT_EQ((*t)->Decode(ids, /*at_start=*/true), j["decoded"].get<std::string>()) << text;
  }
  EXPECT_EQ(texts, 131);
  EXPECT_GT(encoded, 90);
}

TEST_F(SentencePieceTokenizerTest, SpecialTokensBosAndEos) {
  auto t = MakeTokenizer(SentencePieceSpec());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT((*t)->stop_tokens(), ElementsAre(2));  // the model's eos
  auto plain = (*t)->Encode("the cache", /*add_bos=*/false);
  auto with_bos = (*t)->Encode("the cache", /*add_bos=*/true);
  auto written = (*t)->Encode("<s>the cache", /*add_bos=*/true);
  ASSERT_TRUE(plain.ok() && with_bos.ok() && written.ok());
  std::vector<int64_t> want = {1};
  want.insert(want.end(), plain->begin(), plain->end());
  EXPECT_EQ(*with_bos, want);
  EXPECT_EQ(*written, want) << "a BOS written in the text is not doubled";
  auto eos = (*t)->Encode("a</s>", /*add_bos=*/false);
  ASSERT_TRUE(eos.ok());
  EXPECT_EQ(eos->back(), 2);
  EXPECT_EQ((*t)->Decode(*eos, /*at_start=*/true), "a") << "special tokens decode to nothing";
}

// A megabyte of "</s>": each found special once sent the search for "<s>"
// (which is not there) through the whole rest of the text again.
TEST_F(SentencePieceTokenizerTest, ManySpecialTokensEncodeInLinearTime) {
  auto t = MakeTokenizer(SentencePieceSpec());
  ASSERT_TRUE(t.ok());
  std::string text;
  for (int i = 0; i < (1 << 18); ++i) text += "</s>";
  const absl::Time start = absl::Now();
  auto ids = (*t)->Encode(text, /*add_bos=*/false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->size(), size_t{1} << 18);
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
}

TEST_F(SentencePieceTokenizerTest, AContinuationKeepsItsLeadingSpace) {
  auto t = MakeTokenizer(SentencePieceSpec());
  ASSERT_TRUE(t.ok());
  auto ids = (*t)->Encode("the cache", /*add_bos=*/false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ((*t)->Decode(*ids, /*at_start=*/true), "the cache");
  EXPECT_EQ((*t)->Decode(*ids, /*at_start=*/false), " the cache");
}

TEST(Gpt2TokenizerTest, EndOfTextIsSpecialAndStops) {
  auto t = MakeTokenizer(Gpt2Spec());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->size(), 50257);
  EXPECT_THAT((*t)->stop_tokens(), ElementsAre(50256));
  auto ids = (*t)->Encode("Hello world<|endoftext|>", /*add_bos=*/true);
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids, ElementsAre(15496, 995, 50256)) << "GPT-2 has no BOS";
  EXPECT_EQ((*t)->Decode(*ids, /*at_start=*/true), "Hello world");
}

TEST(TokenizerTest, StreamsWholeCharacters) {
  auto t = MakeTokenizer(Gpt2Spec());
  ASSERT_TRUE(t.ok());
  auto ids = (*t)->Encode("🚀!", false);
  ASSERT_TRUE(ids.ok());
  TextDecoder d(**t, /*at_start=*/false);
  std::vector<std::string> pieces;
  for (int64_t id : *ids) pieces.push_back(d.Push(id));
  pieces.push_back(d.Finish());
  EXPECT_EQ(pieces.front(), "") << "🚀's first bytes wait for its last";
  std::string joined;
  for (const std::string& p : pieces) joined += p;
  EXPECT_EQ(joined, "🚀!");
}

TEST_F(SentencePieceTokenizerTest, BadSpecsAreRefusedNamingWhy) {
  auto none = MakeTokenizer(TokenizerSpec());
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("the tokenizer has no kind"));
  TokenizerSpec junk;
  junk.set_sentencepiece_model("not a model");
  EXPECT_THAT(std::string(MakeTokenizer(junk).status().message()),
              HasSubstr("the SentencePiece model does not load"));
  TokenizerSpec bad_bpe;
  bad_bpe.mutable_gpt2_bpe()->set_vocab_json("[]");
  EXPECT_THAT(std::string(MakeTokenizer(bad_bpe).status().message()),
              HasSubstr("the GPT-2 BPE tokenizer: the vocabulary is not a JSON object"));
  TokenizerSpec stop = SentencePieceSpec();
  stop.add_stop_token_ids(320);
  EXPECT_THAT(std::string(MakeTokenizer(stop).status().message()),
              HasSubstr("stop token 320 is not in the tokenizer's vocabulary [0, 320)"));
  TokenizerSpec chat = SentencePieceSpec();
  (*chat.mutable_chat_template()->mutable_roles())["user"] = "<|user|> {text}";
  EXPECT_THAT(std::string(MakeTokenizer(chat).status().message()),
              HasSubstr("role \"user\" lacks \"{content}\""));
  auto t = MakeTokenizer(SentencePieceSpec());
  ASSERT_TRUE(t.ok());
  EXPECT_THAT(std::string((*t)->Encode("\xff", false).status().message()), HasSubstr("byte 0"));
}

}  // namespace
}  // namespace pipeserve
