#include "server/coordinator/grpc_stage_client.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "proto/pipeserve_service.grpc.pb.h"
#include "server/transport/frame_stream.h"

namespace pipeserve {
namespace {

constexpr size_t kWeightChunkBytes = 1 << 20;

class GrpcSubscription : public StageClient::Subscription {
 public:
  explicit GrpcSubscription(std::unique_ptr<ResultsSubscription> s) : s_(std::move(s)) {}

 private:
  std::unique_ptr<ResultsSubscription> s_;
};

}  // namespace

void GrpcStageClient::Prepare(grpc::ClientContext* ctx, absl::Time deadline) const {
  channels_->Prepare(ctx);
  ctx->set_deadline(absl::ToChronoTime(deadline));
}

absl::Status GrpcStageClient::LoadStage(const std::string& address, const StageSpec& spec,
                                        const WeightReader& weights, absl::Time deadline) {
  auto stub = StageService::NewStub(channels_->To(address));
  grpc::ClientContext ctx;
  Prepare(&ctx, deadline);
  LoadStageResponse resp;
  auto writer = stub->LoadStage(&ctx, &resp);
  LoadStageRequest req;
  *req.mutable_spec() = spec;
  bool ok = writer->Write(req);
  absl::Status read_error;
  std::string buffer;
  for (const TensorInfo& info : spec.stage().graph().params()) {
    for (uint64_t off = 0; ok && off < info.byte_size(); off += kWeightChunkBytes) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(kWeightChunkBytes, info.byte_size() - off));
      buffer.resize(n);
      read_error = weights(info.fqn(), off, n, buffer.data());
      if (!read_error.ok()) break;
      LoadStageRequest chunk;
      chunk.mutable_chunk()->set_fqn(info.fqn());
      chunk.mutable_chunk()->set_offset(off);
      chunk.mutable_chunk()->set_data(buffer);
      ok = writer->Write(chunk);
    }
    if (!read_error.ok()) break;
  }
  if (!read_error.ok()) ctx.TryCancel();
  writer->WritesDone();
  grpc::Status st = writer->Finish();
  if (!read_error.ok()) return read_error;
  return FromGrpcStatus(st, absl::StrCat("loading ", StageKeyName(spec.key()), " on ", address));
}

absl::Status GrpcStageClient::UnloadStage(const std::string& address, const StageKey& key,
                                          absl::Time deadline) {
  auto stub = StageService::NewStub(channels_->To(address));
  grpc::ClientContext ctx;
  Prepare(&ctx, deadline);
  UnloadStageRequest req;
  *req.mutable_key() = key;
  UnloadStageResponse resp;
  return FromGrpcStatus(stub->UnloadStage(&ctx, req, &resp),
                        absl::StrCat("unloading ", StageKeyName(key), " on ", address));
}

absl::StatusOr<std::vector<StageKey>> GrpcStageClient::ListStages(const std::string& address,
                                                                  absl::Time deadline) {
  auto stub = StageService::NewStub(channels_->To(address));
  grpc::ClientContext ctx;
  Prepare(&ctx, deadline);
  ListStagesResponse resp;
  absl::Status s = FromGrpcStatus(stub->ListStages(&ctx, ListStagesRequest(), &resp),
                                  absl::StrCat("listing the stages on ", address));
  if (!s.ok()) return s;
  return std::vector<StageKey>(resp.keys().begin(), resp.keys().end());
}

absl::StatusOr<StageStatsResponse> GrpcStageClient::GetStageStats(const std::string& address,
                                                                  const StageKey& key,
                                                                  absl::Time deadline) {
  auto stub = StageService::NewStub(channels_->To(address));
  grpc::ClientContext ctx;
  Prepare(&ctx, deadline);
  StageStatsRequest req;
  *req.mutable_key() = key;
  StageStatsResponse resp;
  absl::Status s = FromGrpcStatus(stub->GetStageStats(&ctx, req, &resp));
  if (!s.ok()) return s;
  return resp;
}

std::shared_ptr<FrameSink> GrpcStageClient::OpenInput(const std::string& address,
                                                      const StageKey& key) {
  return FrameSender::Create(channels_, address, key, send_capacity_);
}

absl::StatusOr<std::unique_ptr<StageClient::Subscription>> GrpcStageClient::SubscribeResults(
    const std::string& address, const StageKey& key, std::function<void(Frame)> on_frame,
    std::function<void(const absl::Status&)> on_done, absl::Time deadline) {
  absl::StatusOr<std::unique_ptr<ResultsSubscription>> s = ResultsSubscription::Start(
      channels_, address, key, std::move(on_frame), std::move(on_done), deadline);
  if (!s.ok()) return s.status();
  return std::unique_ptr<Subscription>(new GrpcSubscription(*std::move(s)));
}

}  // namespace pipeserve
