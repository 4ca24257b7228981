// nvcc's side of the kernels in this folder: the same source the device
// emulator runs on the CPU, launched on the GPU in the storage type the
// device plan chose (float, __half or __nv_bfloat16).
#include "runtime/cuda/kernels/cast.h"
#include "runtime/cuda/kernels/elementwise.h"
#include "runtime/cuda/kernels/elementwise_program.h"
#include "runtime/cuda/kernels/embedding.h"
#include "runtime/cuda/kernels/layer_norm.h"
#include "runtime/cuda/kernels/paged_attention.h"
#include "runtime/cuda/kernels/reduction.h"
#include "runtime/cuda/kernels/rotary.h"
#include "runtime/cuda/kernels/sample.h"
#include "runtime/cuda/kernels/strided_copy.h"
#include "runtime/cuda/kernels/tensor_core_attention.h"
#include "runtime/cuda/kernels/transformer_kernels.h"
#include "runtime/cuda/kernels/triangle.h"

namespace pipeserve::kernels {
namespace {

// Calls f(T{}) with T the storage type `t` names.
template <typename F>
void WithType(FloatType t, F f) {
  switch (t) {
    case FloatType::kF16: f(__half{}); return;
    case FloatType::kBF16: f(__nv_bfloat16{}); return;
    default: f(float{}); return;
  }
}

// Calls f(T{}) with T the element type of `bytes` bytes.
template <typename F>
void WithBytes(int bytes, F f) {
  switch (bytes) {
    case 1: f(uint8_t{}); return;
    case 2: f(uint16_t{}); return;
    case 8: f(int64_t{}); return;
    default: f(float{}); return;
  }
}

template <typename F>
void WithCastType(CastType t, F f) {
  switch (t) {
    case CastType::kI64: f(int64_t{}); return;
    case CastType::kBool: f(uint8_t{}); return;
    case CastType::kF16: f(__half{}); return;
    case CastType::kBF16: f(__nv_bfloat16{}); return;
    default: f(float{}); return;
  }
}

unsigned Blocks(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

cudaError_t LaunchLayerNorm(FloatType t, const void* x, const void* r, const void* w,
                            const void* b, void* y, void* h, int64_t rows, int cols, float eps,
                            cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    LayerNormRows<T, T><<<static_cast<unsigned>(rows), kLayerNormThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(r), static_cast<const T*>(w),
        static_cast<const T*>(b), static_cast<T*>(y), static_cast<T*>(h), rows, cols, eps);
  });
  return cudaGetLastError();
}

cudaError_t LaunchRmsNorm(FloatType t, const void* x, const void* r, const void* w, void* y,
                          void* h, int64_t rows, int cols, float eps, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    RmsNormRows<T, T><<<static_cast<unsigned>(rows), kLayerNormThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(r), static_cast<const T*>(w),
        static_cast<T*>(y), static_cast<T*>(h), rows, cols, eps);
  });
  return cudaGetLastError();
}

cudaError_t LaunchRotary(FloatType t, const void* x, const void* cos, const void* sin, void* y,
                         const RotaryOp& op, cudaStream_t stream) {
  if (op.n <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((op.n + kElementwiseThreads - 1) / kElementwiseThreads);
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    RotaryRows<T><<<blocks, kElementwiseThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(cos), static_cast<const T*>(sin),
        static_cast<T*>(y), op);
  });
  return cudaGetLastError();
}

cudaError_t LaunchUnary(FloatType t, UnaryKind kind, const void* x, void* y, int64_t n,
                        cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    UnaryElementwise<T><<<Blocks(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), n, kind);
  });
  return cudaGetLastError();
}

cudaError_t LaunchSoftmax(FloatType t, const void* x, void* y, int64_t rows, int cols, bool log,
                          cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    SoftmaxRows<T><<<static_cast<unsigned>(rows), kSoftmaxThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), rows, cols, log);
  });
  return cudaGetLastError();
}

cudaError_t LaunchStridedCopy(const void* src, void* dst, int element_bytes,
                              const StridedCopyOp& op, cudaStream_t stream) {
  if (op.n <= 0) return cudaSuccess;
  WithBytes(element_bytes, [&](auto zero) {
    using T = decltype(zero);
    StridedCopy<T><<<CopyBlocks(op.n), kCopyThreads, 0, stream>>>(static_cast<const T*>(src),
                                                                  static_cast<T*>(dst), op);
  });
  return cudaGetLastError();
}

cudaError_t LaunchProgram(FloatType t, const ElementwiseProgramOp& p, const EwPointers& at,
                          cudaStream_t stream) {
  if (p.n <= 0) return cudaSuccess;
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    ElementwiseProgram<T><<<ProgramBlocks(p.n), kProgramThreads, 0, stream>>>(p, at);
  });
  return cudaGetLastError();
}

cudaError_t LaunchReduce(FloatType t, const void* x, void* y, const ReduceOp& op,
                         cudaStream_t stream) {
  if (op.out_n <= 0) return cudaSuccess;
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    Reduce<T><<<static_cast<unsigned>(op.out_n), kReduceThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), op);
  });
  return cudaGetLastError();
}

cudaError_t LaunchTriangle(const void* x, void* y, int element_bytes, int64_t n, int64_t rows,
                           int64_t cols, int64_t diagonal, bool upper, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  WithBytes(element_bytes, [&](auto zero) {
    using T = decltype(zero);
    Triangle<T><<<CopyBlocks(n), kCopyThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), n, rows, cols, diagonal, upper);
  });
  return cudaGetLastError();
}

cudaError_t LaunchCast(const void* x, CastType from, void* y, CastType to, int64_t n,
                       cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  WithCastType(from, [&](auto in_zero) {
    using In = decltype(in_zero);
    WithCastType(to, [&](auto out_zero) {
      using Out = decltype(out_zero);
      Cast<In, Out><<<CopyBlocks(n), kCopyThreads, 0, stream>>>(static_cast<const In*>(x),
                                                                static_cast<Out*>(y), n);
    });
  });
  return cudaGetLastError();
}

cudaError_t LaunchEmbedding(FloatType t, const int64_t* ids, const void* table, void* out,
                            int64_t n, int64_t rows, int64_t dim, cudaStream_t stream) {
  if (n <= 0 || dim <= 0) return cudaSuccess;
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    EmbeddingRows<T><<<EmbeddingBlocks(n, dim), kEmbeddingThreads, 0, stream>>>(
        ids, static_cast<const T*>(table), static_cast<T*>(out), n, rows, dim);
  });
  return cudaGetLastError();
}

cudaError_t LaunchPagedAttention(FloatType t, const void* q, const void* k, const void* v,
                                 void* cache, const PagedCache& c, const int32_t* tiles,
                                 int64_t num_tiles, int heads, float scale, void* out,
                                 bool tensor_cores, AttentionBlocks blocks, cudaStream_t stream) {
  if (c.tokens <= 0) return cudaSuccess;
  if (AttentionArgsRefusal(t == FloatType::kF32, c, heads, tensor_cores, blocks) != nullptr) {
    return cudaErrorInvalidValue;  // before KvAppend: the cache stays as it was
  }
  cudaError_t e = cudaSuccess;
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    KvAppend<T><<<AppendBlocks(c.tokens, c.kv_heads, c.head_dim), kKvThreads, 0, stream>>>(
        static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(cache), c);
    e = cudaGetLastError();
    if (e != cudaSuccess || num_tiles == 0) return;
    if (tensor_cores) {  // 16-bit values, whole fragments: or its tiles are not PagedAttention's
      if constexpr (!std::is_same_v<T, float>) {
        const dim3 grid(static_cast<unsigned>(num_tiles), heads);
        TensorCoreAttention<T><<<grid, kTcThreads, 0, stream>>>(
            static_cast<const T*>(q), static_cast<const T*>(cache), tiles, static_cast<T*>(out), c,
            heads, scale);
        e = cudaGetLastError();
      }
      return;
    }
    const dim3 grid(static_cast<unsigned>(num_tiles), heads / blocks.group);
    PagedAttention<T><<<dim3(grid.x, grid.y, blocks.splits), kAttentionThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(cache), tiles, static_cast<T*>(out), c,
        heads, scale, blocks);
    e = cudaGetLastError();
    if (e != cudaSuccess || blocks.splits == 1) return;
    CombineSplits<T><<<grid, kAttentionThreads, 0, stream>>>(tiles, static_cast<T*>(out), c,
                                                             blocks);
    e = cudaGetLastError();
  });
  return e;
}

cudaError_t LaunchSampleTokens(FloatType t, const void* logits, int64_t rows,
                               const SampleArgs& args, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  WithType(t, [&](auto zero) {
    using T = decltype(zero);
    SampleTokenRows<T><<<static_cast<unsigned>(rows), kSampleThreads, 0, stream>>>(
        static_cast<const T*>(logits), args);
  });
  return cudaGetLastError();
}

}  // namespace pipeserve::kernels
