// The stage server's gRPC service: LoadStage / UnloadStage /
// GetStageStats (sync) and the Process data stream (raw callback, frames as
// bytes). A thin layer over StageHost.
//
//   StageServiceImpl service({.default_threads = 1});
//   builder.RegisterService(&service);
#ifndef PIPESERVE_SERVER_STAGE_SERVICE_H_
#define PIPESERVE_SERVER_STAGE_SERVICE_H_

#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/synchronization/mutex.h"
#include "proto/pipeserve_service.grpc.pb.h"
#include "runtime/backend.h"
#include "server/frame_stream.h"
#include "server/stage_host.h"

namespace pipeserve {

struct StageServiceOptions {
  // GEMM threads for a stage whose spec does not say.
  int default_threads = 1;
  // Frames waiting per stage before the upstream reader is paused.
  int queue_capacity = 8;
  // Frames queued per outgoing stream before the stage's worker blocks.
  int send_capacity = 4;
  // The backend every stage is compiled on (chosen at start from --device);
  // null: a CPU backend per stage with the spec's (or default) threads.
  std::shared_ptr<ComputeBackend> backend;
};

class StageServiceImpl final
    : public StageService::WithRawCallbackMethod_Process<StageService::Service> {
 public:
  explicit StageServiceImpl(StageServiceOptions options);
  ~StageServiceImpl() override;

  grpc::Status LoadStage(grpc::ServerContext* ctx,
                         grpc::ServerReader<LoadStageRequest>* reader,
                         LoadStageResponse* response) override;
  grpc::Status UnloadStage(grpc::ServerContext* ctx, const UnloadStageRequest* req,
                           UnloadStageResponse* response) override;
  grpc::Status GetStageStats(grpc::ServerContext* ctx, const StageStatsRequest* req,
                             StageStatsResponse* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Process(
      grpc::CallbackServerContext* ctx) override;

  // The loaded stage, or nullptr.
  std::shared_ptr<StageHost> Find(const std::string& model, int stage);

 private:
  using Key = std::pair<std::string, int>;

  const StageServiceOptions options_;
  absl::Mutex mu_;
  std::map<Key, std::shared_ptr<StageHost>> hosts_ ABSL_GUARDED_BY(mu_);
  StageChannels channels_;  // to next stages
};

// absl::Status -> grpc::Status (same code, message capped at 4 KiB).
grpc::Status ToGrpc(const absl::Status& s);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_STAGE_SERVICE_H_
