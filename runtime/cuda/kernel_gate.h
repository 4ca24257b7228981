// The gate between CUDA kernels checked only in emulation and the GPU. A
// kernel's source runs on the CPU in every test run (runtime/cuda/simt),
// but only a GPU shows that nvcc's code computes the same: until
// tools/gpu_check.sh has passed every conformance case of an op in a dtype
// on a GPU, and its log and a line in gpu_results/confirmed_kernels.txt
// are committed, the CUDA backend refuses that op in that dtype, as it
// refuses an op it has no kernel for. A stage server started with
// --cuda_ops=unconfirmed runs unconfirmed kernels too (to check them, or
// at one's own risk).
//
//   RETURN_IF_ERROR(CheckKernelGate(node.name(), "layer_norm", DT_FLOAT32,
//                                   CudaOps::kConfirmed));
#ifndef PIPESERVE_RUNTIME_CUDA_KERNEL_GATE_H_
#define PIPESERVE_RUNTIME_CUDA_KERNEL_GATE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "graph/dtype.h"

namespace pipeserve {

enum class CudaOps {
  kConfirmed,    // only kernels a GPU has confirmed (the default)
  kUnconfirmed,  // also those checked only in emulation
};

// "confirmed" or "unconfirmed" (the --cuda_ops flag); kInvalidArgument else.
absl::StatusOr<CudaOps> ParseCudaOps(absl::string_view flag);

struct KernelConfirmation {
  std::string op;
  DataType dtype = DT_INVALID;
  std::string evidence;  // the log it comes from
};

// Lines "op dtype evidence" ('#' starts a comment). kInvalidArgument naming
// the line for an unknown dtype or a line without evidence.
absl::StatusOr<std::vector<KernelConfirmation>> ParseConfirmations(absl::string_view text);

// The built-in list: runtime/cuda/gpu_results/confirmed_kernels.txt.
const std::vector<KernelConfirmation>& ConfirmedKernels();

// OK when node `node`'s op `op` may run its CUDA kernel in `dtype`: a GPU
// confirmed it, or `mode` allows unconfirmed ones. Else kInvalidArgument
// (as for an op without a kernel) naming the node, op and dtype and how to
// confirm it or open the gate.
absl::Status CheckKernelGate(const std::string& node, const std::string& op, DataType dtype,
                             CudaOps mode,
                             const std::vector<KernelConfirmation>& confirmed = ConfirmedKernels());

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_KERNEL_GATE_H_
