// nvcc's side of the kernels in this folder: the same source the device
// emulator runs on the CPU, launched on the GPU.
#include "runtime/cuda/kernels/layer_norm.h"
#include "runtime/cuda/kernels/transformer_kernels.h"

namespace pipeserve::kernels {

cudaError_t LaunchLayerNorm(const float* x, const float* w, const float* b, float* y,
                            int64_t rows, int cols, float eps, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  LayerNormRows<float, float><<<static_cast<unsigned>(rows), kLayerNormThreads, 0, stream>>>(
      x, w, b, y, rows, cols, eps);
  return cudaGetLastError();
}

// Every dtype the kernels take, so that --config=cuda proves nvcc accepts
// all of the source the emulator runs.
template __global__ void LayerNormRows<__half, float>(const __half*, const float*, const float*,
                                                      __half*, int64_t, int, float);
template __global__ void LayerNormRows<__nv_bfloat16, float>(const __nv_bfloat16*, const float*,
                                                             const float*, __nv_bfloat16*,
                                                             int64_t, int, float);

}  // namespace pipeserve::kernels
