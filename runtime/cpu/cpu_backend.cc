// MakeCpuBackend (cpu_backend.h): the backend compiles each stage into a
// CpuProgram (program/cpu_program.h). How a graph becomes steps is in
// program/compile.h and program/fusion.h, what a step is in
// program/steps.h.
#include "runtime/cpu/cpu_backend.h"

#include <memory>
#include <string>

#include "runtime/cpu/program/cpu_program.h"

namespace pipeserve {
namespace {

class CpuBackend : public ComputeBackend {
 public:
  explicit CpuBackend(const CpuBackendOptions& options) : options_(options) {}

  std::string Name() const override { return "cpu"; }

  absl::StatusOr<std::unique_ptr<StageProgram>> Compile(
      const Graph& stage_graph, const WeightMap& weights) override {
    return cpu_program::MakeCpuProgram(stage_graph, weights, options_);
  }

 private:
  const CpuBackendOptions options_;
};

}  // namespace

std::unique_ptr<ComputeBackend> MakeCpuBackend(const CpuBackendOptions& options) {
  return std::make_unique<CpuBackend>(options);
}

}  // namespace pipeserve
