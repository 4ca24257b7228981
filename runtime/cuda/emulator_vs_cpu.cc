#include "runtime/cuda/emulator_vs_cpu.h"

#include <memory>

#include "common/status_macros.h"
#include "runtime/conformance/reference.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/device_emulator.h"

namespace pipeserve {

absl::StatusOr<std::vector<double>> EmulatorVsCpu(const Model& model,
                                                  const std::vector<Tensor>& inputs,
                                                  Precision precision) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(precision);
  ASSIGN_OR_RETURN(auto want_program, cpu->Compile(model.graph, model.weights));
  ASSIGN_OR_RETURN(auto got_program, emulator->Compile(model.graph, model.weights));
  ASSIGN_OR_RETURN(std::vector<Tensor> want, want_program->Run(inputs));
  ASSIGN_OR_RETURN(std::vector<Tensor> got, got_program->Run(inputs));
  std::vector<double> differences;
  for (size_t i = 0; i < want.size(); ++i) {
    differences.push_back(MaxRelativeDifference(got[i], want[i]));
  }
  return differences;
}

}  // namespace pipeserve
