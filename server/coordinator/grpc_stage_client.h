// StageClient over gRPC: the coordinator's real link to stage servers,
// with the cluster's credentials (see server/transport/channels.h).
//
//   ASSIGN_OR_RETURN(auto channels, StageChannels::Create(cluster));
//   GrpcStageClient client(channels, /*send_capacity=*/8);
#ifndef PIPESERVE_SERVER_COORDINATOR_GRPC_STAGE_CLIENT_H_
#define PIPESERVE_SERVER_COORDINATOR_GRPC_STAGE_CLIENT_H_

#include <memory>
#include <string>

#include "server/coordinator/stage_client.h"
#include "server/transport/channels.h"

namespace pipeserve {

class GrpcStageClient : public StageClient {
 public:
  // `send_capacity`: frames queued towards a stage before Send blocks.
  GrpcStageClient(std::shared_ptr<StageChannels> channels, size_t send_capacity)
      : channels_(std::move(channels)), send_capacity_(send_capacity) {}

  absl::Status LoadStage(const std::string& address, const StageSpec& spec,
                         const WeightReader& weights, absl::Time deadline) override;
  absl::Status UnloadStage(const std::string& address, const StageKey& key,
                           absl::Time deadline) override;
  absl::StatusOr<std::vector<StageKey>> ListStages(const std::string& address,
                                                   absl::Time deadline) override;
  absl::StatusOr<StageStatsResponse> GetStageStats(const std::string& address,
                                                   const StageKey& key,
                                                   absl::Time deadline) override;
  std::shared_ptr<FrameSink> OpenInput(const std::string& address, const StageKey& key) override;
  absl::StatusOr<std::unique_ptr<Subscription>> SubscribeResults(
      const std::string& address, const StageKey& key, std::function<void(Frame)> on_frame,
      std::function<void(const absl::Status&)> on_done, absl::Time deadline) override;

 private:
  // The cluster token and the deadline, for one call.
  void Prepare(grpc::ClientContext* ctx, absl::Time deadline) const;

  const std::shared_ptr<StageChannels> channels_;
  const size_t send_capacity_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_GRPC_STAGE_CLIENT_H_
