#include "server/coordinator/kserve_rest.h"

#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/coordinator/generate_json.h"
#include "server/coordinator/kserve_json.h"
#include "server/coordinator/text_completion.h"

namespace pipeserve {
namespace {

HttpResponse Error(int status, absl::string_view message) {
  HttpResponse r;
  r.status = status;
  r.body = ErrorJson(message);
  return r;
}

HttpResponse Error(const absl::Status& s) { return Error(HttpStatusOf(s.code()), s.message()); }

HttpResponse Json(std::string body) {
  HttpResponse r;
  r.body = std::move(body);
  return r;
}

HttpResponse WrongMethod(const HttpRequest& r, const char* allowed) {
  HttpResponse resp = Error(405, absl::StrCat(r.method, " is not allowed on ", r.path.substr(0, 200),
                                              "; use ", allowed));
  resp.headers.emplace_back("Allow", allowed);
  return resp;
}

}  // namespace

int HttpStatusOf(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk: return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange: return 400;
    case absl::StatusCode::kUnauthenticated: return 401;
    case absl::StatusCode::kPermissionDenied: return 403;
    case absl::StatusCode::kNotFound: return 404;
    case absl::StatusCode::kResourceExhausted: return 429;
    case absl::StatusCode::kCancelled: return 499;
    case absl::StatusCode::kUnimplemented: return 501;
    case absl::StatusCode::kUnavailable: return 503;
    case absl::StatusCode::kDeadlineExceeded: return 504;
    default: return 500;
  }
}

HttpResponse KServeRest::Handle(const HttpRequest& r) {
  const std::vector<std::string> p = absl::StrSplit(r.path, '/', absl::SkipEmpty());
  const bool get = r.method == "GET" || r.method == "HEAD";
  if (p.size() == 3 && p[0] == "v2" && p[1] == "health" && (p[2] == "live" || p[2] == "ready")) {
    // Probes answer anyone, as grpc.health.v1 does: they carry no tokens.
    if (!get) return WrongMethod(r, "GET");
    if (p[2] == "ready" && !core_->ServerReady()) return Error(503, "the server is not ready");
    return HttpResponse::Text(200, "");
  }
  if (absl::Status auth = AuthorizeCall(tokens_, r.Header("authorization"), Scope::kInfer);
      !auth.ok()) {
    HttpResponse denied = Error(auth);
    if (denied.status == 401) denied.headers.emplace_back("WWW-Authenticate", "Bearer");
    return denied;
  }
  if (p.size() == 1 && p[0] == "v2") {
    if (!get) return WrongMethod(r, "GET");
    inference::ServerMetadataResponse m;
    core_->ServerMetadata(&m);
    m.add_extensions("binary_tensor_data");  // this REST binding's
    if (generation_ != nullptr) m.add_extensions("generate");
    return Json(ServerMetadataToJson(m));
  }
  if (p.size() >= 3 && p[0] == "v2" && p[1] == "repository") return Repository(r, p);
  if (p.size() >= 3 && p[0] == "v2" && p[1] == "models") {
    if (p.size() == 3 || p.size() == 4) return Model(r, p[2], "", p.size() == 4 ? p[3] : "");
    if ((p.size() == 5 || p.size() == 6) && p[3] == "versions") {
      return Model(r, p[2], p[4], p.size() == 6 ? p[5] : "");
    }
  }
  return Error(404, absl::StrCat("no route ", r.method, " ", r.path.substr(0, 200),
                                 " (KServe v2 REST: /v2, /v2/health/{live,ready}, "
                                 "/v2/models/{model}[/versions/{version}][/ready|/infer], "
                                 "/v2/repository/index)"));
}

HttpResponse KServeRest::Repository(const HttpRequest& r, const std::vector<std::string>& p) {
  const bool index = p.size() == 3 && p[2] == "index";
  const bool load = p.size() == 5 && p[2] == "models" && (p[4] == "load" || p[4] == "unload");
  if (!index && !load) {
    return Error(404, absl::StrCat("no route ", r.method, " ", r.path.substr(0, 200),
                                   " (/v2/repository/index, /v2/repository/models/{model}/load "
                                   "or /unload)"));
  }
  if (r.method != "POST") return WrongMethod(r, "POST");
  if (load) {
    absl::Status s = p[4] == "load" ? core_->RepositoryLoad("", p[3])
                                    : core_->RepositoryUnload("", p[3]);
    if (!s.ok()) return Error(core_->Public(s));
    return Json("");
  }
  absl::StatusOr<bool> ready = RepositoryIndexReadyFromJson(r.body);
  if (!ready.ok()) return Error(ready.status());
  inference::RepositoryIndexResponse resp;
  absl::Status s = core_->RepositoryIndex("", *ready, &resp);
  if (!s.ok()) return Error(core_->Public(s));
  return Json(RepositoryIndexToJson(resp));
}

HttpResponse KServeRest::Model(const HttpRequest& r, const std::string& model,
                               const std::string& version, const std::string& action) {
  const bool get = r.method == "GET" || r.method == "HEAD";
  if (action == "infer") {
    if (r.method != "POST") return WrongMethod(r, "POST");
    return Infer(r, model, version);
  }
  if (action == "generate" || action == "generate_stream") {
    if (r.method != "POST") return WrongMethod(r, "POST");
    if (generation_ == nullptr || !version.empty()) {
      return Error(404, absl::StrCat("no route ", r.method, " ", r.path.substr(0, 200)));
    }
    return Generate(r, model, action == "generate_stream");
  }
  if (action == "ready") {
    if (!get) return WrongMethod(r, "GET");
    // Not ready, unknown or without that version: 400, as Triton answers
    // (the protocol wants a 4xx for "not ready").
    absl::StatusOr<std::string> why = core_->NotReadyBecause(model, version);
    if (!why.ok()) return Error(core_->Public(why.status()));
    if (!why->empty()) return Error(400, *why);
    return HttpResponse::Text(200, "");
  }
  if (!action.empty()) {
    return Error(404, absl::StrCat("no route ", r.method, " ", r.path.substr(0, 200)));
  }
  if (!get) return WrongMethod(r, "GET");
  inference::ModelMetadataResponse m;
  absl::Status s = core_->ModelMetadata(model, version, &m);
  if (!s.ok()) return Error(core_->Public(s));
  return Json(ModelMetadataToJson(m));
}

HttpResponse KServeRest::Infer(const HttpRequest& r, const std::string& model,
                               const std::string& version) {
  int64_t json_length = -1;
  if (const std::string h = r.Header("inference-header-content-length"); !h.empty()) {
    if (!absl::SimpleAtoi(h, &json_length) || json_length < 0) {
      return Error(400, absl::StrCat("Inference-Header-Content-Length \"", h.substr(0, 32),
                                     "\" is not a byte count"));
    }
  }
  absl::StatusOr<inference::ModelInferRequest> req =
      InferRequestFromJson(r.body, model, version, json_length);
  if (!req.ok()) return Error(req.status());
  inference::ModelInferResponse resp;
  absl::Status s = core_->Public(core_->Infer(*req, core_->Capped(absl::InfiniteFuture()),
                                              r.client_gone, &resp));
  if (!s.ok()) return Error(s);
  absl::StatusOr<RestBody> body = InferResponseToJson(resp, *req);
  if (!body.ok()) return Error(body.status());
  HttpResponse out = Json(std::move(body->body));
  if (body->json_length >= 0) {
    out.content_type = "application/octet-stream";
    out.headers.emplace_back("Inference-Header-Content-Length", absl::StrCat(body->json_length));
  }
  return out;
}

HttpResponse KServeRest::Generate(const HttpRequest& r, const std::string& model, bool stream) {
  TextPrompt text;
  absl::StatusOr<GenerationRequest> req = GenerationRequestFromJson(r.body, &text);
  if (!req.ok()) return Error(req.status());
  if (!text.input.empty()) return GenerateText(r, model, stream, *std::move(req), text);
  absl::StatusOr<std::shared_ptr<Generator>> gen = generation_->For(model);
  if (!gen.ok()) return Error(core_->Public(gen.status()));
  // Checked before a stream opens, so a bad request gets its status code,
  // not a 200 with the error inside the stream.
  if (absl::Status s = (*gen)->Check(*req); !s.ok()) return Error(s);
  req->deadline = core_->coordinator()->GenerationDeadline();
  const int64_t prompt_tokens = static_cast<int64_t>(req->prompt.size());
  if (!stream) {
    std::vector<int64_t> ids;
    std::string finish;
    absl::Status s = (*gen)->Generate(
        *req,
        [&](const GeneratedToken& t) {
          ids.push_back(t.id);
          finish = t.finish_reason;
          return true;
        },
        r.client_gone);
    if (!s.ok()) return Error(core_->Public(s));
    return Json(GenerateResponseJson(model, ids, finish, prompt_tokens));
  }
  KServeCore* core = core_;
  std::shared_ptr<Generator> g = *gen;
  GenerationRequest request = *std::move(req);
  return HttpResponse::EventStream([core, g, request, prompt_tokens](HttpStream& out) {
    absl::Status s = g->Generate(
        request,
        [&](const GeneratedToken& t) {
          return WriteEvent(out, TokenEventJson(t, prompt_tokens));
        },
        [&out] { return out.ClientGone(); });
    if (!s.ok() && !out.ClientGone()) {
      WriteEvent(out, ErrorJson(core->Public(s).message()));
    }
  });
}

HttpResponse KServeRest::GenerateText(const HttpRequest& r, const std::string& model, bool stream,
                                      GenerationRequest req, const TextPrompt& prompt) {
  absl::StatusOr<TextModel> text = generation_->Text(model);
  if (!text.ok()) return Error(core_->Public(text.status()));
  absl::StatusOr<std::vector<int64_t>> ids = text->tokenizer->Encode(prompt.input,
                                                                       /*add_bos=*/true);
  if (!ids.ok()) return Error(ids.status());
  req.prompt = *std::move(ids);
  if (absl::Status s = text->generator->Check(req); !s.ok()) return Error(s);
  req.deadline = core_->coordinator()->GenerationDeadline();
  const int64_t prompt_tokens = static_cast<int64_t>(req.prompt.size());
  if (!stream) {
    std::string out;
    absl::StatusOr<Completion> c = Complete(
        *text->generator, *text->tokenizer, req, prompt.stop,
        [&](absl::string_view s) { return out.append(s.data(), s.size()), true; }, r.client_gone);
    if (!c.ok()) return Error(core_->Public(c.status()));
    return Json(GenerateTextResponseJson(model, out, c->finish_reason, prompt_tokens, c->tokens));
  }
  KServeCore* core = core_;
  TextModel m = *std::move(text);
  std::vector<std::string> stop = prompt.stop;
  return HttpResponse::EventStream([core, m, req, stop, model, prompt_tokens](HttpStream& out) {
    auto event = [&](const std::string& json) { return WriteEvent(out, json); };
    absl::StatusOr<Completion> c = Complete(
        *m.generator, *m.tokenizer, req, stop,
        [&](absl::string_view s) { return event(TextEventJson(model, s, "", 0, 0)); },
        [&out] { return out.ClientGone(); });
    if (out.ClientGone()) return;
    if (!c.ok()) {
      event(ErrorJson(core->Public(c.status()).message()));
      return;
    }
    event(TextEventJson(model, "", c->finish_reason, prompt_tokens, c->tokens));
  });
}

}  // namespace pipeserve
