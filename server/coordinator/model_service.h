// pipeserve.ModelService over the Coordinator: chunked upload, unload,
// plans, model list. Every call needs the `admin` scope when tokens are
// configured. Uploads are bounded: in size and number at once by the
// coordinator, and here in idle time (a watchdog cancels an upload whose
// next message does not come within `upload_idle_timeout`).
#ifndef PIPESERVE_SERVER_COORDINATOR_MODEL_SERVICE_H_
#define PIPESERVE_SERVER_COORDINATOR_MODEL_SERVICE_H_

#include "absl/time/time.h"
#include "proto/pipeserve_service.grpc.pb.h"
#include "server/coordinator/core.h"
#include "server/transport/auth.h"
#include "server/transport/idle_watchdog.h"

namespace pipeserve {

class ModelServiceImpl final : public ModelService::Service {
 public:
  // `tokens` may be null (no authentication); it must outlive the service.
  ModelServiceImpl(Coordinator* coordinator, const TokenSet* tokens,
                   absl::Duration upload_idle_timeout = absl::Seconds(30));

  grpc::Status Upload(grpc::ServerContext* ctx, grpc::ServerReader<UploadRequest>* reader,
                      UploadResponse* response) override;
  grpc::Status Unload(grpc::ServerContext* ctx, const UnloadRequest* req,
                      UnloadResponse* response) override;
  grpc::Status GetPlan(grpc::ServerContext* ctx, const GetPlanRequest* req,
                       GetPlanResponse* response) override;
  grpc::Status ListModels(grpc::ServerContext* ctx, const ListModelsRequest* req,
                          ListModelsResponse* response) override;

 private:
  Coordinator* const coordinator_;
  const TokenSet* const tokens_;
  IdleWatchdog idle_;  // uploads in progress
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_MODEL_SERVICE_H_
