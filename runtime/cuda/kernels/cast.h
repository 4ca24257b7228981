// cast on the GPU, written once against simt.h: float32, int64 and bool
// values converted as PyTorch converts them (to bool: nonzero; from
// float to int64: toward zero).
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_CAST_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_CAST_H_

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

template <typename Out, typename In>
SIMT_DEVICE Out CastValue(In x) {
  if constexpr (sizeof(Out) == 1) {
    return x != In{} ? 1 : 0;  // bool (uint8_t storage)
  } else {
    return static_cast<Out>(x);
  }
}

// y[i] = x[i] converted, one thread each (grid: CopyBlocks(n) of
// kCopyThreads). In and Out: float, int64_t, uint8_t (bool).
template <typename In, typename Out>
SIMT_GLOBAL void Cast(const In* __restrict__ x, Out* __restrict__ y, int64_t n) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const int64_t i = int64_t{BlockIdx().x} * kCopyThreads + ThreadIdx().x;
  if (i < n) y[i] = CastValue<Out>(x[i]);
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_CAST_H_
