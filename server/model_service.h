// pipeserve.ModelService over the Coordinator: chunked upload, plans,
// model list.
#ifndef PIPESERVE_SERVER_MODEL_SERVICE_H_
#define PIPESERVE_SERVER_MODEL_SERVICE_H_

#include "proto/pipeserve_service.grpc.pb.h"
#include "server/coordinator_core.h"

namespace pipeserve {

class ModelServiceImpl final : public ModelService::Service {
 public:
  explicit ModelServiceImpl(Coordinator* coordinator) : coordinator_(coordinator) {}

  grpc::Status Upload(grpc::ServerContext* ctx, grpc::ServerReader<UploadRequest>* reader,
                      UploadResponse* response) override;
  grpc::Status GetPlan(grpc::ServerContext* ctx, const GetPlanRequest* req,
                       GetPlanResponse* response) override;
  grpc::Status ListModels(grpc::ServerContext* ctx, const ListModelsRequest* req,
                          ListModelsResponse* response) override;

 private:
  Coordinator* const coordinator_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_MODEL_SERVICE_H_
