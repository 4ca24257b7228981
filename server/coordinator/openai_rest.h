// OpenAI-compatible text generation over HTTP, as vLLM and TGI serve it:
// POST /v1/completions (a prompt as text or token ids, or a list of
// either; n choices each), POST /v1/chat/completions (messages through the
// model's chat template), GET /v1/models[/{model}]. Models are those
// uploaded with a tokenizer (TokenizerSpec); `stream` sends server-sent
// events, one chunk per piece of text, `usage` on the last (or on a chunk
// of its own with stream_options.include_usage), then `data: [DONE]`.
// Thin: it parses (openai_json), runs each choice as a text completion
// (text_completion) on its own thread, and answers.
//
// Errors are OpenAI's {"error": {...}} with the status KServe's binding
// gives the same code (HttpStatusOf: 400, 401, 403, 404, 429, 503, 504);
// an error after a stream started arrives as a chunk {"error": ...}
// before [DONE]. A client that hangs up stops its choices within a step.
// Tokens and scopes as on KServe REST (`Authorization: Bearer`, which is
// what OpenAI clients send their API key as).
//
//   OpenAiRest openai(&core, tokens, &generation);
//   if (absl::StartsWith(r.path, "/v1/")) return openai.Handle(r);
#ifndef PIPESERVE_SERVER_COORDINATOR_OPENAI_REST_H_
#define PIPESERVE_SERVER_COORDINATOR_OPENAI_REST_H_

#include <string>
#include <vector>

#include "server/coordinator/generation.h"
#include "server/coordinator/kserve_core.h"
#include "server/coordinator/openai_json.h"
#include "server/transport/auth.h"
#include "server/transport/http_server.h"

namespace pipeserve {

class OpenAiRest {
 public:
  // Every pointer must outlive this; `tokens` null: no authentication.
  OpenAiRest(KServeCore* core, const TokenSet* tokens, Generation* generation)
      : core_(core), tokens_(tokens), generation_(generation) {}

  HttpResponse Handle(const HttpRequest& r);

  // One choice to run: a prompt's ids and sampling, and what to echo first.
  struct Job {
    GenerationRequest request;
    std::string echo;
  };

 private:
  HttpResponse Models(const std::string& only);
  HttpResponse Completions(const HttpRequest& r);
  HttpResponse Chat(const HttpRequest& r);
  struct Choices;
  // Runs `jobs` (one per choice, in order) and answers, whole or streamed.
  HttpResponse Run(const HttpRequest& r, const TextModel& text, const OpenAiHeader& h,
                   const OpenAiCommon& common, std::vector<Job> jobs, int64_t prompt_tokens);
  HttpResponse RunWhole(const HttpRequest& r, Choices& run);
  // The stream's body: each choice's chunks, the usage, then [DONE].
  static void Stream(Choices& run, KServeCore* core, HttpStream& out);
  HttpResponse Error(const absl::Status& s);

  KServeCore* const core_;
  const TokenSet* const tokens_;
  Generation* const generation_;
};

// The prompt of `messages` by `chat` (ChatTemplate): kInvalidArgument for
// a model without a template or a role it lacks, naming them.
absl::StatusOr<std::string> RenderChat(const std::string& model, const ChatTemplate& chat,
                                       const std::vector<ChatMessage>& messages);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_OPENAI_REST_H_
