// The GPU launchers of the kernels in this folder (nvcc compiles
// transformer_kernels.cu under --config=cuda; nothing else may include
// this header). Each enqueues one kernel on `stream` and returns
// cudaGetLastError() (cudaSuccess without a launch when there is no work).
// Buffers are device memory.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_TRANSFORMER_KERNELS_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_TRANSFORMER_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/kernels/unary_kind.h"

namespace pipeserve::kernels {

// layer_norm over the last `cols` values of x [rows, cols] (float32), with
// w and b [cols] (float32, either may be null): layer_norm.h.
cudaError_t LaunchLayerNorm(const float* x, const float* w, const float* b, float* y,
                            int64_t rows, int cols, float eps, cudaStream_t stream);

// y = f(x) elementwise over n float32 values: elementwise.h.
cudaError_t LaunchUnary(UnaryKind kind, const float* x, float* y, int64_t n,
                        cudaStream_t stream);

// Softmax (log_softmax when `log`) over the last `cols` values of x
// [rows, cols], float32: elementwise.h.
cudaError_t LaunchSoftmax(const float* x, float* y, int64_t rows, int cols, bool log,
                          cudaStream_t stream);

// The copies of permute, slice, select, expand, cat and stack, on values
// of 1 (bool), 4 (float32) or 8 (int64) bytes (strided_copy.h).
cudaError_t LaunchStridedCopy(const void* src, void* dst, int element_bytes,
                              const StridedCopyOp& op, cudaStream_t stream);

// An elementwise program over float32 (and bool) values
// (elementwise_program.h).
cudaError_t LaunchProgram(const ElementwiseProgramOp& p, const EwPointers& at,
                          cudaStream_t stream);

// sum, mean or amax of float32 x (reduction.h).
cudaError_t LaunchReduce(const float* x, float* y, const ReduceOp& op, cudaStream_t stream);

// triu or tril over the last two dims of x [..., rows, cols], values of 1,
// 4 or 8 bytes (triangle.h).
cudaError_t LaunchTriangle(const void* x, void* y, int element_bytes, int64_t n, int64_t rows,
                           int64_t cols, int64_t diagonal, bool upper, cudaStream_t stream);

// y = x converted between float32, int64 and bool (cast.h).
cudaError_t LaunchCast(const void* x, CastType from, void* y, CastType to, int64_t n,
                       cudaStream_t stream);

// out [n, dim] = rows of table [rows, dim] (float32) at ids [n] (int64)
// (embedding.h).
cudaError_t LaunchEmbedding(const int64_t* ids, const float* table, float* out, int64_t n,
                            int64_t rows, int64_t dim, cudaStream_t stream);

// cached_attention of one step on one layer's paged cache (float32):
// appends k and v, then attends q over the cache (paged_attention.h).
// `c`'s metadata pointers and `tiles` (AttentionTiles of the step, device
// copies) are device memory.
cudaError_t LaunchPagedAttention(const float* q, const float* k, const float* v, float* cache,
                                 const PagedCache& c, const int32_t* tiles, int64_t num_tiles,
                                 int heads, float scale, float* out, cudaStream_t stream);

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_TRANSFORMER_KERNELS_H_
