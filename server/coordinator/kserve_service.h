// inference.GRPCInferenceService (KServe v2 / Open Inference Protocol) over
// the Coordinator. Thin: authentication (the `infer` scope when tokens are
// configured), then kserve_request.h checks the request against the plan of
// the deployment that runs it, found once per request.
//
//   KServeService kserve(&coordinator, &metrics, tokens.get(), {});
//   builder.RegisterService(&kserve);
#ifndef PIPESERVE_SERVER_COORDINATOR_KSERVE_SERVICE_H_
#define PIPESERVE_SERVER_COORDINATOR_KSERVE_SERVICE_H_

#include <functional>

#include "proto/grpc_service.grpc.pb.h"
#include "server/coordinator/core.h"
#include "server/coordinator/metrics.h"
#include "server/coordinator/worker_pool.h"
#include "server/transport/auth.h"

namespace pipeserve {

struct KServeOptions {
  // Threads running requests that arrive on ModelStreamInfer streams, for
  // all streams together.
  int stream_threads = 16;
  // Requests one stream may have running at once; the stream is not read
  // further until one finishes.
  int stream_inflight = 32;
};

class KServeService final : public inference::GRPCInferenceService::Service {
 public:
  // `metrics` (may be null) counts every inference request; `tokens` (may
  // be null: no authentication) must grant `infer`. Both must outlive the
  // service.
  KServeService(Coordinator* coordinator, Metrics* metrics, const TokenSet* tokens,
                KServeOptions options);

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
  // Authorizes the call, checks the name and version, and looks the model up.
  absl::StatusOr<ModelInfo> GetModel(const grpc::ServerContext& ctx, const std::string& name,
                                     const std::string& version);
  // One inference request, metered.
  absl::Status Infer(const inference::ModelInferRequest& req, absl::Time deadline,
                     const std::function<bool()>& cancelled, inference::ModelInferResponse* resp);
  absl::Status InferUnmetered(const inference::ModelInferRequest& req, absl::Time deadline,
                              const std::function<bool()>& cancelled,
                              inference::ModelInferResponse* resp);

  Coordinator* const coordinator_;
  Metrics* const metrics_;
  const TokenSet* const tokens_;
  const KServeOptions options_;
  WorkerPool stream_pool_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_KSERVE_SERVICE_H_
