// CPU kernels for pipeserve's ops, over plain float32 row-major buffers.
// GEMMs go through oneDNN's sgemm (runtime/README.md says why); the
// elementwise ops are simple loops the compiler vectorises.
//
//   // y [m, n] = x [m, k] @ w^T, w is [n, k], plus bias [n], then ReLU
//   LinearForward(x, w, bias, m, n, k, y, /*relu=*/true);
//
// Thread count: GEMMs use the calling thread's OpenMP setting
// (SetComputeThreads). All functions are thread-safe.
#ifndef PIPESERVE_RUNTIME_CPU_CPU_KERNELS_H_
#define PIPESERVE_RUNTIME_CPU_CPU_KERNELS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

// The elementwise loops are built for the baseline x86-64 and again for
// AVX2 and AVX-512; the loader picks the best the CPU runs (GCC ifunc).
#define PIPESERVE_VECTOR_CLONES \
  __attribute__((target_clones("avx512f", "avx2", "default")))

namespace pipeserve {

// Sets how many threads GEMMs started from this thread may use.
void SetComputeThreads(int threads);

// c [m, n] = a [m, k] @ op(b) + beta * c, where op(b) = b [k, n], or b^T
// for b [n, k] when trans_b. Row-major, leading dimensions = row lengths.
absl::Status Gemm(bool trans_b, int64_t m, int64_t n, int64_t k,
                  const float* a, const float* b, float beta, float* c);

// y [m, n] = x [m, k] @ w^T + bias [n] (bias may be null), then max(y, 0)
// if relu. w is [n, k] as PyTorch stores it, or already transposed to
// [k, n] when w_transposed (faster: oneDNN's sgemm runs B^T about 25%
// slower than B on this CPU).
absl::Status LinearForward(const float* x, const float* w, const float* bias,
                           int64_t m, int64_t n, int64_t k, float* y,
                           bool relu, bool w_transposed = false);

// bfloat16 GEMM through oneDNN's matmul primitive (float32 accumulation;
// AVX512-BF16 or AMX kernels where the CPU has them):
// c [m, n] = a [m, k] @ op(b) + bias [n] (bias may be null), all bf16 bit
// patterns, op(b) = b [k, n], or b^T for b [n, k] when trans_b (PyTorch's
// linear weight as stored). Primitives are cached per shape and thread.
absl::Status GemmBf16(bool trans_b, int64_t m, int64_t n, int64_t k,
                      const uint16_t* a, const uint16_t* b, const uint16_t* bias,
                      uint16_t* c);

// out [cols, rows] = in [rows, cols]^T
void Transpose(const float* in, int64_t rows, int64_t cols, float* out);

enum class BinaryOp { kAdd, kSub, kMul };

// out = a op b with numpy broadcasting; out_shape is the broadcast shape.
void BinaryBroadcast(BinaryOp op, const float* a,
                     absl::Span<const int64_t> a_shape, const float* b,
                     absl::Span<const int64_t> b_shape, float* out,
                     absl::Span<const int64_t> out_shape);

// out = x op s, or s op x when reverse.
void BinaryScalar(BinaryOp op, const float* x, float s, bool reverse,
                  int64_t n, float* out);

void Relu(const float* x, int64_t n, float* out);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CPU_CPU_KERNELS_H_
