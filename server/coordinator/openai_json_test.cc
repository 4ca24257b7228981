#include "server/coordinator/openai_json.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

std::string Message(const absl::Status& s) { return std::string(s.message()); }

TEST(OpenAiJsonTest, ACompletionRequestWithEveryKey) {
  auto r = CompletionRequestFromJson(R"({
    "model": "gpt2", "prompt": "Hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
    "top_k": -1, "n": 2, "stream": true, "stream_options": {"include_usage": true},
    "stop": "\n", "seed": 3, "echo": true, "frequency_penalty": 0.1, "repetition_penalty": 1.2,
    "stop_token_ids": [5], "best_of": 2, "user": "u", "logprobs": null, "presence_penalty": 0,
    "logit_bias": {}, "suffix": null})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->common.model, "gpt2");
  ASSERT_EQ(r->prompts.size(), 1u);
  EXPECT_EQ(r->prompts[0].text, "Hi");
  const SamplingParams& p = r->common.sampling;
  EXPECT_EQ(p.max_tokens, 7);
  EXPECT_EQ(p.temperature, 0.5);
  EXPECT_EQ(p.top_p, 0.9);
  EXPECT_EQ(p.top_k, 0) << "vLLM's -1: every token";
  EXPECT_EQ(p.seed, 3u);
  EXPECT_EQ(p.frequency_penalty, 0.1);
  EXPECT_EQ(p.repetition_penalty, 1.2);
  EXPECT_THAT(p.stop_token_ids, ElementsAre(5));
  EXPECT_TRUE(r->common.seeded && r->common.stream && r->common.include_usage && r->echo);
  EXPECT_EQ(r->common.n, 2);
  EXPECT_THAT(r->common.stop, ElementsAre("\n"));
}

TEST(OpenAiJsonTest, DefaultsAreOpenAis) {
  auto r = CompletionRequestFromJson(R"({"model": "m", "prompt": "x"})");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->common.sampling.temperature, 1);
  EXPECT_EQ(r->common.sampling.max_tokens, 16);
  EXPECT_FALSE(r->common.seeded);
  EXPECT_FALSE(r->common.max_tokens_given);
}

TEST(OpenAiJsonTest, PromptsAreTextIdsOrListsOfEither) {
  auto ids = CompletionRequestFromJson(R"({"model": "m", "prompt": [1, 2, 3]})");
  ASSERT_TRUE(ids.ok());
  ASSERT_EQ(ids->prompts.size(), 1u);
  EXPECT_FALSE(ids->prompts[0].is_text);
  EXPECT_THAT(ids->prompts[0].ids, ElementsAre(1, 2, 3));
  auto texts = CompletionRequestFromJson(R"({"model": "m", "prompt": ["a", "b"]})");
  ASSERT_TRUE(texts.ok());
  EXPECT_EQ(texts->prompts.size(), 2u);
  auto lists = CompletionRequestFromJson(R"({"model": "m", "prompt": [[1], [2, 3]]})");
  ASSERT_TRUE(lists.ok());
  EXPECT_THAT(lists->prompts[1].ids, ElementsAre(2, 3));
  auto mixed = CompletionRequestFromJson(R"({"model": "m", "prompt": [1, "a"]})");
  EXPECT_THAT(Message(mixed.status()), HasSubstr("\"prompt\" must be text, token ids"));
}

TEST(OpenAiJsonTest, BadRequestsNameTheKey) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"model": "m", "prompt": "x", "max_token": 1})", "unrecognized request argument \"max_token\""},
      {R"({"model": "m", "prompt": "x", "logprobs": 1})", "\"logprobs\" is not supported"},
      {R"({"model": "m", "prompt": "x", "presence_penalty": 0.5})", "use frequency_penalty"},
      {R"({"model": "m", "prompt": "x", "logit_bias": {"1": 2}})", "\"logit_bias\" is not supported"},
      {R"({"model": "m", "prompt": "x", "suffix": "y"})", "\"suffix\" is not supported"},
      {R"({"model": "m", "prompt": "x", "best_of": 3})", "only best_of = n"},
      {R"({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]})", "up to 4"},
      {R"({"model": "m", "prompt": "x", "stop": [""]})", "non-empty strings"},
      {R"({"model": "m", "prompt": "x", "n": 65})", "\"n\" must be in [1, 64]"},
      {R"({"model": "m", "prompt": ["a", "b"], "n": 40})", "2 prompts x n = 40"},
      {R"({"model": "m", "prompt": "x", "stream": 1})", "\"stream\" must be true or false"},
      {R"({"model": "m", "prompt": "x", "stream_options": {"x": 1}})", "include_usage"},
      {R"({"model": "m", "prompt": "x", "stream_options": {"include_usage": true}})",
       "only taken with \"stream\": true"},
      {R"({"model": "m", "prompt": "x", "seed": 1.5})", "\"seed\" must be an integer"},
      {R"({"prompt": "x"})", "\"model\" is missing"},
      {R"({"model": "m"})", "\"prompt\" is missing"},
      {R"([1])", "must be a JSON object"},
      {R"({"model": "m", "prompt": "x)", "not valid JSON"},
  };
  for (const auto& [body, want] : cases) {
    auto r = CompletionRequestFromJson(body);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << body;
    EXPECT_THAT(Message(r.status()), HasSubstr(want)) << body;
  }
}

TEST(OpenAiJsonTest, ChatMessagesAsTextOrTextParts) {
  auto r = ChatRequestFromJson(R"({"model": "m", "max_completion_tokens": 4, "messages": [
      {"role": "system", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->messages.size(), 2u);
  EXPECT_EQ(r->messages[1].content, "hi there");
  EXPECT_TRUE(r->common.max_tokens_given);
  EXPECT_EQ(r->common.sampling.max_tokens, 4);
  auto image = ChatRequestFromJson(R"({"model": "m", "messages": [{"role": "user",
      "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})");
  EXPECT_THAT(Message(image.status()), HasSubstr("other than {\"type\": \"text\"}"));
  // Found by text_request_fuzz: a part without "text" asserted in nlohmann.
  auto no_text = ChatRequestFromJson(R"({"model": "m", "messages": [{"role": "user",
      "content": [{"type": "text", "t[xt": "hi"}]}]})");
  EXPECT_THAT(Message(no_text.status()), HasSubstr("other than {\"type\": \"text\"}"));
  auto typed = ChatRequestFromJson(R"({"model": "m", "messages": [{"role": "user",
      "content": [{"type": 5, "text": "x"}]}]})");
  EXPECT_THAT(Message(typed.status()), HasSubstr("other than {\"type\": \"text\"}"));
  auto empty = ChatRequestFromJson(R"({"model": "m", "messages": []})");
  EXPECT_THAT(Message(empty.status()), HasSubstr("a non-empty list of messages"));
  auto tools = ChatRequestFromJson(R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "tools": []})");
  EXPECT_THAT(Message(tools.status()), HasSubstr("unrecognized request argument \"tools\""));
}

TEST(OpenAiJsonTest, ResponsesAndChunksAsOpenAiShapesThem) {
  const OpenAiHeader h{"cmpl-1", 100, "m", false};
  const Json whole = Json::parse(OpenAiResponseJson(h, {{"hi", "length"}}, {3, 2}));
  EXPECT_EQ(whole["object"], "text_completion");
  EXPECT_EQ(whole["choices"][0]["text"], "hi");
  EXPECT_EQ(whole["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(whole["usage"]["total_tokens"], 5);
  const OpenAiHeader chat{"chatcmpl-1", 100, "m", true};
  const Json first = Json::parse(OpenAiChunkJson(chat, 0, "", "", true, nullptr));
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"], (Json{{"role", "assistant"}, {"content", ""}}));
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  const OpenAiUsage usage{1, 1};
  const Json last = Json::parse(OpenAiChunkJson(chat, 1, "", "stop", false, &usage));
  EXPECT_EQ(last["choices"][0]["delta"], Json::object());
  EXPECT_EQ(last["usage"]["total_tokens"], 2);
  const Json error = Json::parse(OpenAiErrorJson(429, "busy"));
  EXPECT_EQ(error["error"]["type"], "rate_limit_error");
  EXPECT_EQ(error["error"]["message"], "busy");
}

}  // namespace
}  // namespace pipeserve
