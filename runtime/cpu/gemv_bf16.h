// bfloat16 products of a few rows by a weight matrix, the shape of a
// decode step (one row per sequence): every weight is read once for all
// rows, through AVX512-BF16 dot products with float32 accumulation. Such a
// step only streams the weights from memory, and this loop keeps closer to
// the memory bandwidth than oneDNN's general GEMM does at these shapes.
//
//   if (GemvBf16Runs(m)) GemvBf16(m, n, k, x, w, bias, y);  // y = x @ w^T + bias
#ifndef PIPESERVE_RUNTIME_CPU_GEMV_BF16_H_
#define PIPESERVE_RUNTIME_CPU_GEMV_BF16_H_

#include <cstdint>

namespace pipeserve {

// The most rows GemvBf16 takes.
// (bench/gemv_bf16, 2 threads, 5632 x 2048: 24.1 GB/s of weights read
// against oneDNN's 18.7 at 1 row, 20.8 against 18.8 at 4; beyond 4 rows
// its dot products, not memory, limit it, and oneDNN is faster.)
inline constexpr int64_t kGemvBf16MaxRows = 4;

// Whether this CPU has AVX512-BF16 (and the OS keeps AVX-512 state).
bool CpuHasAvx512Bf16();

// Whether GemmBf16 takes GemvBf16 for `m` rows: 1 <= m <= kGemvBf16MaxRows,
// CpuHasAvx512Bf16(), and PIPESERVE_GEMV=onednn not set (for comparisons).
bool GemvBf16Runs(int64_t m);

// c [m, n] = a [m, k] @ b^T + bias [n] (bias may be null), for b [n, k]
// as PyTorch stores a linear weight; all bfloat16 bit patterns, float32
// accumulation, rounded to nearest even. The rows of b are split between
// the calling thread's OpenMP threads (SetComputeThreads); more than
// kGemvBf16MaxRows rows go kGemvBf16MaxRows at a time. Only where
// CpuHasAvx512Bf16().
void GemvBf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, const uint16_t* b,
              const uint16_t* bias, uint16_t* c);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CPU_GEMV_BF16_H_
