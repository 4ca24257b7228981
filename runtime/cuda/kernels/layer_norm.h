// layer_norm on the GPU, written once against simt.h: nvcc compiles it
// (transformer_kernels.cu) and the device emulator runs this same source on
// the CPU (device_emulator.cc), so conformance_test checks it against the
// float64 reference on every build.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_LAYER_NORM_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_LAYER_NORM_H_

#include <cstdint>

#include "runtime/cuda/simt/reduce.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

inline constexpr int kLayerNormThreads = 256;  // whole warps

// y[r, :] = (x[r, :] - mean) / sqrt(var + eps) * w + b over each of the
// rows of x [rows, cols] (w, b [cols], either may be null), in float. One
// block of kLayerNormThreads per row (grid.x = rows). Two passes over the
// row, the mean first and then the mean square of x - mean: the one-pass
// E[x^2] - mean^2 cancels badly when |mean| is large against the spread.
template <typename T, typename W>
SIMT_GLOBAL void LayerNormRows(const T* __restrict__ x, const W* __restrict__ w,
                               const W* __restrict__ b, T* __restrict__ y,
                               int64_t rows, int cols, float eps) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SIMT_SHARED(float, scratch, kWarpSize);
  const int64_t row = BlockIdx().x;
  if (row >= rows) return;  // the whole block: no barrier left waiting
  const int t = static_cast<int>(ThreadIdx().x);
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  float sum = 0.0f;
  for (int c = t; c < cols; c += kLayerNormThreads) sum += ToFloat(xr[c]);
  const float mean = BlockAllSum(sum, scratch) / static_cast<float>(cols);
  float squares = 0.0f;
  for (int c = t; c < cols; c += kLayerNormThreads) {
    const float d = ToFloat(xr[c]) - mean;
    squares += d * d;
  }
  const float scale = Rsqrt(BlockAllSum(squares, scratch) / static_cast<float>(cols) + eps);
  for (int c = t; c < cols; c += kLayerNormThreads) {
    float v = (ToFloat(xr[c]) - mean) * scale;
    if (w != nullptr) v *= ToFloat(w[c]);
    if (b != nullptr) v += ToFloat(b[c]);
    yr[c] = FromFloat<T>(v);
  }
}

// y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w over each of the
// rows of x [rows, cols] (w [cols], or null), in float: RMSNorm, as Llama
// writes it out (device_plan_fusion.cc finds it in a graph). One block of
// kLayerNormThreads per row.
template <typename T, typename W>
SIMT_GLOBAL void RmsNormRows(const T* __restrict__ x, const W* __restrict__ w,
                             T* __restrict__ y, int64_t rows, int cols, float eps) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SIMT_SHARED(float, scratch, kWarpSize);
  const int64_t row = BlockIdx().x;
  if (row >= rows) return;  // the whole block: no barrier left waiting
  const int t = static_cast<int>(ThreadIdx().x);
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  float squares = 0.0f;
  for (int c = t; c < cols; c += kLayerNormThreads) {
    const float v = ToFloat(xr[c]);
    squares += v * v;
  }
  const float scale = Rsqrt(BlockAllSum(squares, scratch) / static_cast<float>(cols) + eps);
  for (int c = t; c < cols; c += kLayerNormThreads) {
    float v = ToFloat(xr[c]) * scale;
    if (w != nullptr) v *= ToFloat(w[c]);
    yr[c] = FromFloat<T>(v);
  }
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_LAYER_NORM_H_
