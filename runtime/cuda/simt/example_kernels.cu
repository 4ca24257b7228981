// nvcc's side of example_kernels.h: the same kernel source the emulator
// tests, launched on the GPU.
#include "runtime/cuda/simt/example_kernels.h"
#include "runtime/cuda/simt/example_kernels_cuda.h"

namespace pipeserve::simt::example {

template <typename T>
cudaError_t LaunchRowSum(const T* x, float* out, int rows, int cols,
                         cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  RowSum<T><<<rows, kRowSumThreads, 0, stream>>>(x, out, rows, cols);
  return cudaGetLastError();
}

template cudaError_t LaunchRowSum<float>(const float*, float*, int, int,
                                         cudaStream_t);
template cudaError_t LaunchRowSum<__half>(const __half*, float*, int, int,
                                          cudaStream_t);
template cudaError_t LaunchRowSum<__nv_bfloat16>(const __nv_bfloat16*, float*,
                                                 int, int, cudaStream_t);

// Every other example kernel in every dtype, so that `--config=cuda` builds
// prove nvcc accepts all of the source the emulator tests (WarpVotes and
// WarpInclusiveScan are not templates and always compile).
#define PIPESERVE_SIMT_INSTANTIATE(T)                                   \
  template __global__ void RowSumWarp<T>(const T*, float*, int, int);   \
  template __global__ void RmsNorm<T>(const T*, const T*, T*, int, int, \
                                      float);                           \
  template __global__ void AddBias2D<T>(const T*, const T*, T*, int, int);
PIPESERVE_SIMT_INSTANTIATE(float)
PIPESERVE_SIMT_INSTANTIATE(__half)
PIPESERVE_SIMT_INSTANTIATE(__nv_bfloat16)
#undef PIPESERVE_SIMT_INSTANTIATE

}  // namespace pipeserve::simt::example
