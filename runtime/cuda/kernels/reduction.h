// sum, mean and amax over any dims on the GPU, written once against simt.h:
// one block per output element; its threads stride over the reduced
// elements and combine through the block (simt/reduce.h). amax propagates
// NaN, as PyTorch does.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_REDUCTION_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_REDUCTION_H_

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/reduce.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

struct MaximumWithNan {
  SIMT_DEVICE float operator()(float a, float b) const {
    return a != a ? a : b != b ? b : (a > b ? a : b);
  }
};

// Offset in x of element `i` of a dims-shaped index space read with
// `strides`.
SIMT_DEVICE int64_t StridedOffset(int64_t i, int rank, const int64_t* dims,
                                  const int64_t* strides) {
  int64_t at = 0;
  for (int k = rank - 1; k >= 0; --k) {
    at += i % dims[k] * strides[k];
    i /= dims[k];
  }
  return at;
}

// y[o] = reduce of x over the reduced dims, for each output element o
// (grid: op.out_n blocks of kReduceThreads).
template <typename T>
SIMT_GLOBAL void Reduce(const T* __restrict__ x, T* __restrict__ y, ReduceOp op) {
  using namespace simt;  // NOLINT
  SIMT_SHARED(float, scratch, kWarpSize);
  const int64_t o = BlockIdx().x;
  const T* base = x + StridedOffset(o, op.out_rank, op.out_dims, op.out_strides);
  const bool max = op.kind == ReduceKind::kAmax;
  float acc = max ? -__builtin_huge_valf() : 0.0f;
  for (int64_t r = ThreadIdx().x; r < op.red_n; r += kReduceThreads) {
    const float v = ToFloat(base[StridedOffset(r, op.red_rank, op.red_dims, op.red_strides)]);
    acc = max ? MaximumWithNan()(acc, v) : acc + v;
  }
  float total = max ? BlockAllReduce(acc, scratch, MaximumWithNan(), -__builtin_huge_valf())
                    : BlockAllSum(acc, scratch);
  if (op.kind == ReduceKind::kMean) total /= static_cast<float>(op.red_n);
  if (ThreadIdx().x == 0) y[o] = FromFloat<T>(total);
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_REDUCTION_H_
