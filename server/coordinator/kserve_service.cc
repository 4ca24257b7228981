#include "server/coordinator/kserve_service.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/types/optional.h"
#include "common/grpc_status.h"
#include "common/model_name.h"
#include "common/status_macros.h"
#include "runtime/dtype.h"
#include "server/coordinator/kserve_request.h"
#include "server/coordinator/redact.h"
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


void AddTensorMetadata(const ValueSpec& v,
                       google::protobuf::RepeatedPtrField<
                           inference::ModelMetadataResponse::TensorMetadata>* out) {
  auto* m = out->Add();
  m->set_name(v.name());
  m->set_datatype(KServeName(v.dtype() == DT_INVALID ? DT_FLOAT32 : v.dtype()));
  for (int64_t d : v.shape()) m->add_shape(d);
}

}  // namespace

// One open ModelStreamInfer stream. The state is shared with the work the
// stream queued, so it outlives the last request's unlock.
struct KServeService::Stream {
  grpc::ServerContext* ctx;
  StreamIo* io;  // reads on the handler's thread, writes under write_mu
  std::string client;  // the peer: one client connection
  absl::Mutex mu;
  int inflight ABSL_GUARDED_BY(mu) = 0;
  IdleWatchdog::Watch* watch = nullptr;  // the handler's, touched on every read and write
  absl::Mutex write_mu;
};

KServeService::KServeService(Coordinator* coordinator, Metrics* metrics, const TokenSet* tokens,
                             KServeOptions options)
    : coordinator_(coordinator),
      metrics_(metrics),
      tokens_(tokens),
      options_(options),
      idle_streams_(options.stream_idle_timeout),
      stream_pool_(options.stream_threads) {}

absl::Time KServeService::ClientDeadline(const grpc::ServerContext& ctx) {
  auto d = ctx.deadline();
  if (d >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(d);
}

absl::Time KServeService::Capped(absl::Time client_deadline) const {
  if (client_deadline == absl::InfiniteFuture()) {
    return client_deadline;  // none: the default applies (it is below the cap)
  }
  return std::min(client_deadline, absl::Now() + options_.max_timeout);
}

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
  if (!info.ok()) return ToGrpcStatus(Public(info.status()));
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
  if (!info.ok()) return ToGrpcStatus(Public(info.status()));
  resp->set_name(info->name);
  resp->add_versions(absl::StrCat(info->version));
  resp->set_platform("pipeserve");
  for (const ValueSpec& in : info->plan->inputs()) AddTensorMetadata(in, resp->mutable_inputs());
  for (const ValueSpec& out : info->plan->outputs()) AddTensorMetadata(out, resp->mutable_outputs());
  return grpc::Status::OK;
}

absl::Status KServeService::Infer(const inference::ModelInferRequest& req, absl::Time deadline,
                                  const std::function<bool()>& cancelled,
                                  inference::ModelInferResponse* resp,
                                  const Coordinator::Admission* admission) {
  absl::Time start = absl::Now();
  absl::Status s = InferUnmetered(req, deadline, cancelled, resp, admission);
  Meter(req.model_name(), s, absl::Now() - start);
  return s;
}

absl::Status KServeService::Public(const absl::Status& s) {
  if (s.ok()) return s;
  absl::Status shown = RedactAddresses(s, *coordinator_->StageServerAddresses());
  if (shown.message() == s.message()) return shown;
  // The full message goes to the log, at most 10 a second (errors come in
  // bursts exactly when a server fails).
  absl::MutexLock lock(&log_mu_);
  const absl::Time now = absl::Now();
  if (now - log_window_ >= absl::Seconds(1)) {
    if (log_suppressed_ > 0) {
      std::cerr << "coordinator: (" << log_suppressed_ << " more redacted errors not logged)\n";
    }
    log_window_ = now;
    log_lines_ = log_suppressed_ = 0;
  }
  if (log_lines_++ < 10) {
    std::cerr << "coordinator: told a client \"" << shown.message() << "\" for: " << s.message()
              << "\n";
  } else {
    ++log_suppressed_;
  }
  return shown;
}

void KServeService::Meter(const std::string& model, const absl::Status& s, absl::Duration took) {
  if (metrics_ == nullptr) return;
  // Only models that exist get a series of their own: names from
  // requests would otherwise grow the metrics without bound.
  if (coordinator_->Knows(model)) {
    metrics_->RecordInference(model, s, took);
  } else {
    metrics_->RecordUnknownModelInference(s, took);
  }
}

absl::Status KServeService::InferUnmetered(const inference::ModelInferRequest& req,
                                           absl::Time deadline,
                                           const std::function<bool()>& cancelled,
                                           inference::ModelInferResponse* resp,
                                           const Coordinator::Admission* admission) {
  RETURN_IF_ERROR(ValidModelName(req.model_name()));
  // One deployment for the whole request: its plan checks the inputs, runs
  // them, and names the outputs (a retry moves only to one with the same
  // signature, and only to the same version if the request named one).
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> model, coordinator_->Find(req.model_name()));
  const int64_t serving = model->version();
  RETURN_IF_ERROR(CheckVersion(req.model_name(), serving, req.model_version()));
  if (model->plan().has_generation() && !options_.allow_generation_infer) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model \"", req.model_name(), "\" was exported for generation: ask "
        "pipeserve.GenerationService/Generate for its tokens (ModelInfer on its cache-aware "
        "graph could overwrite the KV cache of generations in flight; the coordinator's "
        "--allow_generation_infer allows it)"));
  }
  ASSIGN_OR_RETURN(std::vector<Tensor> inputs, ParseInferInputs(req, model->plan()));
  ASSIGN_OR_RETURN(std::vector<int> chosen, ChooseOutputs(req, model->plan()));
  ASSIGN_OR_RETURN(const bool traced, TraceRequested(req));
  absl::optional<Coordinator::Admission> own;  // a ModelInfer call's (a stream's come admitted)
  if (admission == nullptr) {
    ASSIGN_OR_RETURN(Coordinator::Admission admitted, coordinator_->Admit(model->name()));
    admission = &own.emplace(std::move(admitted));
  }
  int64_t answered = serving;
  std::vector<TraceSpan> spans;
  RequestOptions options;
  options.deadline = deadline;
  options.cancelled = cancelled;
  options.pinned_version = req.model_version().empty() ? 0 : serving;
  options.answered_version = &answered;
  options.trace = traced ? &spans : nullptr;
  absl::StatusOr<std::vector<Tensor>> outputs =
      coordinator_->InferAdmitted(*admission, model, inputs, options);
  if (!outputs.ok()) return outputs.status();
  BuildInferResponse(req, model->plan(), chosen, *outputs, resp);
  resp->set_model_version(absl::StrCat(answered));
  if (traced) {
    // The timeline names stages and replicas, not their servers' addresses
    // (the infer scope does not see those; an admin's plan lists them).
    ModelInfo info = model->Info();
    info.servers.clear();
    (*resp->mutable_parameters())["trace"].set_string_param(TraceToChromeJson(spans, info));
  }
  return absl::OkStatus();
}

grpc::Status KServeService::ModelInfer(grpc::ServerContext* ctx,
                                       const inference::ModelInferRequest* req,
                                       inference::ModelInferResponse* resp) {
  ActiveCall active(this);
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!auth.ok()) return ToGrpcStatus(auth);
  return ToGrpcStatus(
      Public(Infer(*req, Capped(ClientDeadline(*ctx)), [ctx] { return ctx->IsCancelled(); }, resp)));
}

grpc::Status KServeService::ModelStreamInfer(
    grpc::ServerContext* ctx,
    grpc::ServerReaderWriter<inference::ModelStreamInferResponse, inference::ModelInferRequest>*
        stream) {
  ActiveCall active(this);
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!auth.ok()) return ToGrpcStatus(auth);
  absl::StatusOr<std::shared_ptr<Stream>> st = OpenStream(ctx, stream);
  if (!st.ok()) return ToGrpcStatus(st.status());
  // Ended when it sends nothing, with nothing in flight, for
  // stream_idle_timeout: its handler thread is not held for good.
  Stream& open = **st;
  IdleWatchdog::Watch watch(&idle_streams_, [ctx] { ctx->TryCancel(); }, [&open] {
    absl::MutexLock lock(&open.mu);
    return open.inflight > 0;
  });
  open.watch = &watch;
  ReadRequests(*st);
  {
    absl::MutexLock lock(&open.mu);
    auto idle = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(open.mu) { return open.inflight == 0; };
    open.mu.Await(absl::Condition(&idle));
  }
  CloseStream(*st);
  // A handler whose call was cancelled (TryCancel) must say so.
  if (watch.cancelled()) {
    return grpc::Status(grpc::StatusCode::CANCELLED,
                        absl::StrCat("the stream sent nothing for ",
                                     absl::FormatDuration(options_.stream_idle_timeout),
                                     " with nothing in flight (--stream_idle_timeout_s)"));
  }
  return grpc::Status::OK;
}

void KServeService::ReadRequests(const std::shared_ptr<Stream>& st) {
  // Requests run on the shared pool, at most stream_inflight of this
  // stream's at once (the stream is not read further until one finishes);
  // responses are written as they finish, one at a time.
  const int limit = options_.stream_inflight;
  const absl::Time stream_deadline = ClientDeadline(*st->ctx);
  inference::ModelInferRequest req;
  while (true) {
    {
      absl::MutexLock lock(&st->mu);
      auto below = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(st->mu) { return st->inflight < limit; };
      st->mu.Await(absl::Condition(&below));
    }
    if (!st->io->Read(&req)) break;
    {
      // In flight from now (so never idle), until answered.
      absl::MutexLock lock(&st->mu);
      ++st->inflight;
    }
    st->watch->Touch();
    // The stream's deadline (capped), or the default, from the request's
    // arrival: it counts while the request waits for a thread.
    const absl::Time deadline = Capped(stream_deadline);
    Queue(st, std::move(req),
          deadline != absl::InfiniteFuture() ? deadline
                                             : absl::Now() + coordinator_->default_timeout());
  }
}

void KServeService::Queue(const std::shared_ptr<Stream>& st, inference::ModelInferRequest req,
                          absl::Time deadline) {
  // Counted against its model's queue before it waits for a thread.
  absl::StatusOr<Coordinator::Admission> admitted = coordinator_->Admit(req.model_name());
  if (!admitted.ok()) {
    Meter(req.model_name(), admitted.status(), absl::ZeroDuration());
    inference::ModelStreamInferResponse out;
    Respond(st, req, admitted.status(), &out);
    return;
  }
  auto admission = std::make_shared<Coordinator::Admission>(*std::move(admitted));
  const std::string model = req.model_name();
  stream_pool_.Submit(model, [this, st, req = std::move(req), deadline, admission] {
    inference::ModelStreamInferResponse out;
    grpc::ServerContext* ctx = st->ctx;
    absl::Status s = Infer(req, deadline, [ctx] { return ctx->IsCancelled(); },
                           out.mutable_infer_response(), admission.get());
    Respond(st, req, s, &out);
  });
}

void KServeService::Respond(const std::shared_ptr<Stream>& st,
                            const inference::ModelInferRequest& req, const absl::Status& result,
                            inference::ModelStreamInferResponse* out) {
  const absl::Status s = Public(result);
  if (!s.ok()) {
    out->clear_infer_response();
    out->set_error_message(absl::StrCat(absl::StatusCodeToString(s.code()), ": ",
                                        s.message().substr(0, kMaxStatusMessageBytes)));
    out->mutable_infer_response()->set_id(req.id().substr(0, 256));
    out->mutable_infer_response()->set_model_name(req.model_name().substr(0, 128));
  }
  {
    absl::MutexLock lock(&st->write_mu);
    st->io->Write(*out);
  }
  st->watch->Touch();  // before the handler, seeing nothing in flight, may end
  absl::MutexLock lock(&st->mu);
  --st->inflight;
}

absl::StatusOr<std::shared_ptr<KServeService::Stream>> KServeService::OpenStream(
    grpc::ServerContext* ctx, StreamIo* io) {
  auto st = std::make_shared<Stream>();
  st->ctx = ctx;
  st->io = io;
  st->client = ctx->peer();
  absl::MutexLock lock(&streams_mu_);
  if (static_cast<int>(streams_.size()) >= options_.max_streams) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "this coordinator has ", streams_.size(), " ModelStreamInfer streams open, its limit "
        "(--max_streams); use ModelInfer, or share a stream"));
  }
  const auto mine = std::count_if(streams_.begin(), streams_.end(),
                                  [&st](const auto& open) { return open->client == st->client; });
  if (mine >= options_.max_streams_per_client) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "this connection has ", mine, " ModelStreamInfer streams open, the limit per client "
        "connection (--max_streams_per_client); one stream carries many requests"));
  }
  streams_.push_back(st);
  return st;
}

void KServeService::CloseStream(const std::shared_ptr<Stream>& st) {
  absl::MutexLock lock(&streams_mu_);
  streams_.erase(std::remove(streams_.begin(), streams_.end(), st), streams_.end());
}

grpc::Status KServeService::RepositoryIndex(grpc::ServerContext* ctx,
                                            const inference::RepositoryIndexRequest* req,
                                            inference::RepositoryIndexResponse* resp) {
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!auth.ok()) return ToGrpcStatus(auth);
  const std::shared_ptr<const std::vector<std::string>> known =
      coordinator_->StageServerAddresses();
  for (const ModelInfo& m : coordinator_->ListModels()) {
    if (req->ready() && m.state != ModelState::kReady) continue;
    auto* idx = resp->add_models();
    idx->set_name(m.name);
    idx->set_version(absl::StrCat(m.version));
    idx->set_state(ModelStateName(m.state));
    idx->set_reason(RedactAddresses(m.reason, *known));
  }
  return grpc::Status::OK;
}

}  // namespace pipeserve
