// Warp and block reductions for kernels written against simt.h.
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_REDUCE_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_REDUCE_H_

#include "runtime/cuda/simt/simt.h"

namespace pipeserve::simt {

// The sum of v over the warp, in every lane (butterfly).
SIMT_DEVICE float WarpAllSum(float v) {
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += ShflXor(v, m);
  return v;
}

// The sum of v over the warp, in lane 0 (other lanes hold partial sums).
SIMT_DEVICE float WarpSumToLane0(float v) {
  for (int d = kWarpSize / 2; d > 0; d >>= 1) v += ShflDown(v, d);
  return v;
}

struct Plus {
  SIMT_DEVICE float operator()(float a, float b) const { return a + b; }
};
struct Maximum {  // a NaN may or may not win, as fmaxf
  SIMT_DEVICE float operator()(float a, float b) const { return Max(a, b); }
};

// op over v of every thread of the block, returned to every thread (a
// warp butterfly, each warp's result in scratch, warp 0 combines them).
// scratch holds kWarpSize values of v's type (float or double); the block
// is whole warps, at most 1024 threads; `identity` is op's (0 for a sum).
template <typename T, typename Op>
SIMT_DEVICE T BlockAllReduce(T v, SharedPtr<T> scratch, Op op, T identity) {
  const int warp = WarpId();
  const int lane = LaneId();
  const int warps =
      static_cast<int>(BlockDim().x * BlockDim().y * BlockDim().z) / kWarpSize;
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, ShflXor(v, m));
  if (lane == 0) scratch[warp] = v;
  SyncThreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : identity;
    for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, ShflXor(v, m));
    if (lane == 0) scratch[0] = v;
  }
  SyncThreads();
  const T total = scratch[0];
  // A second call writes scratch[0] again: every thread must have read it.
  SyncThreads();
  return total;
}

SIMT_DEVICE float BlockAllSum(float v, SharedPtr<float> scratch) {
  return BlockAllReduce(v, scratch, Plus(), 0.0f);
}

SIMT_DEVICE float BlockAllMax(float v, SharedPtr<float> scratch) {
  return BlockAllReduce(v, scratch, Maximum(), -INFINITY);
}

}  // namespace pipeserve::simt

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_REDUCE_H_
