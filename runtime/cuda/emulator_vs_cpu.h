// For tests of the CUDA lowering: a model run on the device emulator
// (every fusion and kernel the unconfirmed kernels allow) next to the CPU
// backend, output by output.
//
//   absl::StatusOr<std::vector<double>> d = EmulatorVsCpu(model, {x});
//   for (double e : *d) EXPECT_LE(e, 1e-6);
#ifndef PIPESERVE_RUNTIME_CUDA_EMULATOR_VS_CPU_H_
#define PIPESERVE_RUNTIME_CUDA_EMULATOR_VS_CPU_H_

#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model_file.h"
#include "runtime/precision.h"
#include "runtime/tensor.h"

namespace pipeserve {

// MaxRelativeDifference (runtime/conformance/reference.h) of each float32
// output, the emulator's against the CPU's: infinity where one is NaN and
// the other not. An error when either backend refuses the model or a run.
absl::StatusOr<std::vector<double>> EmulatorVsCpu(const Model& model,
                                                  const std::vector<Tensor>& inputs,
                                                  Precision precision = Precision::kFloat32);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_EMULATOR_VS_CPU_H_
