// Triton's generate extension in JSON, for models exported for
// generation: a request's token ids and sampling ({"input_ids": [...],
// "max_tokens": 16, "temperature": 0.7, ...}, the sampling keys at the top
// or under "parameters") into a GenerationRequest, and tokens back out.
// A prompt is token ids ("input_ids"), or text ("text_input", for models
// uploaded with a tokenizer), answered by "text_output".
// TensorRT-LLM's Triton keys are taken too: "end_id" (a stop token),
// "pad_id" (no effect), "stop_words" (stop strings, with text_input) and
// "bad_words" (refused unless empty, as its examples send it). Bad input
// gets kInvalidArgument naming the key: unknown keys too, so a misspelt
// "max_token" is not silently ignored.
//
//   TextPrompt text;  // "text_input", when given instead of ids
//   ASSIGN_OR_RETURN(GenerationRequest r, GenerationRequestFromJson(body, &text));
#ifndef PIPESERVE_SERVER_COORDINATOR_GENERATE_JSON_H_
#define PIPESERVE_SERVER_COORDINATOR_GENERATE_JSON_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/coordinator/generator.h"

namespace pipeserve {

// A text request's text ("text_input") and stop strings ("stop_words").
struct TextPrompt {
  std::string input;
  std::vector<std::string> stop;
};

// Without "seed", a random one (as the gRPC Generate does). A request
// with "text_input" has its text in text->input and no prompt ids yet.
absl::StatusOr<GenerationRequest> GenerationRequestFromJson(absl::string_view body,
                                                            TextPrompt* text);

// One streamed token: {"token_id": 5, "index": 0} (with "finish_reason"
// and "prompt_tokens" on the last).
std::string TokenEventJson(const GeneratedToken& t, int64_t prompt_tokens);

// The whole answer: {"model_name", "token_ids", "finish_reason", "prompt_tokens"}.
std::string GenerateResponseJson(const std::string& model, const std::vector<int64_t>& ids,
                                 const std::string& finish_reason, int64_t prompt_tokens);

// Text answers: a streamed piece {"model_name", "text_output"} (with
// "finish_reason" and the token counts on the last), and the whole.
std::string TextEventJson(const std::string& model, absl::string_view text,
                          const std::string& finish_reason, int64_t prompt_tokens,
                          int64_t completion_tokens);
std::string GenerateTextResponseJson(const std::string& model, const std::string& text,
                                     const std::string& finish_reason, int64_t prompt_tokens,
                                     int64_t completion_tokens);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_GENERATE_JSON_H_
