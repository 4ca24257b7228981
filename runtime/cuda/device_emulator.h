// A ComputeBackend that executes the CUDA backend's plans (device_plan.h) on
// the CPU, op by op, with the same arenas, layouts, dtypes and host staging
// and cuBLAS's column-major GEMM semantics written out longhand. It is slow
// and exists for tests: it runs the op conformance suite on every machine,
// so the lowering the GPU executes is checked where there is no GPU.
//
//   std::unique_ptr<ComputeBackend> emu =
//       MakeDeviceEmulatorBackend(Precision::kBF16);
#ifndef PIPESERVE_RUNTIME_CUDA_DEVICE_EMULATOR_H_
#define PIPESERVE_RUNTIME_CUDA_DEVICE_EMULATOR_H_

#include <memory>

#include "runtime/backend.h"
#include "runtime/precision.h"

namespace pipeserve {

// Activation and output staging arenas are NaN-filled before every run, so
// an element no op writes shows up in the outputs. Its programs take up to
// `concurrent_runs` Run calls at once (max_concurrent_runs()), each on its
// own arenas with the weights shared, as the CUDA program's slots.
std::unique_ptr<ComputeBackend> MakeDeviceEmulatorBackend(
    Precision precision, int concurrent_runs = 1);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_DEVICE_EMULATOR_H_
