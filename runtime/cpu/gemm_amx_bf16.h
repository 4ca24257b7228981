// bfloat16 products of a batch of rows (a decode step of many sequences,
// one row each) by a weight matrix, on Intel AMX tiles, reading the weight
// in place as PyTorch stores a linear weight ([n, k], row-major). The
// weight's rows are the tiles' A operand (16 rows of 32 columns, loaded
// with the row stride), the step's rows, packed once per call into AMX's
// pairs layout, are the B operand, and each product tile comes out
// transposed (16 outputs of 16 rows). So no weight is copied or reordered:
// such a step streams the weights from memory once, and the tiles' compute
// is far from the limit. (oneDNN's matmul at these shapes runs at about
// half the memory bandwidth: bench/gemv_bf16.)
//
//   if (AmxBf16Runs(m, k)) GemmAmxBf16(m, n, k, x, w, bias, y);  // y = x @ w^T + bias
#ifndef PIPESERVE_RUNTIME_CPU_GEMM_AMX_BF16_H_
#define PIPESERVE_RUNTIME_CPU_GEMM_AMX_BF16_H_

#include <cstdint>

namespace pipeserve {

// The rows GemmBf16 sends to GemmAmxBf16: fewer go to GemvBf16, more to
// oneDNN. (bench/gemv_bf16, 2 threads, 5632 x 2048, GB/s of weights read:
// 27 against oneDNN's 19 at 5 and 8 rows, 25 against 12 at 32; at 64 rows
// each block of weight rows is read again from L2 for the second 32, and
// both give 12.)
inline constexpr int64_t kAmxBf16MinRows = 5;
inline constexpr int64_t kAmxBf16MaxRows = 32;

// Whether this CPU has AMX-BF16 and the OS lets this process use the tiles
// (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM), asked once).
bool CpuHasAmxBf16();

// Whether GemmBf16 takes GemmAmxBf16 for `m` rows of `k` columns:
// kAmxBf16MinRows <= m <= kAmxBf16MaxRows, k a multiple of 32,
// CpuHasAmxBf16(), and PIPESERVE_GEMV=onednn not set (for comparisons).
bool AmxBf16Runs(int64_t m, int64_t k);

// c [m, n] = a [m, k] @ b^T + bias [n] (bias may be null), for b [n, k];
// all bfloat16 bit patterns, float32 accumulation, rounded to nearest
// even. k must be a multiple of 32, and CpuHasAmxBf16() true. The rows of
// b are split between the calling thread's OpenMP threads.
void GemmAmxBf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, const uint16_t* b,
                 const uint16_t* bias, uint16_t* c);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CPU_GEMM_AMX_BF16_H_
