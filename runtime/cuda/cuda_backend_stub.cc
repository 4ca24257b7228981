// MakeCudaBackend for builds without --config=cuda: always unavailable.
#include "runtime/cuda/cuda_backend.h"

namespace pipeserve {
namespace {

absl::Status NoCuda() {
  return absl::FailedPreconditionError(
      "this build has no CUDA support (build with --config=cuda)");
}

}  // namespace

bool CudaBuiltIn() { return false; }

absl::StatusOr<int> CudaDeviceCount() { return NoCuda(); }

absl::StatusOr<std::unique_ptr<ComputeBackend>> MakeCudaBackend(
    const CudaBackendOptions&) {
  return NoCuda();
}

}  // namespace pipeserve
