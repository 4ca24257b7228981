#include "server/coordinator/generation_service.h"

#include <random>

#include "common/grpc_status.h"
#include "server/coordinator/redact.h"

namespace pipeserve {

GenerationRequest ToGenerationRequest(const GenerateRequest& req) {
  GenerationRequest r;
  r.prompt.assign(req.prompt().begin(), req.prompt().end());
  SamplingParams& p = r.sampling;
  p.max_tokens = req.max_tokens() == 0 ? 16 : req.max_tokens();
  p.temperature = req.temperature();
  p.top_k = req.top_k();
  p.top_p = req.top_p() == 0 ? 1 : req.top_p();
  p.repetition_penalty = req.repetition_penalty() == 0 ? 1 : req.repetition_penalty();
  p.frequency_penalty = req.frequency_penalty();
  p.stop_token_ids.assign(req.stop_token_ids().begin(), req.stop_token_ids().end());
  if (req.has_seed()) {
    p.seed = req.seed();
  } else {
    std::random_device rd;
    p.seed = (static_cast<uint64_t>(rd()) << 32) | rd();
  }
  return r;
}

GenerationServiceImpl::GenerationServiceImpl(Coordinator* coordinator, Generation* generation,
                                             const TokenSet* tokens)
    : coordinator_(coordinator), generation_(generation), tokens_(tokens) {}

grpc::Status GenerationServiceImpl::Generate(grpc::ServerContext* ctx, const GenerateRequest* req,
                                             grpc::ServerWriter<GenerateResponse>* writer) {
  absl::Status auth = AuthorizeCall(tokens_, *ctx, Scope::kInfer);
  if (!auth.ok()) return ToGrpcStatus(auth);
  absl::StatusOr<std::shared_ptr<Generator>> gen = generation_->For(req->model());
  if (!gen.ok()) return ToGrpcStatus(gen.status());
  GenerationRequest r = ToGenerationRequest(*req);
  // The client's deadline, or the coordinator's for generations when it
  // gives none.
  const absl::Time deadline = absl::FromChrono(ctx->deadline());
  r.deadline = deadline > absl::Now() + absl::Hours(24 * 365) ? coordinator_->GenerationDeadline()
                                                               : deadline;
  absl::Status s = (*gen)->Generate(
      r,
      [&](const GeneratedToken& t) {
        GenerateResponse resp;
        resp.set_token_id(t.id);
        resp.set_index(t.index);
        if (!t.finish_reason.empty()) {
          resp.set_finish_reason(t.finish_reason);
          resp.set_prompt_tokens(static_cast<int64_t>(r.prompt.size()));
        }
        return writer->Write(resp);
      },
      [ctx] { return ctx->IsCancelled(); });
  return ToGrpcStatus(RedactAddresses(s, *coordinator_->StageServerAddresses()));
}

}  // namespace pipeserve
