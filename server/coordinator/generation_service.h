// pipeserve.GenerationService over Generation: one streamed response per
// token. Needs the `infer` scope when tokens are configured.
#ifndef PIPESERVE_SERVER_COORDINATOR_GENERATION_SERVICE_H_
#define PIPESERVE_SERVER_COORDINATOR_GENERATION_SERVICE_H_

#include "proto/pipeserve_service.grpc.pb.h"
#include "server/coordinator/generation.h"
#include "server/transport/auth.h"

namespace pipeserve {

// The core's request for an RPC's (defaults filled in: max_tokens 16,
// top_p 1, repetition_penalty 1, a random seed when none is given).
GenerationRequest ToGenerationRequest(const GenerateRequest& req);

class GenerationServiceImpl final : public GenerationService::Service {
 public:
  // `tokens` may be null (no authentication); both must outlive the service.
  GenerationServiceImpl(Coordinator* coordinator, Generation* generation, const TokenSet* tokens);

  grpc::Status Generate(grpc::ServerContext* ctx, const GenerateRequest* req,
                        grpc::ServerWriter<GenerateResponse>* writer) override;

 private:
  Coordinator* const coordinator_;
  Generation* const generation_;
  const TokenSet* const tokens_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_GENERATION_SERVICE_H_
