// Triton's generate extension in JSON, for models exported for
// generation: a request's token ids and sampling ({"input_ids": [...],
// "max_tokens": 16, "temperature": 0.7, ...}, the sampling keys at the top
// or under "parameters") into a GenerationRequest, and tokens back out.
// Token ids, not text: text comes with tokenizers attached to uploads.
// Bad input gets kInvalidArgument naming the key: unknown keys too, so a
// misspelt "max_token" is not silently ignored.
//
//   ASSIGN_OR_RETURN(GenerationRequest r, GenerationRequestFromJson(body));
#ifndef PIPESERVE_SERVER_COORDINATOR_GENERATE_JSON_H_
#define PIPESERVE_SERVER_COORDINATOR_GENERATE_JSON_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/coordinator/generator.h"

namespace pipeserve {

// Without "seed", a random one (as the gRPC Generate does).
absl::StatusOr<GenerationRequest> GenerationRequestFromJson(absl::string_view body);

// One streamed token: {"token_id": 5, "index": 0} (with "finish_reason"
// and "prompt_tokens" on the last).
std::string TokenEventJson(const GeneratedToken& t, int64_t prompt_tokens);

// The whole answer: {"model_name", "token_ids", "finish_reason", "prompt_tokens"}.
std::string GenerateResponseJson(const std::string& model, const std::vector<int64_t>& ids,
                                 const std::string& finish_reason, int64_t prompt_tokens);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_GENERATE_JSON_H_
