// GPU launchers for example_kernels.h, compiled by nvcc from
// example_kernels.cu under `--config=cuda` (see BUILD.bazel): the pattern
// for kernels written once against simt.h. Host code that includes this
// header uses CUDA's own 16-bit types, __half and __nv_bfloat16 (what
// simt::Half and simt::Bf16 are under nvcc; the emulator's are bit-for-bit
// the same, so a buffer of one can be copied as the other).
//
//   LaunchRowSum<__half>(x, out, rows, cols, stream);  // device pointers
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_EXAMPLE_KERNELS_CUDA_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_EXAMPLE_KERNELS_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace pipeserve::simt::example {

// out [rows] = the sums of the rows of x [rows, cols] (float accumulation),
// with example::RowSum: enqueues one kernel on `stream` (none when rows is
// 0) and returns cudaGetLastError(). T is float, __half or __nv_bfloat16.
template <typename T>
cudaError_t LaunchRowSum(const T* x, float* out, int rows, int cols,
                         cudaStream_t stream);

extern template cudaError_t LaunchRowSum<float>(const float*, float*, int, int,
                                                cudaStream_t);
extern template cudaError_t LaunchRowSum<__half>(const __half*, float*, int,
                                                 int, cudaStream_t);
extern template cudaError_t LaunchRowSum<__nv_bfloat16>(const __nv_bfloat16*,
                                                        float*, int, int,
                                                        cudaStream_t);

}  // namespace pipeserve::simt::example

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_EXAMPLE_KERNELS_CUDA_H_
