#include "server/coordinator/kserve_service.h"

#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/types/optional.h"
#include "common/grpc_status.h"
#include "common/model_name.h"
#include "common/status_macros.h"
#include "graph/dtype.h"
#include "server/coordinator/kserve_request.h"
#include "server/coordinator/redact.h"
#include "server/coordinator/trace.h"

namespace pipeserve {
namespace {

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

KServeService::KServeService(KServeCore* core, const TokenSet* tokens, KServeOptions options)
    : coordinator_(core->coordinator()),
      tokens_(tokens),
      options_(options),
      core_(core),
      idle_streams_(options.stream_idle_timeout),
      stream_pool_(options.stream_threads) {}

absl::Time KServeService::ClientDeadline(const grpc::ServerContext& ctx) {
  auto d = ctx.deadline();
  if (d >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(d);
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
  resp->set_ready(core_->ServerReady());
  return grpc::Status::OK;
}

grpc::Status KServeService::ModelReady(grpc::ServerContext* ctx,
                                       const inference::ModelReadyRequest* req,
                                       inference::ModelReadyResponse* resp) {
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!auth.ok()) return ToGrpcStatus(auth);
  absl::StatusOr<std::string> why = core_->NotReadyBecause(req->name(), req->version());
  if (!why.ok()) return ToGrpcStatus(core_->Public(why.status()));
  resp->set_ready(why->empty());
  return grpc::Status::OK;
}

grpc::Status KServeService::ServerMetadata(grpc::ServerContext* ctx,
                                           const inference::ServerMetadataRequest*,
                                           inference::ServerMetadataResponse* resp) {
  absl::Status s = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!s.ok()) return ToGrpcStatus(s);
  core_->ServerMetadata(resp);
  return grpc::Status::OK;
}

grpc::Status KServeService::ModelMetadata(grpc::ServerContext* ctx,
                                          const inference::ModelMetadataRequest* req,
                                          inference::ModelMetadataResponse* resp) {
  absl::Status s = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (s.ok()) s = core_->ModelMetadata(req->name(), req->version(), resp);
  return ToGrpcStatus(core_->Public(s));
}

grpc::Status KServeService::ModelInfer(grpc::ServerContext* ctx,
                                       const inference::ModelInferRequest* req,
                                       inference::ModelInferResponse* resp) {
  ActiveCall active(this);
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!auth.ok()) return ToGrpcStatus(auth);
  return ToGrpcStatus(
      core_->Public(core_->Infer(*req, core_->Capped(ClientDeadline(*ctx)),
                               [ctx] { return ctx->IsCancelled(); }, resp)));
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
    const absl::Time deadline = core_->Capped(stream_deadline);
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
    core_->Meter(req.model_name(), admitted.status(), absl::ZeroDuration());
    inference::ModelStreamInferResponse out;
    Respond(st, req, admitted.status(), &out);
    return;
  }
  auto admission = std::make_shared<Coordinator::Admission>(*std::move(admitted));
  const std::string model = req.model_name();
  stream_pool_.Submit(model, [this, st, req = std::move(req), deadline, admission] {
    inference::ModelStreamInferResponse out;
    grpc::ServerContext* ctx = st->ctx;
    absl::Status s = core_->Infer(req, deadline, [ctx] { return ctx->IsCancelled(); },
                           out.mutable_infer_response(), admission.get());
    Respond(st, req, s, &out);
  });
}

void KServeService::Respond(const std::shared_ptr<Stream>& st,
                            const inference::ModelInferRequest& req, const absl::Status& result,
                            inference::ModelStreamInferResponse* out) {
  const absl::Status s = core_->Public(result);
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
  absl::Status s = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (s.ok()) s = core_->RepositoryIndex(req->repository_name(), req->ready(), resp);
  return ToGrpcStatus(s);
}

grpc::Status KServeService::RepositoryModelLoad(grpc::ServerContext* ctx,
                                                const inference::RepositoryModelLoadRequest* req,
                                                inference::RepositoryModelLoadResponse*) {
  absl::Status s = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (s.ok()) s = core_->RepositoryLoad(req->repository_name(), req->model_name());
  return ToGrpcStatus(core_->Public(s));
}

grpc::Status KServeService::RepositoryModelUnload(
    grpc::ServerContext* ctx, const inference::RepositoryModelUnloadRequest* req,
    inference::RepositoryModelUnloadResponse*) {
  absl::Status s = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (s.ok()) s = core_->RepositoryUnload(req->repository_name(), req->model_name());
  return ToGrpcStatus(s);
}

}  // namespace pipeserve
