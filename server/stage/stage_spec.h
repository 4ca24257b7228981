// How each stage of a plan is described to the stage server that runs it:
// its key, its graph, what every incoming frame carries (with shapes, so
// the stage can refuse frames that do not fit), what it sends on, and
// where. The coordinator makes these when it deploys a model; tests make
// them to drive stages directly.
//
//   std::vector<StageSpec> specs = MakeStageSpecs(plan, "example", deployment, servers, 0);
//   specs[1].receives()   // values stage 0 sends stage 1
#ifndef PIPESERVE_SERVER_STAGE_STAGE_SPEC_H_
#define PIPESERVE_SERVER_STAGE_STAGE_SPEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "proto/model.pb.h"
#include "proto/pipeserve_service.pb.h"

namespace pipeserve {

// One spec per stage of `plan`; servers[i] is stage i's server address
// (so stage i's next_address is servers[i + 1]). `threads`: GEMM threads
// per stage, 0 for the server's default.
std::vector<StageSpec> MakeStageSpecs(const Plan& plan, const std::string& model,
                                      uint64_t deployment, const std::vector<std::string>& servers,
                                      int threads);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_STAGE_STAGE_SPEC_H_
