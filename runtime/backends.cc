#include "runtime/backends.h"

#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/cuda_backend.h"

namespace pipeserve {
namespace {

absl::StatusOr<std::unique_ptr<ComputeBackend>> Cpu(
    const BackendOptions& options) {
  if (options.precision != Precision::kFloat32) {
    return absl::InvalidArgumentError(
        absl::StrCat("the cpu backend computes in fp32 only, not ",
                     PrecisionName(options.precision)));
  }
  CpuBackendOptions cpu;
  cpu.threads = options.threads;
  return MakeCpuBackend(cpu);
}

absl::StatusOr<std::unique_ptr<ComputeBackend>> Cuda(
    int device, const BackendOptions& options) {
  CudaBackendOptions cuda;
  cuda.device = device;
  cuda.precision = options.precision;
  cuda.use_cuda_graphs = options.use_cuda_graphs;
  cuda.cuda_ops = options.cuda_ops;
  return MakeCudaBackend(cuda);
}

}  // namespace

absl::StatusOr<std::unique_ptr<ComputeBackend>> MakeBackend(
    const std::string& device, const BackendOptions& options) {
  if (device == "cpu") return Cpu(options);
  if (device == "cuda") return Cuda(0, options);
  if (absl::StartsWith(device, "cuda:")) {
    int index = -1;
    if (!absl::SimpleAtoi(device.substr(5), &index) || index < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("device \"", device, "\": expected cuda:N with N >= 0"));
    }
    return Cuda(index, options);
  }
  if (device == "auto") {
    absl::StatusOr<std::unique_ptr<ComputeBackend>> gpu = Cuda(0, options);
    if (gpu.ok()) {
      std::fprintf(stderr, "device auto: using %s (%s)\n",
                   (*gpu)->Name().c_str(),
                   PrecisionName(options.precision).c_str());
      return gpu;
    }
    if (gpu.status().code() != absl::StatusCode::kFailedPrecondition)
      return gpu.status();
    // Without a GPU, float32 is the only precision there is.
    BackendOptions cpu = options;
    cpu.precision = Precision::kFloat32;
    std::fprintf(stderr, "device auto: using cpu (%s)\n",
                 std::string(gpu.status().message()).c_str());
    return Cpu(cpu);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown device \"", device, "\" (expected cpu, cuda, cuda:N or auto)"));
}

}  // namespace pipeserve
