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

// Element c of a norm's input row: x[c], or with a residual r the sum
// x[c] + r[c] rounded to T, which is also written to h[c] (the residual
// stream the next layer adds to) -- the add that precedes a transformer's
// norms, fused into the norm's first pass. Later passes read h: each
// thread reads back only the elements it wrote.
// Row `at` of p, or null for a null p (no arithmetic on null).
template <typename T>
SIMT_DEVICE T* RowOf(T* p, int64_t at) {
  return p == nullptr ? p : p + at;
}

template <typename T>
SIMT_DEVICE float LoadInput(const T* x, const T* r, T* h, int c) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  if (r == nullptr) return ToFloat(x[c]);
  const T sum = FromFloat<T>(ToFloat(x[c]) + ToFloat(r[c]));
  h[c] = sum;
  return ToFloat(sum);
}

// y[r, :] = (x[r, :] - mean) / sqrt(var + eps) * w + b over each of the
// rows of x [rows, cols] (w, b [cols], either may be null), in float. With
// a residual r [rows, cols] (else null) x is x + r, also written to h
// (LoadInput). One block of kLayerNormThreads per row (grid.x = rows). Two
// passes over the row, the mean first and then the mean square of x -
// mean: the one-pass E[x^2] - mean^2 cancels badly when |mean| is large
// against the spread.
template <typename T, typename W>
SIMT_GLOBAL void LayerNormRows(const T* __restrict__ x, const T* __restrict__ r,
                               const W* __restrict__ w, const W* __restrict__ b,
                               T* __restrict__ y, T* h, int64_t rows, int cols, float eps) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SIMT_SHARED(float, scratch, kWarpSize);
  const int64_t row = BlockIdx().x;
  if (row >= rows) return;  // the whole block: no barrier left waiting
  const int t = static_cast<int>(ThreadIdx().x);
  const int64_t at = row * cols;
  T* yr = y + at;
  float sum = 0.0f;
  for (int c = t; c < cols; c += kLayerNormThreads) {
    sum += LoadInput(x + at, RowOf(r, at), RowOf(h, at), c);
  }
  const T* xr = (r == nullptr ? x : h) + at;
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
// writes it out (device_plan_fusion.cc finds it in a graph). With a
// residual r (else null) x is x + r, also written to h (LoadInput). One
// block of kLayerNormThreads per row.
template <typename T, typename W>
SIMT_GLOBAL void RmsNormRows(const T* __restrict__ x, const T* __restrict__ r,
                             const W* __restrict__ w, T* __restrict__ y, T* h, int64_t rows,
                             int cols, float eps) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  SIMT_SHARED(float, scratch, kWarpSize);
  const int64_t row = BlockIdx().x;
  if (row >= rows) return;  // the whole block: no barrier left waiting
  const int t = static_cast<int>(ThreadIdx().x);
  const int64_t at = row * cols;
  T* yr = y + at;
  float squares = 0.0f;
  for (int c = t; c < cols; c += kLayerNormThreads) {
    const float v = LoadInput(x + at, RowOf(r, at), RowOf(h, at), c);
    squares += v * v;
  }
  const T* xr = (r == nullptr ? x : h) + at;
  const float scale = Rsqrt(BlockAllSum(squares, scratch) / static_cast<float>(cols) + eps);
  for (int c = t; c < cols; c += kLayerNormThreads) {
    float v = ToFloat(xr[c]) * scale;
    if (w != nullptr) v *= ToFloat(w[c]);
    yr[c] = FromFloat<T>(v);
  }
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_LAYER_NORM_H_
