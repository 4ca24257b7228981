// Choosing a compute backend by name, for binaries' --device flags.
//
//   BackendOptions opts;
//   opts.precision = Precision::kTF32;
//   ASSIGN_OR_RETURN(std::unique_ptr<ComputeBackend> b, MakeBackend("auto",
//   opts)); b->Name();  // "cuda:0" on a GPU machine built with --config=cuda,
//   else "cpu"
#ifndef PIPESERVE_RUNTIME_BACKENDS_H_
#define PIPESERVE_RUNTIME_BACKENDS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/backend.h"
#include "runtime/cuda/kernel_gate.h"
#include "runtime/precision.h"

namespace pipeserve {

struct BackendOptions {
  // CPU: GEMM threads.
  int threads = 1;
  // CUDA: GEMM arithmetic (the CPU backend computes in float32 only, and
  // refuses anything else).
  Precision precision = Precision::kFloat32;
  // CUDA: capture and replay CUDA graphs.
  bool use_cuda_graphs = true;
  // CUDA: also kernels a GPU has not confirmed (runtime/cuda/kernel_gate.h).
  CudaOps cuda_ops = CudaOps::kConfirmed;
};

// device: "cpu", "cuda" (device 0), "cuda:N", or "auto" (CUDA device 0 when
// this build has CUDA and a device is present, else CPU; logs the choice
// and the reason to stderr). Errors: kInvalidArgument for an unknown device
// string or a precision the chosen backend lacks; kFailedPrecondition for
// "cuda" in a build without CUDA ("this build has no CUDA support (build
// with --config=cuda)") or on a machine without a device ("no CUDA device:
// ...").
absl::StatusOr<std::unique_ptr<ComputeBackend>> MakeBackend(
    const std::string& device, const BackendOptions& options);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_BACKENDS_H_
