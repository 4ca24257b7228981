// OpenAI's completions and chat completions in JSON: requests into plain
// structs (checked: an unknown or unsupported key, or a value of the wrong
// type or range, gets kInvalidArgument naming it, as OpenAI answers an
// unrecognized argument), and responses, stream chunks and errors out.
// Knows nothing of HTTP; openai_rest routes.
//
//   ASSIGN_OR_RETURN(CompletionRequest r, CompletionRequestFromJson(body));
#ifndef PIPESERVE_SERVER_COORDINATOR_OPENAI_JSON_H_
#define PIPESERVE_SERVER_COORDINATOR_OPENAI_JSON_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "runtime/sampler.h"

namespace pipeserve {

// What both kinds of request share.
struct OpenAiCommon {
  std::string model;
  SamplingParams sampling;  // OpenAI's defaults: temperature 1, max_tokens 16
  bool seeded = false;      // "seed" given (else each choice draws its own)
  bool max_tokens_given = false;
  int n = 1;                // choices per prompt
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool stream_options = false;  // given (only with stream: true)
  std::vector<std::string> stop;
};

// A prompt: text, or token ids.
struct OpenAiPrompt {
  bool is_text = true;
  std::string text;
  std::vector<int64_t> ids;
};

struct CompletionRequest {
  OpenAiCommon common;
  std::vector<OpenAiPrompt> prompts;  // "prompt": a string, ids, or a list of either
  bool echo = false;
};

struct ChatMessage {
  std::string role, content;
};

struct ChatRequest {
  OpenAiCommon common;
  std::vector<ChatMessage> messages;
};

// The most choices (prompts x n) one request may ask for.
constexpr int kMaxChoices = 64;

absl::StatusOr<CompletionRequest> CompletionRequestFromJson(absl::string_view body);
absl::StatusOr<ChatRequest> ChatRequestFromJson(absl::string_view body);

// What every response and chunk of one request carries.
struct OpenAiHeader {
  std::string id;  // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0;
  std::string model;
  bool chat = false;
};
OpenAiHeader NewHeader(const std::string& model, bool chat);

struct OpenAiUsage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

struct OpenAiChoice {
  std::string text;
  std::string finish_reason;
};

// The whole answer (stream false).
std::string OpenAiResponseJson(const OpenAiHeader& h, const std::vector<OpenAiChoice>& choices,
                               const OpenAiUsage& usage);
// One stream chunk of choice `index`: `text` (chat: a delta, with the
// role when `first`), and `finish_reason` when not empty; `usage` when
// not null.
std::string OpenAiChunkJson(const OpenAiHeader& h, int index, absl::string_view text,
                            const std::string& finish_reason, bool first,
                            const OpenAiUsage* usage);
// The usage chunk of stream_options.include_usage (no choices).
std::string OpenAiUsageChunkJson(const OpenAiHeader& h, const OpenAiUsage& usage);
// {"error": {"message", "type", "param": null, "code"}}, typed by `status`.
std::string OpenAiErrorJson(int status, absl::string_view message);
// GET /v1/models: the models, as OpenAI lists them; and one of them.
std::string OpenAiModelsJson(const std::vector<std::string>& models);
std::string OpenAiModelJson(const std::string& model);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_OPENAI_JSON_H_
