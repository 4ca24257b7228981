// The shape ops that move data on the GPU (permute, slice, select,
// expand, cat, stack), written once against simt.h: each is one or more
// strided copies. reshape, squeeze and unsqueeze move nothing (the device
// plan makes them views of their input's buffer).
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_STRIDED_COPY_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_STRIDED_COPY_H_

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

// One thread per element (grid: CopyBlocks(op.n) of kCopyThreads).
template <typename T>
SIMT_GLOBAL void StridedCopy(const T* __restrict__ src, T* __restrict__ dst, StridedCopyOp op) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  int64_t i = int64_t{BlockIdx().x} * kCopyThreads + ThreadIdx().x;
  if (i >= op.n) return;
  int64_t s = op.src_offset, d = op.dst_offset;
  for (int k = op.rank - 1; k >= 0; --k) {
    const int64_t c = i % op.dims[k];
    i /= op.dims[k];
    s += c * op.src_strides[k];
    d += c * op.dst_strides[k];
  }
  dst[d] = src[s];
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_STRIDED_COPY_H_
