// Elementwise functions and softmax on the GPU, written once against
// simt.h (see layer_norm.h for how the same source runs in emulation).
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_ELEMENTWISE_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_ELEMENTWISE_H_

#include <cstdint>

#include "runtime/cuda/kernels/unary_kind.h"
#include "runtime/cuda/simt/reduce.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

inline constexpr int kElementwiseThreads = 256;
inline constexpr int kSoftmaxThreads = 256;  // whole warps

// f(x) as PyTorch computes it in float.
SIMT_DEVICE float ApplyUnary(UnaryKind kind, float x) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  switch (kind) {
    case UnaryKind::kGelu: return 0.5f * x * (1.0f + Erf(x * 0.70710678118654752f));
    case UnaryKind::kGeluTanh: {
      const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.0f + Tanh(inner));
    }
    case UnaryKind::kSilu: return x / (1.0f + Exp(-x));
    case UnaryKind::kTanh: return Tanh(x);
    case UnaryKind::kSigmoid: return 1.0f / (1.0f + Exp(-x));
    case UnaryKind::kExp: return Exp(x);
    case UnaryKind::kLog: return Log(x);
    case UnaryKind::kSqrt: return Sqrt(x);
    case UnaryKind::kRsqrt: return Rsqrt(x);
    case UnaryKind::kNeg: return -x;
    case UnaryKind::kAbs: return Abs(x);
    case UnaryKind::kCos: return Cos(x);
    case UnaryKind::kSin: return Sin(x);
    case UnaryKind::kNone: break;
  }
  return x;
}

// y[i] = f(x[i]) for the n elements; one thread each (grid.x * 256 >= n).
// y may be x (a GEMM's GELU epilogue done in place): no __restrict__.
template <typename T>
SIMT_GLOBAL void UnaryElementwise(const T* x, T* y, int64_t n, UnaryKind kind) {
  using namespace simt;  // NOLINT
  const int64_t i = static_cast<int64_t>(BlockIdx().x) * kElementwiseThreads + ThreadIdx().x;
  if (i < n) y[i] = FromFloat<T>(ApplyUnary(kind, ToFloat(x[i])));
}

// Softmax (or log_softmax) over each row of x [rows, cols], the last
// dimension: one block of kSoftmaxThreads per row. The row's max comes
// off first, so exp never overflows; the sum of exp(x - max) next; then
// each value.
template <typename T>
SIMT_GLOBAL void SoftmaxRows(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int cols,
                             bool log) {
  using namespace simt;  // NOLINT
  SIMT_SHARED(float, scratch, kWarpSize);
  const int64_t row = BlockIdx().x;
  if (row >= rows) return;  // the whole block
  const int t = static_cast<int>(ThreadIdx().x);
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  float top = -INFINITY;
  for (int c = t; c < cols; c += kSoftmaxThreads) top = Max(top, ToFloat(xr[c]));
  top = BlockAllMax(top, scratch);
  float sum = 0.0f;
  for (int c = t; c < cols; c += kSoftmaxThreads) sum += Exp(ToFloat(xr[c]) - top);
  sum = BlockAllSum(sum, scratch);
  const float log_sum = Log(sum);
  for (int c = t; c < cols; c += kSoftmaxThreads) {
    const float d = ToFloat(xr[c]) - top;
    yr[c] = FromFloat<T>(log ? d - log_sum : Exp(d) / sum);
  }
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_ELEMENTWISE_H_
