// inference.GRPCInferenceService (KServe v2 / Open Inference Protocol) over
// the Coordinator: request parsing and validation, then Coordinator::Infer.
// FP32 tensors, as raw_input_contents or contents.fp32_contents.
//
//   KServeService kserve(&coordinator);
//   builder.RegisterService(&kserve);
#ifndef PIPESERVE_SERVER_KSERVE_SERVICE_H_
#define PIPESERVE_SERVER_KSERVE_SERVICE_H_

#include "proto/grpc_service.grpc.pb.h"
#include "server/coordinator_core.h"
#include "server/metrics.h"

namespace pipeserve {

class KServeService final : public inference::GRPCInferenceService::Service {
 public:
  // `metrics` (may be null) counts every inference request.
  explicit KServeService(Coordinator* coordinator, Metrics* metrics = nullptr)
      : coordinator_(coordinator), metrics_(metrics) {}

  grpc::Status ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                          inference::ServerLiveResponse*) override;
  grpc::Status ServerReady(grpc::ServerContext*, const inference::ServerReadyRequest*,
                           inference::ServerReadyResponse*) override;
  grpc::Status ModelReady(grpc::ServerContext*, const inference::ModelReadyRequest*,
                          inference::ModelReadyResponse*) override;
  grpc::Status ServerMetadata(grpc::ServerContext*, const inference::ServerMetadataRequest*,
                              inference::ServerMetadataResponse*) override;
  grpc::Status ModelMetadata(grpc::ServerContext*, const inference::ModelMetadataRequest*,
                             inference::ModelMetadataResponse*) override;
  grpc::Status ModelInfer(grpc::ServerContext*, const inference::ModelInferRequest*,
                          inference::ModelInferResponse*) override;
  grpc::Status ModelStreamInfer(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<inference::ModelStreamInferResponse,
                               inference::ModelInferRequest>*) override;
  grpc::Status RepositoryIndex(grpc::ServerContext*, const inference::RepositoryIndexRequest*,
                               inference::RepositoryIndexResponse*) override;

 private:
  // The whole ModelInfer path without gRPC's context, metered.
  absl::Status Infer(const inference::ModelInferRequest& req, absl::Time deadline,
                     std::function<bool()> cancelled, inference::ModelInferResponse* resp);
  absl::Status InferUnmetered(const inference::ModelInferRequest& req, absl::Time deadline,
                              std::function<bool()> cancelled,
                              inference::ModelInferResponse* resp);

  Coordinator* const coordinator_;
  Metrics* const metrics_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_KSERVE_SERVICE_H_
