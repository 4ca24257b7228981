#include "runtime/local_pipeline.h"

#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/microbatch.h"
#include "runtime/signature.h"

namespace pipeserve {

LocalPipeline::LocalPipeline(Plan plan, LocalPipelineOptions options)
    : plan_(std::move(plan)), options_(options) {}

absl::StatusOr<std::unique_ptr<LocalPipeline>> LocalPipeline::Create(
    const Model& model, const Plan& plan, ComputeBackend& backend,
    const LocalPipelineOptions& options) {
  if (options.chunks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunks must be >= 1, got ", options.chunks));
  }
  auto pipe = std::unique_ptr<LocalPipeline>(new LocalPipeline(plan, options));
  for (const Stage& stage : plan.stages()) {
    absl::StatusOr<std::unique_ptr<StageProgram>> prog =
        backend.Compile(stage.graph(), model.weights);
    if (!prog.ok()) {
      return absl::Status(prog.status().code(),
                          absl::StrCat("stage ", stage.index(), ": ",
                                       prog.status().message()));
    }
    pipe->programs_.push_back(*std::move(prog));
  }
  return pipe;
}

absl::StatusOr<std::vector<Tensor>> LocalPipeline::RunMicrobatch(
    absl::Span<const Tensor> inputs) {
  // Values by name: model inputs, then each stage's outputs as they come.
  absl::flat_hash_map<std::string, Tensor> values;
  for (int i = 0; i < plan_.inputs_size(); ++i) {
    values[plan_.inputs(i).name()] = inputs[i];
  }
  std::vector<Tensor> stage_in;
  for (int s = 0; s < num_stages(); ++s) {
    const Graph& g = plan_.stages(s).graph();
    stage_in.clear();
    for (const ValueSpec& in : g.inputs()) stage_in.push_back(values.at(in.name()));
    absl::StatusOr<std::vector<Tensor>> out = programs_[s]->Run(stage_in);
    if (!out.ok()) {
      return absl::Status(out.status().code(),
                          absl::StrCat("stage ", s, ": ", out.status().message()));
    }
    for (int k = 0; k < g.outputs_size(); ++k) {
      values[g.outputs(k)] = std::move((*out)[k]);
    }
  }
  std::vector<Tensor> result;
  for (const ValueSpec& out : plan_.outputs()) result.push_back(values.at(out.name()));
  return result;
}

absl::StatusOr<std::vector<Tensor>> LocalPipeline::Run(
    absl::Span<const Tensor> inputs) {
  RETURN_IF_ERROR(CheckTensorsMatch(plan_.inputs(), inputs).status());
  std::vector<bool> batched;
  for (const ValueSpec& in : plan_.inputs()) batched.push_back(in.batched());
  ASSIGN_OR_RETURN(auto microbatches,
                   SplitMicrobatches(inputs, batched, options_.chunks));
  std::vector<std::vector<Tensor>> outs;
  for (const std::vector<Tensor>& mb : microbatches) {
    ASSIGN_OR_RETURN(std::vector<Tensor> o, RunMicrobatch(mb));
    outs.push_back(std::move(o));
  }
  std::vector<bool> out_batched;
  for (const ValueSpec& out : plan_.outputs()) out_batched.push_back(out.batched());
  return MergeMicrobatches(out_batched, outs);
}

}  // namespace pipeserve
