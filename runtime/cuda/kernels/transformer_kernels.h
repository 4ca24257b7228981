// The GPU launchers of the kernels in this folder (nvcc compiles
// transformer_kernels.cu under --config=cuda; nothing else may include
// this header). Each enqueues its kernel on `stream` and returns
// cudaGetLastError() (cudaSuccess without a launch when there is no work).
// Buffers are device memory; float values are stored as `t` says (float32,
// float16 or bfloat16), the kernels computing in float32.
#ifndef PIPESERVE_RUNTIME_CUDA_KERNELS_TRANSFORMER_KERNELS_H_
#define PIPESERVE_RUNTIME_CUDA_KERNELS_TRANSFORMER_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "runtime/cuda/kernels/launch_args.h"
#include "runtime/cuda/kernels/unary_kind.h"

namespace pipeserve::kernels {

// layer_norm over the last `cols` values of x [rows, cols], with w and b
// [cols] (either may be null): layer_norm.h. With a residual r [rows,
// cols] (else null) the norm is of x + r, which is also written to h.
cudaError_t LaunchLayerNorm(FloatType t, const void* x, const void* r, const void* w,
                            const void* b, void* y, void* h, int64_t rows, int cols, float eps,
                            cudaStream_t stream);

// y = x * rsqrt(mean(x^2) + eps) * w over rows of x [rows, cols]; w may be
// null (layer_norm.h's RmsNormRows); r and h as for LaunchLayerNorm.
cudaError_t LaunchRmsNorm(FloatType t, const void* x, const void* r, const void* w, void* y,
                          void* h, int64_t rows, int cols, float eps, cudaStream_t stream);

// y = x * cos + rotate_half(x) * sin (rotary.h).
cudaError_t LaunchRotary(FloatType t, const void* x, const void* cos, const void* sin, void* y,
                         const RotaryOp& op, cudaStream_t stream);

// y = f(x) elementwise over n values: elementwise.h.
cudaError_t LaunchUnary(FloatType t, UnaryKind kind, const void* x, void* y, int64_t n,
                        cudaStream_t stream);

// Softmax (log_softmax when `log`) over the last `cols` values of x
// [rows, cols]: elementwise.h.
cudaError_t LaunchSoftmax(FloatType t, const void* x, void* y, int64_t rows, int cols, bool log,
                          cudaStream_t stream);

// The copies of permute, slice, select, expand, cat and stack, on values
// of 1 (bool), 2 (16-bit floats), 4 (float32) or 8 (int64) bytes
// (strided_copy.h).
cudaError_t LaunchStridedCopy(const void* src, void* dst, int element_bytes,
                              const StridedCopyOp& op, cudaStream_t stream);

// An elementwise program over float (and bool) values (elementwise_program.h).
cudaError_t LaunchProgram(FloatType t, const ElementwiseProgramOp& p, const EwPointers& at,
                          cudaStream_t stream);

// sum, mean or amax of x (reduction.h).
cudaError_t LaunchReduce(FloatType t, const void* x, void* y, const ReduceOp& op,
                         cudaStream_t stream);

// triu or tril over the last two dims of x [..., rows, cols], values of 1,
// 2, 4 or 8 bytes (triangle.h).
cudaError_t LaunchTriangle(const void* x, void* y, int element_bytes, int64_t n, int64_t rows,
                           int64_t cols, int64_t diagonal, bool upper, cudaStream_t stream);

// y = x converted between float32, float16, bfloat16, int64 and bool (cast.h).
cudaError_t LaunchCast(const void* x, CastType from, void* y, CastType to, int64_t n,
                       cudaStream_t stream);

// out [n, dim] = rows of table [rows, dim] at ids [n] (int64) (embedding.h).
cudaError_t LaunchEmbedding(FloatType t, const int64_t* ids, const void* table, void* out,
                            int64_t n, int64_t rows, int64_t dim, cudaStream_t stream);

// cached_attention of one step on one layer's paged cache: appends k and
// v, then attends q over the cache (paged_attention.h; with
// `tensor_cores`, a 16-bit t and TensorCoreHeadDim, tensor_core_
// attention.h; else PagedAttention laid out as `blocks` says, its split
// keys merged by CombineSplits). `c`'s metadata pointers, `tiles`
// (num_tiles * the kernel's tokens a tile of token indices) and
// blocks.partials are device memory.
cudaError_t LaunchPagedAttention(FloatType t, const void* q, const void* k, const void* v,
                                 void* cache, const PagedCache& c, const int32_t* tiles,
                                 int64_t num_tiles, int heads, float scale, void* out,
                                 bool tensor_cores, AttentionBlocks blocks, cudaStream_t stream);

// args.out [rows] (int64) = sample_tokens' picks from logits [rows,
// args.cols] (sample.h); every pointer is device memory, the parameters
// checked by the host (CheckSampleRows).
cudaError_t LaunchSampleTokens(FloatType t, const void* logits, int64_t rows,
                               const SampleArgs& args, cudaStream_t stream);

}  // namespace pipeserve::kernels

#endif  // PIPESERVE_RUNTIME_CUDA_KERNELS_TRANSFORMER_KERNELS_H_
