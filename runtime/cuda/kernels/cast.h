// cast on the GPU, written once against simt.h: float32, float16,
// bfloat16, int64 and bool values converted as PyTorch converts them (to
// bool: nonzero; from float to int64: toward zero; to 16 bits: nearest
// even).
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_CAST_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_CAST_H_

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

// Integers and bools convert directly (int64 to int64 loses nothing); a
// float type on either side goes through float.
SIMT_DEVICE float CastIn(float x) { return x; }
SIMT_DEVICE float CastIn(simt::Half x) { return simt::ToFloat(x); }
SIMT_DEVICE float CastIn(simt::Bf16 x) { return simt::ToFloat(x); }
SIMT_DEVICE int64_t CastIn(int64_t x) { return x; }
SIMT_DEVICE uint8_t CastIn(uint8_t x) { return x; }

// float to int64 as x86 converts it, and so PyTorch on the CPU and the
// CPU backend: NaN and values outside int64 give INT64_MIN. (The GPU's own
// conversion saturates instead, NaN to 0; the C++ cast is undefined.)
SIMT_DEVICE int64_t FloatToInt64(float v) {
  return v >= -9.2233720368547758e18f && v < 9.2233720368547758e18f ? static_cast<int64_t>(v)
                                                                     : INT64_MIN;
}

template <typename Out, typename In>
SIMT_DEVICE Out CastValue(In x) {
  const auto v = CastIn(x);  // float, int64_t or uint8_t
  if constexpr (sizeof(Out) == 1) {
    return v != 0 ? 1 : 0;  // bool (uint8_t storage)
  } else if constexpr (sizeof(Out) == 2) {
    return simt::FromFloat<Out>(static_cast<float>(v));  // float16, bfloat16
  } else if constexpr (sizeof(Out) == 8 && sizeof(v) == 4) {
    return FloatToInt64(v);  // float to int64
  } else {
    return static_cast<Out>(v);
  }
}

// y[i] = x[i] converted, one thread each (grid: CopyBlocks(n) of
// kCopyThreads). In and Out: float, Half, Bf16, int64_t, uint8_t (bool).
template <typename In, typename Out>
SIMT_GLOBAL void Cast(const In* __restrict__ x, Out* __restrict__ y, int64_t n) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const int64_t i = int64_t{BlockIdx().x} * kCopyThreads + ThreadIdx().x;
  if (i < n) y[i] = CastValue<Out>(x[i]);
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_CAST_H_
