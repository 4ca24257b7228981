#include "server/coordinator/model_service.h"

#include "absl/strings/str_cat.h"
#include "absl/types/optional.h"
#include "common/grpc_status.h"

namespace pipeserve {

ModelServiceImpl::ModelServiceImpl(Coordinator* coordinator, const TokenSet* tokens,
                                   absl::Duration upload_idle_timeout)
    : coordinator_(coordinator), tokens_(tokens), idle_(upload_idle_timeout) {}

grpc::Status ModelServiceImpl::Upload(grpc::ServerContext* ctx,
                                      grpc::ServerReader<UploadRequest>* reader,
                                      UploadResponse* response) {
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kAdmin);
  if (!auth.ok()) return ToGrpcStatus(auth);
  // A cancelled read returns false here, which ends the upload (nothing
  // stored) and frees its slot.
  absl::optional<IdleWatchdog::Watch> watch;
  watch.emplace(&idle_, [ctx] { ctx->TryCancel(); });
  auto read = [&](UploadRequest* req) {
    bool ok = reader->Read(req);
    watch->Touch();
    return ok;
  };

  UploadRequest req;
  if (!read(&req)) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "empty upload");
  }
  const std::string name = req.name();
  const UploadOptions options = req.options();
  absl::StatusOr<std::unique_ptr<PendingUpload>> upload = coordinator_->StartUpload(name);
  if (!upload.ok()) return ToGrpcStatus(upload.status());
  // The staged file is discarded unless FinishUpload commits it.
  bool last = false;
  uint64_t total = 0;
  uint32_t crc = 0;
  do {
    if (last) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("upload of \"", name, "\": data after the last chunk"));
    }
    absl::Status s = (*upload)->Append(req.data());
    if (!s.ok()) return ToGrpcStatus(s);
    if (req.last()) {
      last = true;
      total = req.total_bytes();
      crc = req.crc32();
    }
  } while (read(&req));
  if (ctx->IsCancelled()) {
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                        absl::StrCat("upload of \"", name, "\" sent nothing for ",
                                     absl::FormatDuration(idle_.timeout()),
                                     " or was cancelled; nothing was stored"));
  }
  if (!last) {
    return grpc::Status(grpc::StatusCode::DATA_LOSS,
                        absl::StrCat("upload of \"", name, "\" ended after ", (*upload)->bytes(),
                                     " bytes without its last chunk; nothing was stored"));
  }
  // Every byte is in: the deploy takes what it takes (a large model's
  // load can outlast the idle timeout), so the watchdog lets go.
  watch.reset();
  absl::StatusOr<UploadResponse> r =
      coordinator_->FinishUpload(name, options, *std::move(upload), total, crc);
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = *r;
  return grpc::Status::OK;
}

grpc::Status ModelServiceImpl::Unload(grpc::ServerContext* ctx, const UnloadRequest* req,
                                      UnloadResponse*) {
  absl::Status s = AuthorizeCall(tokens_, *ctx, Scope::kAdmin);
  if (s.ok()) s = coordinator_->Unload(req->name());
  return ToGrpcStatus(s);
}

grpc::Status ModelServiceImpl::GetPlan(grpc::ServerContext* ctx, const GetPlanRequest* req,
                                       GetPlanResponse* response) {
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kAdmin);
  if (!auth.ok()) return ToGrpcStatus(auth);
  absl::StatusOr<ModelInfo> info = coordinator_->GetModel(req->name());
  if (!info.ok()) return ToGrpcStatus(info.status());
  response->set_name(info->name);
  *response->mutable_plan() = *info->plan;
  for (const std::string& s : info->servers) response->add_stage_servers(s);
  response->set_microbatches(info->microbatches);
  response->set_replicas(info->replicas);
  response->set_ready_replicas(info->ready_replicas);
  response->set_max_batch_rows(static_cast<int32_t>(info->batching.max_rows));
  response->set_max_batches_in_flight(info->batching.max_in_flight);
  response->set_max_queue_delay_us(absl::ToInt64Microseconds(info->batching.max_queue_delay));
  response->set_state(ModelStateName(info->state));
  response->set_deployment(info->deployment);
  for (double seconds : coordinator_->MeasuredComputeSeconds(info->name)) {
    response->add_measured_compute_us(seconds * 1e6);
  }
  return grpc::Status::OK;
}

grpc::Status ModelServiceImpl::ListModels(grpc::ServerContext* ctx, const ListModelsRequest*,
                                          ListModelsResponse* response) {
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kAdmin);
  if (!auth.ok()) return ToGrpcStatus(auth);
  for (const ModelInfo& m : coordinator_->ListModels()) {
    ModelSummary* s = response->add_models();
    s->set_name(m.name);
    s->set_state(ModelStateName(m.state));
    s->set_num_stages(m.plan->stages_size());
    s->set_bytes(m.bytes);
    s->set_reason(m.reason);
    s->set_replicas(m.replicas);
    s->set_ready_replicas(m.ready_replicas);
  }
  return grpc::Status::OK;
}

}  // namespace pipeserve
