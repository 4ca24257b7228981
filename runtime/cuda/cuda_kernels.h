// The CUDA backend's elementwise kernels (compiled by nvcc from
// cuda_kernels.cu, see BUILD.bazel). Each launcher enqueues one kernel on
// `stream` and returns cudaGetLastError() (cudaSuccess without a launch
// when there are no elements). Buffers are device memory, float32 unless
// named bf16; outputs never overlap inputs.
//
//   // out [5, 12] = x [5, 12] - row [12]
//   BroadcastIndex ix;
//   MakeBroadcastIndex({5, 12}, {12}, {5, 12}, &ix);
//   LaunchBinary(KernelOp::kSub, x, row, out, 60, ix, stream);
#ifndef PIPESERVE_RUNTIME_CUDA_CUDA_KERNELS_H_
#define PIPESERVE_RUNTIME_CUDA_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "runtime/cuda/broadcast_index.h"

namespace pipeserve {

enum class KernelOp : int { kAdd = 0, kSub = 1, kMul = 2 };

// out[i] = a[ia] op b[ib] for the n output elements, indexed by `index`.
cudaError_t LaunchBinary(KernelOp op, const float* a, const float* b,
                         float* out, int64_t n, const BroadcastIndex& index,
                         cudaStream_t stream);

// out = x op s, or s op x when reverse.
cudaError_t LaunchScalar(KernelOp op, const float* x, float s, bool reverse,
                         float* out, int64_t n, cudaStream_t stream);

// out = x < 0 ? 0 : x (NaN stays NaN, as in PyTorch).
cudaError_t LaunchRelu(const float* x, float* out, int64_t n,
                       cudaStream_t stream);

// bf16_out (n bfloat16) = x rounded to nearest even.
cudaError_t LaunchToBf16(const float* x, void* bf16_out, int64_t n,
                         cudaStream_t stream);

// out = x rounded to nearest TF32 (low 13 mantissa bits zero, ties to
// even; inf and NaN unchanged), as RoundToTf32 in device_plan.h.
cudaError_t LaunchToTf32(const float* x, float* out, int64_t n,
                         cudaStream_t stream);

// Column-major out [m, n] with leading dimension ld, float32 or bfloat16:
// every column = bias [m] (or zeros when bias is null), then ReLU. The
// result of a GEMM whose inner dimension is 0.
cudaError_t LaunchFill(void* out, bool out_bf16, const float* bias, int64_t m,
                       int64_t n, int64_t ld, bool relu, cudaStream_t stream);

// In place on column-major d [m, n] (leading dimension ld, float32 or
// bfloat16): d += bias [m] per row (when bias is not null), then ReLU when
// relu. The epilogue of a GEMM that cuBLASLt had no algorithm for.
cudaError_t LaunchBiasRelu(void* d, bool d_bf16, const float* bias, int64_t m,
                           int64_t n, int64_t ld, bool relu,
                           cudaStream_t stream);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_CUDA_KERNELS_H_
