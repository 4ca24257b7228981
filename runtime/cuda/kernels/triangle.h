// triu and tril on the GPU, written once against simt.h: the last two dims
// of x as matrices [rows, cols], entries off the kept triangle zeroed.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_TRIANGLE_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_TRIANGLE_H_

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

// y[..., i, j] = x[..., i, j] where j - i >= diagonal (upper) or <=
// diagonal (lower), else 0; one thread per element (grid:
// CopyBlocks(n) of kCopyThreads). T: any trivially zeroable storage.
template <typename T>
SIMT_GLOBAL void Triangle(const T* __restrict__ x, T* __restrict__ y, int64_t n, int64_t rows,
                          int64_t cols, int64_t diagonal, bool upper) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const int64_t i = int64_t{BlockIdx().x} * kCopyThreads + ThreadIdx().x;
  if (i >= n) return;
  const int64_t d = i % cols - i / cols % rows;  // j - i
  const bool keep = upper ? d >= diagonal : d <= diagonal;
  y[i] = keep ? x[i] : T{};
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_TRIANGLE_H_
