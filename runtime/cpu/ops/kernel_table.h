// The CPU backend's kernel table: the ops RunCpuOp (runtime/cpu/cpu_ops.h)
// runs and the kernel each runs with. Each op family's file under
// runtime/cpu/ops/ registers its own ops; cpu_ops.cc builds the one table
// from them and dispatches on it. Internal to //runtime/cpu:cpu_ops.
//
//   void RegisterGemmKernels(KernelTable* table) {
//     table->kernels["matmul"] = MatmulKernel;
//     table->half["matmul"] = {TakesBf16Matmul, LinearBf16};
//   }
#ifndef PIPESERVE_RUNTIME_CPU_OPS_KERNEL_TABLE_H_
#define PIPESERVE_RUNTIME_CPU_OPS_KERNEL_TABLE_H_

#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/model.pb.h"
#include "runtime/tensor.h"

namespace pipeserve::cpu_ops {

using Args = std::vector<const Tensor*>;

// Computes `node` (attributes resolved) from `in` into `out`, which the
// caller allocated with the op's output shape and type. kInvalidArgument
// for inputs the kernel cannot take, naming the problem.
using Kernel = absl::Status (*)(const Node& node, const Args& in, Tensor* out);

// A kernel that computes float16 or bfloat16 values in their own type, for
// the inputs `takes` accepts (given the output's type).
struct HalfKernel {
  bool (*takes)(const Node& node, const Args& in, DataType out_type);
  Kernel run;
};

// Runs an op on its inputs as they come, of any type, into an output of
// `out_shape` it makes itself (`scratch` reused as RunCpuOp says).
using Runner = absl::StatusOr<Tensor> (*)(const Node& node, const Args& in,
                                          const Shape& out_shape, const Tensor& scratch);

// Every op RunCpuOp runs but views and sizes (reshape, unsqueeze, squeeze,
// identity, size), which cpu_ops.cc makes itself.
struct KernelTable {
  // One entry per op that computes into a new output: float32, integer
  // and bool values; float16 and bfloat16 reach them widened to float32
  // and are rounded back, unless `half` has a kernel that takes them.
  absl::flat_hash_map<std::string, Kernel> kernels;
  // Kernels that keep float16/bfloat16 values in their type.
  absl::flat_hash_map<std::string, HalfKernel> half;
  // Ops run before any dtype dispatch (sample_tokens).
  absl::flat_hash_map<std::string, Runner> runners;
};

// Each adds its family's ops to `table`.
void RegisterElementwiseKernels(KernelTable* table);    // ops/elementwise.cc
void RegisterNormalizationKernels(KernelTable* table);  // ops/normalization.cc
void RegisterGemmKernels(KernelTable* table);           // ops/gemm.cc
void RegisterMovementKernels(KernelTable* table);       // ops/movement.cc
void RegisterGenerationKernels(KernelTable* table);     // ops/generation.cc

}  // namespace pipeserve::cpu_ops

#endif  // PIPESERVE_RUNTIME_CPU_OPS_KERNEL_TABLE_H_
