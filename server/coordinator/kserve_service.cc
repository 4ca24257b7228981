#include "server/coordinator/kserve_service.h"

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "common/model_name.h"
#include "common/status_macros.h"
#include "runtime/dtype.h"
#include "server/coordinator/kserve_request.h"
#include "server/coordinator/trace.h"

namespace pipeserve {
namespace {

// Whether the request asks for its timeline: parameter "trace" true (a
// bool, or the string "true"); kInvalidArgument for anything else.
absl::StatusOr<bool> TraceRequested(const inference::ModelInferRequest& req) {
  auto it = req.parameters().find("trace");
  if (it == req.parameters().end()) return false;
  const inference::InferParameter& p = it->second;
  if (p.parameter_choice_case() == inference::InferParameter::kBoolParam) return p.bool_param();
  if (p.parameter_choice_case() == inference::InferParameter::kStringParam &&
      (p.string_param() == "true" || p.string_param() == "false")) {
    return p.string_param() == "true";
  }
  return absl::InvalidArgumentError(
      "parameter \"trace\" must be a bool (true: the response's parameter \"trace\" holds the "
      "request's timeline as Chrome trace JSON)");
}

// A request's model_version against the version serving: "" for any.
absl::Status CheckVersion(const std::string& model, int64_t serving, const std::string& version) {
  if (version.empty() || version == absl::StrCat(serving)) return absl::OkStatus();
  return absl::NotFoundError(absl::StrCat("model \"", model, "\" has no version \"",
                                          version.substr(0, 64), "\" (it serves version ",
                                          serving, "; each upload of a name is its next version)"));
}

absl::Time DeadlineOf(grpc::ServerContext* ctx) {
  auto d = ctx->deadline();
  if (d >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(d);
}

void AddTensorMetadata(const ValueSpec& v,
                       google::protobuf::RepeatedPtrField<
                           inference::ModelMetadataResponse::TensorMetadata>* out) {
  auto* m = out->Add();
  m->set_name(v.name());
  m->set_datatype(KServeName(v.dtype() == DT_INVALID ? DT_FLOAT32 : v.dtype()));
  for (int64_t d : v.shape()) m->add_shape(d);
}

}  // namespace

KServeService::KServeService(Coordinator* coordinator, Metrics* metrics, const TokenSet* tokens,
                             KServeOptions options)
    : coordinator_(coordinator),
      metrics_(metrics),
      tokens_(tokens),
      options_(options),
      stream_pool_(options.stream_threads) {}

// Liveness and readiness answer anyone, as grpc.health.v1 does: probes
// carry no tokens, and the answers reveal nothing else.
grpc::Status KServeService::ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                                       inference::ServerLiveResponse* resp) {
  resp->set_live(true);
  return grpc::Status::OK;
}

grpc::Status KServeService::ServerReady(grpc::ServerContext*,
                                        const inference::ServerReadyRequest*,
                                        inference::ServerReadyResponse* resp) {
  resp->set_ready(coordinator_->Serving());
  return grpc::Status::OK;
}

absl::StatusOr<ModelInfo> KServeService::GetModel(const grpc::ServerContext& ctx,
                                                  const std::string& name,
                                                  const std::string& version) {
  RETURN_IF_ERROR(AuthorizeCall(tokens_, ctx, Scope::kInfer));
  RETURN_IF_ERROR(ValidModelName(name));
  ASSIGN_OR_RETURN(ModelInfo info, coordinator_->GetModel(name));
  RETURN_IF_ERROR(CheckVersion(name, info.version, version));
  return info;
}

grpc::Status KServeService::ModelReady(grpc::ServerContext* ctx,
                                       const inference::ModelReadyRequest* req,
                                       inference::ModelReadyResponse* resp) {
  absl::StatusOr<ModelInfo> info = GetModel(*ctx, req->name(), req->version());
  if (!info.ok()) return ToGrpcStatus(info.status());
  resp->set_ready(info->state == ModelState::kReady);
  return grpc::Status::OK;
}

grpc::Status KServeService::ServerMetadata(grpc::ServerContext* ctx,
                                           const inference::ServerMetadataRequest*,
                                           inference::ServerMetadataResponse* resp) {
  absl::Status s = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!s.ok()) return ToGrpcStatus(s);
  resp->set_name("pipeserve");
  resp->set_version("0.2.0");
  resp->add_extensions("model_repository");
  resp->add_extensions("pipeline_parallel");
  return grpc::Status::OK;
}

grpc::Status KServeService::ModelMetadata(grpc::ServerContext* ctx,
                                          const inference::ModelMetadataRequest* req,
                                          inference::ModelMetadataResponse* resp) {
  absl::StatusOr<ModelInfo> info = GetModel(*ctx, req->name(), req->version());
  if (!info.ok()) return ToGrpcStatus(info.status());
  resp->set_name(info->name);
  resp->add_versions(absl::StrCat(info->version));
  resp->set_platform("pipeserve");
  for (const ValueSpec& in : info->plan->inputs()) AddTensorMetadata(in, resp->mutable_inputs());
  for (const ValueSpec& out : info->plan->outputs()) AddTensorMetadata(out, resp->mutable_outputs());
  return grpc::Status::OK;
}

absl::Status KServeService::Infer(const inference::ModelInferRequest& req, absl::Time deadline,
                                  const std::function<bool()>& cancelled,
                                  inference::ModelInferResponse* resp) {
  absl::Time start = absl::Now();
  absl::Status s = InferUnmetered(req, deadline, cancelled, resp);
  if (metrics_ != nullptr) {
    // Only models that exist get a series of their own: names from
    // requests would otherwise grow the metrics without bound.
    if (coordinator_->GetModel(req.model_name()).ok()) {
      metrics_->RecordInference(req.model_name(), s, absl::Now() - start);
    } else {
      metrics_->RecordUnknownModelInference(s, absl::Now() - start);
    }
  }
  return s;
}

absl::Status KServeService::InferUnmetered(const inference::ModelInferRequest& req,
                                           absl::Time deadline,
                                           const std::function<bool()>& cancelled,
                                           inference::ModelInferResponse* resp) {
  RETURN_IF_ERROR(ValidModelName(req.model_name()));
  // One deployment for the whole request: its plan checks the inputs, runs
  // them, and names the outputs (a retry moves only to one with the same
  // signature, and only to the same version if the request named one).
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> model, coordinator_->Find(req.model_name()));
  const int64_t serving = model->version();
  RETURN_IF_ERROR(CheckVersion(req.model_name(), serving, req.model_version()));
  ASSIGN_OR_RETURN(std::vector<Tensor> inputs, ParseInferInputs(req, model->plan()));
  ASSIGN_OR_RETURN(std::vector<int> chosen, ChooseOutputs(req, model->plan()));
  ASSIGN_OR_RETURN(const bool traced, TraceRequested(req));
  int64_t answered = serving;
  std::vector<TraceSpan> spans;
  ASSIGN_OR_RETURN(std::vector<Tensor> outputs,
                   coordinator_->InferOn(model, inputs, deadline, cancelled,
                                         req.model_version().empty() ? 0 : serving, &answered,
                                         traced ? &spans : nullptr));
  BuildInferResponse(req, model->plan(), chosen, outputs, resp);
  resp->set_model_version(absl::StrCat(answered));
  if (traced) {
    (*resp->mutable_parameters())["trace"].set_string_param(
        TraceToChromeJson(spans, model->Info()));
  }
  return absl::OkStatus();
}

grpc::Status KServeService::ModelInfer(grpc::ServerContext* ctx,
                                       const inference::ModelInferRequest* req,
                                       inference::ModelInferResponse* resp) {
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!auth.ok()) return ToGrpcStatus(auth);
  return ToGrpcStatus(Infer(*req, DeadlineOf(ctx), [ctx] { return ctx->IsCancelled(); }, resp));
}

grpc::Status KServeService::ModelStreamInfer(
    grpc::ServerContext* ctx,
    grpc::ServerReaderWriter<inference::ModelStreamInferResponse, inference::ModelInferRequest>*
        stream) {
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!auth.ok()) return ToGrpcStatus(auth);
  // Requests run on the shared pool, at most stream_inflight of this
  // stream's at once (the stream is not read further until one finishes);
  // responses are written as they finish, one at a time. The state is
  // shared with the work so it outlives the last request's unlock.
  struct StreamState {
    absl::Mutex mu;
    int inflight ABSL_GUARDED_BY(mu) = 0;
    absl::Mutex write_mu;
  };
  auto state = std::make_shared<StreamState>();
  const int limit = options_.stream_inflight;
  auto below = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state->mu) { return state->inflight < limit; };
  auto idle = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state->mu) { return state->inflight == 0; };
  const absl::Time deadline = DeadlineOf(ctx);
  inference::ModelInferRequest req;
  while (true) {
    {
      absl::MutexLock lock(&state->mu);
      state->mu.Await(absl::Condition(&below));
    }
    if (!stream->Read(&req)) break;
    {
      absl::MutexLock lock(&state->mu);
      ++state->inflight;
    }
    stream_pool_.Submit([this, state, ctx, stream, deadline, req] {
      inference::ModelStreamInferResponse out;
      absl::Status s = Infer(req, deadline, [ctx] { return ctx->IsCancelled(); },
                             out.mutable_infer_response());
      if (!s.ok()) {
        out.clear_infer_response();
        out.set_error_message(absl::StrCat(absl::StatusCodeToString(s.code()), ": ",
                                           s.message().substr(0, kMaxStatusMessageBytes)));
        out.mutable_infer_response()->set_id(req.id().substr(0, 256));
        out.mutable_infer_response()->set_model_name(req.model_name().substr(0, 128));
      }
      {
        absl::MutexLock lock(&state->write_mu);
        stream->Write(out);
      }
      absl::MutexLock lock(&state->mu);
      --state->inflight;
    });
  }
  absl::MutexLock lock(&state->mu);
  state->mu.Await(absl::Condition(&idle));
  return grpc::Status::OK;
}

grpc::Status KServeService::RepositoryIndex(grpc::ServerContext* ctx,
                                            const inference::RepositoryIndexRequest* req,
                                            inference::RepositoryIndexResponse* resp) {
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!auth.ok()) return ToGrpcStatus(auth);
  for (const ModelInfo& m : coordinator_->ListModels()) {
    if (req->ready() && m.state != ModelState::kReady) continue;
    auto* idx = resp->add_models();
    idx->set_name(m.name);
    idx->set_version(absl::StrCat(m.version));
    idx->set_state(ModelStateName(m.state));
    idx->set_reason(m.reason);
  }
  return grpc::Status::OK;
}

}  // namespace pipeserve
