// The host side of generation for the device programs (the CUDA backend
// and the device emulator): the KV cache's bookkeeping (which positions
// each slot holds, runtime/cpu/kv_cache.h, whose checks every step passes
// before it goes up; the keys and values themselves live in device
// memory), the attention tiles each step stages, and the checks of
// sample_tokens' parameters before a step.
//
//   DeviceKv kv(stage);                       // once per program
//   ASSIGN_OR_RETURN(std::optional<KvStep> step, kv.Begin(plan, inputs));
//   RETURN_IF_ERROR(CheckSampleInputs(plan, inputs));  // kv.Abort(step) first
//   StageInputs(plan, inputs, staging_in);    // also writes the tiles
//   ... run; on failure: kv.Abort(step) ...
//   UnstageOutputs(plan, staging_out, &outputs);
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

// Checks each sample_tokens step's parameters (graph inputs) as the CPU's
// sample_tokens checks them, before a run: the device's picks read the
// contexts they delimit. kInvalidArgument naming the node and the row.
absl::Status CheckSampleInputs(const DevicePlan& plan, absl::Span<const Tensor> inputs);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_DEVICE_GENERATION_H_
