// Kernels written once against simt.h, as the transformer kernels are:
// example_kernels.cu compiles them with nvcc (LaunchRowSum, see
// example_kernels_cuda.h) and simt_test.cc runs them on the emulator
// against float64 loops. They show the patterns to copy: a shared-memory
// tree reduction, warp-shuffle reductions, a block-wide sum broadcast to
// every thread, warp votes, a warp scan, and a 2-D grid with a partial
// last block. T is the storage type (float, Half or Bf16); arithmetic is
// float. Matrices are row-major.
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_EXAMPLE_KERNELS_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_EXAMPLE_KERNELS_H_

#include <cstdint>

#include "runtime/cuda/simt/reduce.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::simt::example {

constexpr int kRowSumThreads = 128;  // a power of two, for the tree
constexpr int kRmsNormThreads = 256;

// out[r] = sum of x[r, :] for x [rows, cols]: block r (gridDim.x >= rows,
// blockDim.x == kRowSumThreads) strides over its row, then halves the
// partial sums in shared memory until partial[0] holds the total.
template <typename T>
SIMT_GLOBAL void RowSum(const T* __restrict__ x, float* __restrict__ out,
                        int rows, int cols) {
  SIMT_SHARED(float, partial, kRowSumThreads);
  const int row = static_cast<int>(BlockIdx().x);
  if (row >= rows) return;  // the whole block: no barrier is left waiting
  const int t = static_cast<int>(ThreadIdx().x);
  const T* xr = x + static_cast<int64_t>(row) * cols;
  float sum = 0.0f;
  for (int c = t; c < cols; c += kRowSumThreads) sum += ToFloat(xr[c]);
  partial[t] = sum;
  SyncThreads();
  for (int s = kRowSumThreads / 2; s > 0; s >>= 1) {
    if (t < s) partial[t] += partial[t + s];
    SyncThreads();  // every read of this step before the next step's writes
  }
  if (t == 0) out[row] = partial[0];
}

// RowSum with one warp per row and no shared memory: blockDim is
// (32, warps), row = blockIdx.x * warps + threadIdx.y.
template <typename T>
SIMT_GLOBAL void RowSumWarp(const T* __restrict__ x, float* __restrict__ out,
                            int rows, int cols) {
  const int row = static_cast<int>(BlockIdx().x * BlockDim().y + ThreadIdx().y);
  if (row >= rows) return;  // whole warps only: warp ops need all 32 lanes
  const T* xr = x + static_cast<int64_t>(row) * cols;
  float sum = 0.0f;
  for (int c = LaneId(); c < cols; c += kWarpSize) sum += ToFloat(xr[c]);
  sum = WarpAllSum(sum);
  if (LaneId() == 0) out[row] = sum;
}

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight for x, y
// [rows, cols] and weight [cols]: block r of kRmsNormThreads threads.
template <typename T>
SIMT_GLOBAL void RmsNorm(const T* __restrict__ x, const T* __restrict__ weight,
                         T* __restrict__ y, int rows, int cols, float eps) {
  SIMT_SHARED(float, scratch, kWarpSize);
  const int row = static_cast<int>(BlockIdx().x);
  if (row >= rows) return;
  const int t = static_cast<int>(ThreadIdx().x);
  const int64_t base = static_cast<int64_t>(row) * cols;
  float squares = 0.0f;
  for (int c = t; c < cols; c += kRmsNormThreads) {
    const float v = ToFloat(x[base + c]);
    squares += v * v;
  }
  const float scale =
      Rsqrt(BlockAllSum(squares, scratch) / static_cast<float>(cols) + eps);
  for (int c = t; c < cols; c += kRmsNormThreads) {
    y[base + c] =
        FromFloat<T>(ToFloat(x[base + c]) * scale * ToFloat(weight[c]));
  }
}

// Per warp w of the grid (32 consecutive elements of x [n]):
// ballots[w] has bit i set when x[32w + i] > 0, any[w] / all[w] say whether
// one / every element there is. Threads past n vote too (false for the
// ballot and Any, true for All) instead of returning: a warp op needs
// every lane.
SIMT_GLOBAL void WarpVotes(const float* __restrict__ x, int n,
                           uint32_t* __restrict__ ballots, int* any, int* all) {
  const int64_t i =
      static_cast<int64_t>(BlockIdx().x) * BlockDim().x + ThreadIdx().x;
  const bool in = i < n;
  const bool positive = in && x[i] > 0.0f;
  const uint32_t ballot = Ballot(positive);
  const bool some = Any(positive);
  const bool every = All(!in || positive);
  if (LaneId() == 0) {
    const int64_t w = i / kWarpSize;
    ballots[w] = ballot;
    any[w] = some;
    all[w] = every;
  }
}

// out[i] = x[32w] + ... + x[i] within each warp w (inclusive scan, ShflUp);
// x and out [n], threads past n add zeros.
SIMT_GLOBAL void WarpInclusiveScan(const int* __restrict__ x,
                                   int* __restrict__ out, int n) {
  const int64_t i =
      static_cast<int64_t>(BlockIdx().x) * BlockDim().x + ThreadIdx().x;
  int v = i < n ? x[i] : 0;
  for (int d = 1; d < kWarpSize; d <<= 1) {
    const int below = ShflUp(v, d);
    if (LaneId() >= d) v += below;
  }
  if (i < n) out[i] = v;
}

// y[r, c] = x[r, c] + bias[c] for x, y [rows, cols]: a 2-D grid, blockIdx.y
// the row and blockIdx.x a stretch of blockDim.x columns (the last one
// partial).
template <typename T>
SIMT_GLOBAL void AddBias2D(const T* __restrict__ x, const T* __restrict__ bias,
                           T* __restrict__ y, int rows, int cols) {
  const int64_t c =
      static_cast<int64_t>(BlockIdx().x) * BlockDim().x + ThreadIdx().x;
  const int row = static_cast<int>(BlockIdx().y);
  if (c >= cols || row >= rows) return;
  const int64_t i = static_cast<int64_t>(row) * cols + c;
  y[i] = FromFloat<T>(ToFloat(x[i]) + ToFloat(bias[c]));
}

}  // namespace pipeserve::simt::example

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_EXAMPLE_KERNELS_H_
