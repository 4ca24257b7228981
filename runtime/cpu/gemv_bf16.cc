#include "runtime/cpu/gemv_bf16.h"

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#define PIPESERVE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace pipeserve {

bool CpuHasAvx512Bf16() {
  unsigned a, b, c, d;
  // Leaf 7: AVX512F (ebx bit 16), AVX512BW (ebx 30), AVX512VL (ebx 31);
  // sub-leaf 1: AVX512_BF16 (eax bit 5). And the OS saves ZMM state.
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512 = (b >> 16 & 1) && (b >> 30 & 1) && (b >> 31 & 1);
  if (!avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1)) return false;
  return __builtin_cpu_supports("avx512f");
}

namespace {

uint16_t RoundToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>(u >> 16 | 0x40);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fff + (u >> 16 & 1)) >> 16);
}

float Bf16ToFloat(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// acc[r][i] += the products of 32 columns from `kk` (those `mask` keeps)
// of weight row r and row i of a.
template <int M, int R>
PIPESERVE_BF16_TARGET inline void Step(__m512 (&acc)[R][M], const uint16_t* w, const uint16_t* a,
                                       int64_t k, int64_t kk, __mmask32 mask) {
  __m512i wv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * k + kk);
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
    const __m512i x = _mm512_maskz_loadu_epi16(mask, a + i * k + kk);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)x, (__m512bh)wv[r]);
    }
  }
}

// Rows [n0, n0 + R) of c's M rows: R weight rows at a time, each loaded
// once and multiplied into every row of a.
template <int M, int R>
PIPESERVE_BF16_TARGET void Block(int64_t n0, int64_t n, int64_t k, const uint16_t* a,
                                 const uint16_t* b, const uint16_t* bias, uint16_t* c) {
  __m512 acc[R][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  const uint16_t* w = b + n0 * k;
  const int64_t whole = k / 32 * 32;
  for (int64_t kk = 0; kk < whole; kk += 32) Step<M, R>(acc, w, a, k, kk, ~__mmask32{0});
  if (whole < k) Step<M, R>(acc, w, a, k, whole, (__mmask32{1} << (k - whole)) - 1);
  for (int r = 0; r < R; ++r) {
    const float add = bias != nullptr ? Bf16ToFloat(bias[n0 + r]) : 0.0f;
    for (int i = 0; i < M; ++i) {
      c[i * n + n0 + r] = RoundToBf16(_mm512_reduce_add_ps(acc[r][i]) + add);
    }
  }
}

// Rows [n0, n1) of the output, 4 weight rows at a time.
template <int M>
void Rows(int64_t n0, int64_t n1, int64_t n, int64_t k, const uint16_t* a, const uint16_t* b,
          const uint16_t* bias, uint16_t* c) {
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4) Block<M, 4>(j, n, k, a, b, bias, c);
  for (; j < n1; ++j) Block<M, 1>(j, n, k, a, b, bias, c);
}

void RowsOf(int64_t m, int64_t n0, int64_t n1, int64_t n, int64_t k, const uint16_t* a,
            const uint16_t* b, const uint16_t* bias, uint16_t* c) {
  switch (m) {
    case 1: return Rows<1>(n0, n1, n, k, a, b, bias, c);
    case 2: return Rows<2>(n0, n1, n, k, a, b, bias, c);
    case 3: return Rows<3>(n0, n1, n, k, a, b, bias, c);
    default: return Rows<4>(n0, n1, n, k, a, b, bias, c);
  }
}

}  // namespace

bool GemvBf16Runs(int64_t m) {
  static const bool runs = [] {
    const char* v = std::getenv("PIPESERVE_GEMV");
    return CpuHasAvx512Bf16() && !(v != nullptr && std::strcmp(v, "onednn") == 0);
  }();
  return runs && m >= 1 && m <= kGemvBf16MaxRows;
}

void GemvBf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, const uint16_t* b,
              const uint16_t* bias, uint16_t* c) {
  if (m > kGemvBf16MaxRows) {
    for (int64_t i = 0; i < m; i += kGemvBf16MaxRows) {
      GemvBf16(std::min(kGemvBf16MaxRows, m - i), n, k, a + i * k, b, bias, c + i * n);
    }
    return;
  }
  if (m <= 0 || n <= 0) return;
  // Each thread streams one contiguous share of the weight rows (a
  // multiple of 4), so every weight is read once, in order.
  const int64_t groups = (n + 3) / 4;
  const int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), groups));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t n0 = std::min(n, groups * t / nt * 4);
    const int64_t n1 = std::min(n, groups * (t + 1) / nt * 4);
    RowsOf(m, n0, n1, n, k, a, b, bias, c);
  }
}

}  // namespace pipeserve
