// The host side of generation for the device programs (the CUDA backend
// and the device emulator): the KV cache's bookkeeping (which positions
// each slot holds, runtime/cpu/kv_cache.h, whose checks every step passes
// before it goes up; the keys and values themselves live in device
// memory), the attention tiles each step stages, and the host steps
// (sample_tokens) run on what came back.
//
//   DeviceKv kv(stage);                       // once per program
//   ASSIGN_OR_RETURN(std::optional<KvStep> step, kv.Begin(plan, inputs));
//   StageInputs(plan, inputs, staging_in);    // also writes the tiles
//   ... run; on failure: kv.Abort(step) ...
//   UnstageOutputs(plan, staging_out, &outputs);
//   const bool logits = NeedsLogits(plan, inputs);  // ... copies them if so
//   RETURN_IF_ERROR(RunHostSteps(plan, staging_out, inputs, logits, &outputs));
#ifndef PIPESERVE_RUNTIME_CUDA_DEVICE_GENERATION_H_
#define PIPESERVE_RUNTIME_CUDA_DEVICE_GENERATION_H_

#include <atomic>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/backend.h"
#include "runtime/cpu/kv_cache.h"
#include "runtime/cuda/device_plan.h"
#include "runtime/tensor.h"

namespace pipeserve {

class DeviceKv {
 public:
  // The stage's cache layers (none: every call is a no-op).
  explicit DeviceKv(const LoweredStage& stage);

  bool present() const { return cache_ != nullptr; }
  // Checks the step's metadata (the CPU cache's errors: kInvalidArgument,
  // kFailedPrecondition for positions this stage does not hold) and marks
  // its positions; nullopt for a stage without a cache.
  absl::StatusOr<std::optional<KvStep>> Begin(const DevicePlan& plan,
                                              absl::Span<const Tensor> inputs);
  // Unmarks a step that failed after Begin.
  void Abort(const std::optional<KvStep>& step);
  // Counts the blocks a step that ran wrote to (usage()).
  void Commit(const std::optional<KvStep>& step);
  // Blocks as the CPU backend reports them: blocks_allocated counts the
  // blocks some step wrote to (the device memory is all taken at Compile).
  // Thread-safe, also while a step runs.
  KvCacheUsage usage() const;

 private:
  std::unique_ptr<KvCache> cache_;
  int64_t block_bytes_ = 0;
  std::vector<bool> written_;  // by block id
  std::atomic<int64_t> blocks_written_{0};
};

// Whether a run on `inputs` needs plan.logits_copies: some host step has
// no device pick, or a row of its sampling parameters (graph inputs) is
// not plain greedy (runtime/sampler.h PlainGreedy).
bool NeedsLogits(const DevicePlan& plan, absl::Span<const Tensor> inputs);

// Runs plan.host_steps on the values copied back (`staging_out`) and the
// inputs, into `outputs` (UnstageOutputs has sized it). `logits_back`:
// plan.logits_copies ran, so sample_tokens runs on the host; else each
// step's parameters are checked as the CPU's sample_tokens checks them and
// its tokens are the device's picks.
absl::Status RunHostSteps(const DevicePlan& plan, const void* staging_out,
                          absl::Span<const Tensor> inputs, bool logits_back,
                          std::vector<Tensor>* outputs);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_DEVICE_GENERATION_H_
