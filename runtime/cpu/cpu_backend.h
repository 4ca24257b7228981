// The CPU compute backend: runs a stage's nodes in order with the kernels of
// cpu_kernels.h, fusing a ReLU into the linear layer before it.
//
//   CpuBackendOptions opts;
//   opts.threads = 2;
//   std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend(opts);
#ifndef PIPESERVE_RUNTIME_CPU_CPU_BACKEND_H_
#define PIPESERVE_RUNTIME_CPU_CPU_BACKEND_H_

#include <memory>

#include "runtime/backend.h"

namespace pipeserve {

struct CpuBackendOptions {
  // Threads each GEMM may use. Stages sharing one machine divide its cores.
  int threads = 1;
  // Fuse `relu(linear(...))` into one pass when the linear's output has no
  // other reader.
  bool fuse_linear_relu = true;
  // Run matmul(q, k^T) -> scale -> mask -> softmax -> matmul(., v) as one
  // blocked kernel (FusedAttention in cpu_ops.h) when the values between
  // have no other reader.
  bool fuse_attention = true;
  // Run chains of elementwise float ops of one shape, whose values between
  // them nothing else reads, as one pass (ElementwiseGroup in cpu_ops.h).
  bool fuse_elementwise = true;
};

std::unique_ptr<ComputeBackend> MakeCpuBackend(const CpuBackendOptions& options);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CPU_CPU_BACKEND_H_
