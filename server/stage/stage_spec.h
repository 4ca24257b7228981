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

#include "absl/status/status.h"
#include "proto/model.pb.h"
#include "proto/pipeserve_service.pb.h"

namespace pipeserve {

// What a stage server checks in a spec before it loads anything: the key
// (a valid model name, a stage index within num_stages, a replica in
// 0..63), the next address
// (host:port, and only before the last stage), the thread count, the
// stage graph (validated, each weight's byte size against its shape with
// overflow checks, and their total against `max_weight_bytes` when not 0:
// kResourceExhausted), and the received values (unique names, shapes that
// can exist, every graph input among them). kInvalidArgument naming the
// field otherwise.
absl::Status ValidateStageSpec(const StageSpec& spec, uint64_t max_weight_bytes = 0);

// One spec per stage of `plan`; servers[i] is stage i's server address
// (so stage i's next_address is servers[i + 1]). `threads`: GEMM threads
// per stage, 0 for the server's default. `replica`: which replica of the
// stages these are (one lane of a replicated deployment). `merge_rows`:
// StageSpec.merge_rows for each stage whose received and forwarded values
// all follow the batch (the others get 0). Each carries its fingerprint.
std::vector<StageSpec> MakeStageSpecs(const Plan& plan, const std::string& model,
                                      uint64_t deployment, const std::vector<std::string>& servers,
                                      int threads, int replica = 0, int64_t merge_rows = 0);

// A 64-bit FNV-1a hash of everything in `spec` but its deployment id and
// fingerprint: the stage graph with each weight's CRC-32, what it
// receives and forwards, where it sends, its threads. Equal for the same
// stage of the same model file, options and servers, in any process.
uint64_t StageFingerprint(const StageSpec& spec);

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_STAGE_STAGE_SPEC_H_
