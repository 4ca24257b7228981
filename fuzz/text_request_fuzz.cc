// Fuzz target: the text APIs' request bodies: OpenAI's completions and
// chat completions (server/coordinator/openai_json.h) and Triton's generate
// (generate_json.h). Bad input is kInvalidArgument, never a crash; what is
// accepted keeps the limits the routes rely on.
#include <cstdint>
#include <string>

#include "server/coordinator/generate_json.h"
#include "server/coordinator/openai_json.h"

namespace {

void Check(const pipeserve::OpenAiCommon& c, size_t prompts) {
  if (c.model.empty() || c.n < 1 || prompts * c.n > pipeserve::kMaxChoices) __builtin_trap();
  if (c.stop.size() > 4) __builtin_trap();
  for (const std::string& s : c.stop) {
    if (s.empty()) __builtin_trap();
  }
}

bool Invalid(const absl::Status& s) { return s.code() == absl::StatusCode::kInvalidArgument; }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string body(reinterpret_cast<const char*>(data), size);
  if (auto r = pipeserve::CompletionRequestFromJson(body); r.ok()) {
    if (r->prompts.empty()) __builtin_trap();
    Check(r->common, r->prompts.size());
  } else if (!Invalid(r.status())) {
    __builtin_trap();
  }
  if (auto r = pipeserve::ChatRequestFromJson(body); r.ok()) {
    if (r->messages.empty()) __builtin_trap();
    Check(r->common, 1);
  } else if (!Invalid(r.status())) {
    __builtin_trap();
  }
  pipeserve::TextPrompt text;
  if (auto r = pipeserve::GenerationRequestFromJson(body, &text); r.ok()) {
    if (r->prompt.empty() == text.input.empty()) __builtin_trap();  // one of the two
    if (!text.stop.empty() && text.input.empty()) __builtin_trap();
  } else if (!Invalid(r.status())) {
    __builtin_trap();
  }
  return 0;
}
