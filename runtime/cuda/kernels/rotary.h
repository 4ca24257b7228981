// Rotary position embedding on the GPU, written once against simt.h:
// y = x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x[..., D/2:],
// x[..., :D/2]) as Llama writes it out (device_plan_fusion.cc finds it).
// nvcc compiles it (transformer_kernels.cu); the device emulator and
// kernels_test run the same source on the CPU.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_ROTARY_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_ROTARY_H_

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

// Over x and y [n / D rows, D] (D even), whose row r is token r % tokens
// of its sequence, and cos and sin [table_rows, D]: row r reads table row
// r % tokens, or row 0 when table_rows is 1. RotatedAt is element i, as T
// rounds it; RotaryRows one thread per element, kElementwiseThreads a
// block.
template <typename T>
SIMT_DEVICE T RotatedAt(const T* x, const T* cos, const T* sin, const RotaryOp& op, int64_t i) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const int64_t c = i % op.d, row = i / op.d, half = op.d / 2;
  const int64_t at = (op.table_rows == 1 ? 0 : row % op.tokens) * op.d + c;
  const float rotated = c < half ? -ToFloat(x[i + half]) : ToFloat(x[i - half]);
  return FromFloat<T>(ToFloat(x[i]) * ToFloat(cos[at]) + rotated * ToFloat(sin[at]));
}

// x[i], rotated when `rope` has tables (the attention kernels' q and k).
template <typename T>
SIMT_DEVICE T MaybeRotated(const T* x, const Rope& rope, int64_t i) {
  if (rope.cos == nullptr) return x[i];
  return RotatedAt(x, static_cast<const T*>(rope.cos), static_cast<const T*>(rope.sin), rope.op,
                   i);
}

template <typename T>
SIMT_GLOBAL void RotaryRows(const T* __restrict__ x, const T* __restrict__ cos,
                            const T* __restrict__ sin, T* __restrict__ y, RotaryOp op) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const int64_t i = static_cast<int64_t>(BlockIdx().x) * BlockDim().x + ThreadIdx().x;
  if (i >= op.n) return;
  y[i] = RotatedAt(x, cos, sin, op, i);
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_ROTARY_H_
