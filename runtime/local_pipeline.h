// LocalPipeline: every stage of a plan in one process, run in order, with
// microbatching: the pipeserve equivalent of the seed's `pipe(x, y)`.
//
//   ASSIGN_OR_RETURN(Model model, ReadModelFile(path));
//   ASSIGN_OR_RETURN(Plan plan, Partition(model.graph, {}));
//   auto cpu = MakeCpuBackend({});
//   LocalPipelineOptions opts;
//   opts.chunks = 4;
//   ASSIGN_OR_RETURN(auto pipe, LocalPipeline::Create(model, plan, *cpu, opts));
//   ASSIGN_OR_RETURN(std::vector<Tensor> out, pipe->Run({x, y}));
#ifndef PIPESERVE_RUNTIME_LOCAL_PIPELINE_H_
#define PIPESERVE_RUNTIME_LOCAL_PIPELINE_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "proto/model.pb.h"
#include "runtime/backend.h"
#include "runtime/model_file.h"

namespace pipeserve {

struct LocalPipelineOptions {
  // Microbatches per call (torch.tensor_split semantics along dim 0).
  int chunks = 1;
};

class LocalPipeline {
 public:
  // Compiles every stage of `plan` on `backend`, taking weights from
  // `model`. Errors from the backend's Compile, prefixed with the stage.
  static absl::StatusOr<std::unique_ptr<LocalPipeline>> Create(
      const Model& model, const Plan& plan, ComputeBackend& backend,
      const LocalPipelineOptions& options);

  int num_stages() const { return static_cast<int>(programs_.size()); }

  // Runs the model inputs (in the plan's input order) through all stages,
  // microbatch by microbatch; returns the model outputs in order.
  // kInvalidArgument for inputs that do not match the plan. Not
  // thread-safe.
  absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor> inputs);

 private:
  LocalPipeline(Plan plan, LocalPipelineOptions options);

  // One microbatch through every stage.
  absl::StatusOr<std::vector<Tensor>> RunMicrobatch(
      absl::Span<const Tensor> inputs);

  const Plan plan_;
  const LocalPipelineOptions options_;
  std::vector<std::unique_ptr<StageProgram>> programs_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_LOCAL_PIPELINE_H_
