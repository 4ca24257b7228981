// nvcc's side of the kernels in this folder: the same source the device
// emulator runs on the CPU, launched on the GPU.
#include "runtime/cuda/kernels/elementwise.h"
#include "runtime/cuda/kernels/elementwise_program.h"
#include "runtime/cuda/kernels/cast.h"
#include "runtime/cuda/kernels/embedding.h"
#include "runtime/cuda/kernels/reduction.h"
#include "runtime/cuda/kernels/triangle.h"
#include "runtime/cuda/kernels/layer_norm.h"
#include "runtime/cuda/kernels/paged_attention.h"
#include "runtime/cuda/kernels/strided_copy.h"
#include "runtime/cuda/kernels/transformer_kernels.h"

namespace pipeserve::kernels {

cudaError_t LaunchLayerNorm(const float* x, const float* w, const float* b, float* y,
                            int64_t rows, int cols, float eps, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  LayerNormRows<float, float><<<static_cast<unsigned>(rows), kLayerNormThreads, 0, stream>>>(
      x, w, b, y, rows, cols, eps);
  return cudaGetLastError();
}

cudaError_t LaunchUnary(UnaryKind kind, const float* x, float* y, int64_t n,
                        cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + kElementwiseThreads - 1) / kElementwiseThreads;
  UnaryElementwise<float><<<static_cast<unsigned>(blocks), kElementwiseThreads, 0, stream>>>(
      x, y, n, kind);
  return cudaGetLastError();
}

cudaError_t LaunchSoftmax(const float* x, float* y, int64_t rows, int cols, bool log,
                          cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  SoftmaxRows<float><<<static_cast<unsigned>(rows), kSoftmaxThreads, 0, stream>>>(
      x, y, rows, cols, log);
  return cudaGetLastError();
}

cudaError_t LaunchStridedCopy(const void* src, void* dst, int element_bytes,
                              const StridedCopyOp& op, cudaStream_t stream) {
  if (op.n <= 0) return cudaSuccess;
  const unsigned blocks = CopyBlocks(op.n);
  if (element_bytes == 1) {
    StridedCopy<uint8_t><<<blocks, kCopyThreads, 0, stream>>>(
        static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), op);
  } else if (element_bytes == 8) {
    StridedCopy<int64_t><<<blocks, kCopyThreads, 0, stream>>>(
        static_cast<const int64_t*>(src), static_cast<int64_t*>(dst), op);
  } else {
    StridedCopy<float><<<blocks, kCopyThreads, 0, stream>>>(static_cast<const float*>(src),
                                                            static_cast<float*>(dst), op);
  }
  return cudaGetLastError();
}

cudaError_t LaunchProgram(const ElementwiseProgramOp& p, const EwPointers& at,
                          cudaStream_t stream) {
  if (p.n <= 0) return cudaSuccess;
  ElementwiseProgram<float><<<ProgramBlocks(p.n), kProgramThreads, 0, stream>>>(p, at);
  return cudaGetLastError();
}

cudaError_t LaunchReduce(const float* x, float* y, const ReduceOp& op, cudaStream_t stream) {
  if (op.out_n <= 0) return cudaSuccess;
  Reduce<float><<<static_cast<unsigned>(op.out_n), kReduceThreads, 0, stream>>>(x, y, op);
  return cudaGetLastError();
}

cudaError_t LaunchTriangle(const void* x, void* y, int element_bytes, int64_t n, int64_t rows,
                           int64_t cols, int64_t diagonal, bool upper, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const unsigned blocks = CopyBlocks(n);
  if (element_bytes == 1) {
    Triangle<uint8_t><<<blocks, kCopyThreads, 0, stream>>>(
        static_cast<const uint8_t*>(x), static_cast<uint8_t*>(y), n, rows, cols, diagonal, upper);
  } else if (element_bytes == 8) {
    Triangle<int64_t><<<blocks, kCopyThreads, 0, stream>>>(
        static_cast<const int64_t*>(x), static_cast<int64_t*>(y), n, rows, cols, diagonal, upper);
  } else {
    Triangle<float><<<blocks, kCopyThreads, 0, stream>>>(
        static_cast<const float*>(x), static_cast<float*>(y), n, rows, cols, diagonal, upper);
  }
  return cudaGetLastError();
}

namespace {
template <typename In>
void LaunchCastFrom(const void* x, void* y, CastType to, int64_t n, cudaStream_t stream) {
  const auto* in = static_cast<const In*>(x);
  const unsigned blocks = CopyBlocks(n);
  if (to == CastType::kI64) {
    Cast<In, int64_t><<<blocks, kCopyThreads, 0, stream>>>(in, static_cast<int64_t*>(y), n);
  } else if (to == CastType::kBool) {
    Cast<In, uint8_t><<<blocks, kCopyThreads, 0, stream>>>(in, static_cast<uint8_t*>(y), n);
  } else {
    Cast<In, float><<<blocks, kCopyThreads, 0, stream>>>(in, static_cast<float*>(y), n);
  }
}
}  // namespace

cudaError_t LaunchCast(const void* x, CastType from, void* y, CastType to, int64_t n,
                       cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (from == CastType::kI64) {
    LaunchCastFrom<int64_t>(x, y, to, n, stream);
  } else if (from == CastType::kBool) {
    LaunchCastFrom<uint8_t>(x, y, to, n, stream);
  } else {
    LaunchCastFrom<float>(x, y, to, n, stream);
  }
  return cudaGetLastError();
}

cudaError_t LaunchEmbedding(const int64_t* ids, const float* table, float* out, int64_t n,
                            int64_t rows, int64_t dim, cudaStream_t stream) {
  if (n <= 0 || dim <= 0) return cudaSuccess;
  EmbeddingRows<float><<<EmbeddingBlocks(n, dim), kEmbeddingThreads, 0, stream>>>(
      ids, table, out, n, rows, dim);
  return cudaGetLastError();
}

cudaError_t LaunchPagedAttention(const float* q, const float* k, const float* v, float* cache,
                                 const PagedCache& c, const int32_t* tiles, int64_t num_tiles,
                                 int heads, float scale, float* out, cudaStream_t stream) {
  if (c.tokens <= 0) return cudaSuccess;
  KvAppend<float><<<AppendBlocks(c.tokens, c.kv_heads, c.head_dim), kKvThreads, 0, stream>>>(
      k, v, cache, c);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || num_tiles == 0) return e;
  PagedAttention<float><<<dim3(static_cast<unsigned>(num_tiles), heads), kAttentionThreads, 0,
                          stream>>>(q, cache, tiles, out, c, heads, scale);
  return cudaGetLastError();
}

// Every dtype the kernels take, so that --config=cuda proves nvcc accepts
// all of the source the emulator runs.
template __global__ void LayerNormRows<__half, float>(const __half*, const float*, const float*,
                                                      __half*, int64_t, int, float);
template __global__ void LayerNormRows<__nv_bfloat16, float>(const __nv_bfloat16*, const float*,
                                                             const float*, __nv_bfloat16*,
                                                             int64_t, int, float);
template __global__ void UnaryElementwise<__half>(const __half*, __half*, int64_t, UnaryKind);
template __global__ void UnaryElementwise<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*,
                                                         int64_t, UnaryKind);
template __global__ void SoftmaxRows<__half>(const __half*, __half*, int64_t, int, bool);
template __global__ void SoftmaxRows<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*,
                                                    int64_t, int, bool);

template __global__ void ElementwiseProgram<__half>(ElementwiseProgramOp, EwPointers);
template __global__ void ElementwiseProgram<__nv_bfloat16>(ElementwiseProgramOp, EwPointers);
template __global__ void EmbeddingRows<__half>(const int64_t*, const __half*, __half*, int64_t,
                                               int64_t, int64_t);
template __global__ void EmbeddingRows<__nv_bfloat16>(const int64_t*, const __nv_bfloat16*,
                                                      __nv_bfloat16*, int64_t, int64_t, int64_t);
template __global__ void Reduce<__half>(const __half*, __half*, ReduceOp);
template __global__ void Reduce<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, ReduceOp);
template __global__ void KvAppend<__half>(const __half*, const __half*, __half*, PagedCache);
template __global__ void KvAppend<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                 __nv_bfloat16*, PagedCache);
template __global__ void PagedAttention<__half>(const __half*, const __half*, const int32_t*,
                                                __half*, PagedCache, int, float);
template __global__ void PagedAttention<__nv_bfloat16>(const __nv_bfloat16*,
                                                       const __nv_bfloat16*, const int32_t*,
                                                       __nv_bfloat16*, PagedCache, int, float);

}  // namespace pipeserve::kernels
