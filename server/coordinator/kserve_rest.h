// KServe v2 REST (the Open Inference Protocol's HTTP binding, as Triton
// serves it on :8000) over KServeCore: health, server and model metadata,
// model readiness, the repository index (kserve_core.h), and inference
// with JSON tensors (kserve_json.h). Thin:
// it routes, converts and maps errors, the core does the work, so answers
// equal the gRPC service's. Errors are KServe's {"error": "..."} with 400
// (a bad request, or a model not ready), 404 (no such model, version or
// route), 405, 429 (the model's queue is full), 503 (the server is not
// ready, or a repository load or unload, which ModelService does) and 504
// (the deadline passed).
//
// With a Generation, models exported for generation also answer Triton's
// generate extension: POST .../generate (the whole answer) and
// .../generate_stream (server-sent events; an error after the first event
// arrives as an event {"error": ...}), in token ids ("input_ids", an
// event per token) or, for models uploaded with a tokenizer, in text
// ("text_input" and "text_output", an event per piece of text). A client that
// hangs up stops its sequence, and its blocks are free within a step.
//
// With tokens, every route but the health probes needs a token with the
// infer scope (`Authorization: Bearer ...`): 401 without a valid one, 403
// for one without the scope, as on gRPC.
//
//   KServeRest rest(&core, tokens);
//   HttpServer::Start("127.0.0.1", 8000, {}, [&](const HttpRequest& r) { return rest.Handle(r); });
#ifndef PIPESERVE_SERVER_COORDINATOR_KSERVE_REST_H_
#define PIPESERVE_SERVER_COORDINATOR_KSERVE_REST_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/coordinator/generate_json.h"
#include "server/coordinator/generation.h"
#include "server/coordinator/kserve_core.h"
#include "server/transport/auth.h"
#include "server/transport/http_server.h"

namespace pipeserve {

// The HTTP status KServe's REST binding gives an error of this code.
int HttpStatusOf(absl::StatusCode code);

class KServeRest {
 public:
  // `core`, `tokens` (null: no authentication) and `generation` (null: no
  // generate routes) must outlive this.
  KServeRest(KServeCore* core, const TokenSet* tokens, Generation* generation = nullptr)
      : core_(core), tokens_(tokens), generation_(generation) {}

  HttpResponse Handle(const HttpRequest& r);

 private:
  // /v2/repository/index and /v2/repository/models/{model}/{load,unload}.
  HttpResponse Repository(const HttpRequest& r, const std::vector<std::string>& path);
  // /v2/models/{model}[/versions/{version}][/{action}]
  HttpResponse Model(const HttpRequest& r, const std::string& model, const std::string& version,
                     const std::string& action);
  HttpResponse Infer(const HttpRequest& r, const std::string& model, const std::string& version);
  // generate (stream false) and generate_stream.
  HttpResponse Generate(const HttpRequest& r, const std::string& model, bool stream);
  // Generate with "text_input": through the model's tokenizer, "text_output" back.
  HttpResponse GenerateText(const HttpRequest& r, const std::string& model, bool stream,
                            GenerationRequest req, const TextPrompt& prompt);

  KServeCore* const core_;
  const TokenSet* const tokens_;
  Generation* const generation_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_KSERVE_REST_H_
