// The stage server's gRPC service, a thin layer over StageServerCore:
// LoadStage / UnloadStage / GetStageStats (sync), and the data plane as raw
// callback streams, Process (frames in) and Results (a last stage's frames
// out). Every call must come from a member of the cluster: the TLS layer
// checks client certificates when the server has them, and this service
// checks the cluster token when one is configured.
//
//   GrpcDialer dialer(channels, /*send_capacity=*/4);
//   StageServerCore core(options, &dialer);
//   StageServiceImpl service(&core, cluster_token);
//   builder.RegisterService(&service);
#ifndef PIPESERVE_SERVER_STAGE_STAGE_SERVICE_H_
#define PIPESERVE_SERVER_STAGE_STAGE_SERVICE_H_

#include <memory>
#include <string>

#include "proto/pipeserve_service.grpc.pb.h"
#include "server/stage/stage_server_core.h"
#include "server/transport/channels.h"

namespace pipeserve {

// Dials next stages with FrameSenders over the cluster's channels.
class GrpcDialer : public Dialer {
 public:
  GrpcDialer(std::shared_ptr<StageChannels> channels, size_t send_capacity)
      : channels_(std::move(channels)), send_capacity_(send_capacity) {}
  std::shared_ptr<FrameSink> Dial(const std::string& address, const StageKey& key) override;

 private:
  const std::shared_ptr<StageChannels> channels_;
  const size_t send_capacity_;
};

class StageServiceImpl final
    : public StageService::WithRawCallbackMethod_Process<
          StageService::WithRawCallbackMethod_Results<StageService::Service>> {
 public:
  // `core` must outlive the service. `cluster_token`: "" for none.
  StageServiceImpl(StageServerCore* core, std::string cluster_token, size_t send_capacity = 4);

  grpc::Status LoadStage(grpc::ServerContext* ctx, grpc::ServerReader<LoadStageRequest>* reader,
                         LoadStageResponse* response) override;
  grpc::Status UnloadStage(grpc::ServerContext* ctx, const UnloadStageRequest* req,
                           UnloadStageResponse* response) override;
  grpc::Status GetStageStats(grpc::ServerContext* ctx, const StageStatsRequest* req,
                             StageStatsResponse* response) override;
  grpc::Status ListStages(grpc::ServerContext* ctx, const ListStagesRequest* req,
                          ListStagesResponse* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Process(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Results(grpc::CallbackServerContext* ctx,
                                                      const grpc::ByteBuffer* request) override;

 private:
  StageServerCore* const core_;
  const std::string cluster_token_;
  const size_t send_capacity_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_STAGE_STAGE_SERVICE_H_
