#include "server/model_service.h"

#include "absl/strings/str_cat.h"
#include "server/stage_service.h"

namespace pipeserve {

grpc::Status ModelServiceImpl::Upload(grpc::ServerContext*,
                                      grpc::ServerReader<UploadRequest>* reader,
                                      UploadResponse* response) {
  UploadRequest req;
  if (!reader->Read(&req)) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "empty upload");
  }
  const std::string name = req.name();
  const UploadOptions options = req.options();
  absl::StatusOr<std::unique_ptr<PendingUpload>> upload = coordinator_->StartUpload(name);
  if (!upload.ok()) return ToGrpc(upload.status());
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
    if (!s.ok()) return ToGrpc(s);
    if (req.last()) {
      last = true;
      total = req.total_bytes();
      crc = req.crc32();
    }
  } while (reader->Read(&req));
  if (!last) {
    return grpc::Status(grpc::StatusCode::DATA_LOSS,
                        absl::StrCat("upload of \"", name, "\" ended after ", (*upload)->bytes(),
                                     " bytes without its last chunk; nothing was stored"));
  }
  absl::StatusOr<UploadResponse> r =
      coordinator_->FinishUpload(name, options, *std::move(upload), total, crc);
  if (!r.ok()) return ToGrpc(r.status());
  *response = *r;
  return grpc::Status::OK;
}

grpc::Status ModelServiceImpl::GetPlan(grpc::ServerContext*, const GetPlanRequest* req,
                                       GetPlanResponse* response) {
  absl::StatusOr<ModelInfo> info = coordinator_->GetModel(req->name());
  if (!info.ok()) return ToGrpc(info.status());
  response->set_name(info->name);
  *response->mutable_plan() = *info->plan;
  for (const std::string& s : info->servers) response->add_stage_servers(s);
  response->set_microbatches(info->microbatches);
  response->set_state(ModelStateName(info->state));
  return grpc::Status::OK;
}

grpc::Status ModelServiceImpl::ListModels(grpc::ServerContext*, const ListModelsRequest*,
                                          ListModelsResponse* response) {
  for (const ModelInfo& m : coordinator_->ListModels()) {
    ModelSummary* s = response->add_models();
    s->set_name(m.name);
    s->set_state(ModelStateName(m.state));
    s->set_num_stages(m.plan->stages_size());
    s->set_bytes(m.bytes);
    s->set_reason(m.reason);
  }
  return grpc::Status::OK;
}

}  // namespace pipeserve
