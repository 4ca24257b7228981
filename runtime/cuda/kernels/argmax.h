// The greedy pick on the GPU, written once against simt.h: a row's first
// largest value, as std::max_element finds it. sample_tokens' kernel
// (sample.h) picks it for rows that sample greedily without penalties.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_ARGMAX_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_ARGMAX_H_

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

// Whether (v, i) comes before (best, at) in std::max_element's order: a
// larger value, or an equal one at a lower index; `none` marks no
// candidate, and NaNs are never candidates.
SIMT_DEVICE bool Precedes(float v, int64_t i, float best, int64_t at, int64_t none) {
  if (i == none) return false;
  return at == none || v > best || (v == best && i < at);
}

// The index std::max_element returns over x [cols] (read as float), in
// thread 0: the first of the largest values; NaNs never win unless x
// starts with one (max_element then keeps index 0). Every thread of a
// block of kArgmaxThreads calls it; values and indices hold kWarpSize.
template <typename T>
SIMT_DEVICE int64_t FirstLargest(const T* __restrict__ xr, int64_t cols,
                                 simt::SharedPtr<float> values, simt::SharedPtr<int64_t> indices) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const int t = static_cast<int>(ThreadIdx().x);
  float best = 0.0f;
  int64_t at = cols;  // none yet
  for (int64_t c = t; c < cols; c += kArgmaxThreads) {  // increasing: the first of equals stays
    const float v = ToFloat(xr[c]);
    if (v == v && Precedes(v, c, best, at, cols)) {
      best = v;
      at = c;
    }
  }
  for (int m = kWarpSize / 2; m > 0; m >>= 1) {
    const float v = ShflXor(best, m);
    const int64_t i = ShflXor(at, m);
    if (Precedes(v, i, best, at, cols)) {
      best = v;
      at = i;
    }
  }
  if (LaneId() == 0) {
    values[WarpId()] = best;
    indices[WarpId()] = at;
  }
  SyncThreads();
  if (t != 0) return 0;
  for (int w = 1; w < kArgmaxThreads / kWarpSize; ++w) {
    if (Precedes(values[w], indices[w], best, at, cols)) {
      best = values[w];
      at = indices[w];
    }
  }
  const float first = cols > 0 ? ToFloat(xr[0]) : 0.0f;
  return (first != first || at == cols) ? 0 : at;
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_ARGMAX_H_
