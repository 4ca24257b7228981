// embedding on the GPU, written once against simt.h: out[t, :] =
// table[ids[t], :]. The host checks ids that come from its inputs before
// they go up (the CPU backend's error, naming the id); an id out of range
// that reaches the kernel anyway gives a row of NaN, never a read outside
// the table.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_EMBEDDING_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_EMBEDDING_H_

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::kernels {

// One thread per output element: ids [n], table [rows, dim], out [n, dim]
// (grid: EmbeddingBlocks(n, dim) of kEmbeddingThreads).
template <typename T>
SIMT_GLOBAL void EmbeddingRows(const int64_t* __restrict__ ids, const T* __restrict__ table,
                               T* __restrict__ out, int64_t n, int64_t rows, int64_t dim) {
  using namespace simt;  // NOLINT: the kernel vocabulary
  const int64_t i = int64_t{BlockIdx().x} * kEmbeddingThreads + ThreadIdx().x;
  if (i >= n * dim) return;
  const int64_t id = ids[i / dim];
  out[i] = id >= 0 && id < rows ? table[id * dim + i % dim]
                                : FromFloat<T>(__builtin_nanf(""));
}

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_EMBEDDING_H_
