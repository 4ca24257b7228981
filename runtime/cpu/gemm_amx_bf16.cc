#include "runtime/cpu/gemm_amx_bf16.h"

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#define PIPESERVE_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

namespace pipeserve {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature
constexpr int kXfeatureXtiledata = 18;
// Columns ahead of the tiles whose weight lines are fetched early (two
// cache lines: bench/gemv_bf16 read 26-27 GB/s so against 24-25 without).
constexpr int64_t kPrefetchAhead = 64;

bool CpuidHasAmxBf16() {
  unsigned a, b, c, d;
  // Leaf 7: AMX-BF16 (edx bit 22), AMX-TILE (edx 24), AVX512F (ebx 16),
  // AVX512BW (ebx 30), AVX512VL (ebx 31); sub-leaf 1: AVX512_BF16 (eax 5).
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d >> 22 & 1) || !(d >> 24 & 1)) return false;
  if (!(b >> 16 & 1) || !(b >> 30 & 1) || !(b >> 31 & 1)) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1)) return false;
  return __builtin_cpu_supports("avx512f");  // the OS keeps ZMM state
}

// The tiles: 0 and 1 hold 16 weight rows each (32 columns), 2 and 3 the
// step's rows in pairs (16 pairs of columns x 16 rows), 4 to 7 the
// products (16 outputs x 16 rows, float32).
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Palette 1, tiles 0 to 7 of 16 rows of 64 bytes. A constant, not built
// on each thread's stack (under ASan an aligned stack object may sit in a
// fake frame).
alignas(64) constexpr TileConfig kTileConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

PIPESERVE_AMX_TARGET inline void StoreRounded(const float* sums, const float* bias, int count,
                                              uint16_t* out) {
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  __m512 v = _mm512_maskz_loadu_ps(mask, sums);
  if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias));
  _mm256_mask_storeu_epi16(out, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// Columns [k0, k1) of a block of 32 weight rows (`w`, stride k) times 32
// rows of a (`pg`: their pairs, mp rows to a pair): the product tiles
// start at zero (k0 0) or from `acc`, and go back there ([output][row of
// a], 32 x 32 float32). `prefetch`: fetch the weight lines ahead.
PIPESERVE_AMX_TARGET inline void Chunk(const uint16_t* w, int64_t k, const uint16_t* pg,
                                       int64_t mp, int64_t k0, int64_t k1, bool prefetch,
                                       float* acc) {
  if (k0 == 0) {
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
  } else {
    _tile_loadd(4, acc, 128);
    _tile_loadd(5, acc + 16, 128);
    _tile_loadd(6, acc + 16 * 32, 128);
    _tile_loadd(7, acc + 16 * 32 + 16, 128);
  }
  const int64_t w_stride = k * 2, p_stride = mp * 4;
  for (int64_t kk = k0; kk < k1; kk += 32) {
    if (prefetch && kk + kPrefetchAhead < k) {
      for (int r = 0; r < 32; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + r * k + kk + kPrefetchAhead), _MM_HINT_T0);
      }
    }
    _tile_loadd(0, w + kk, w_stride);
    _tile_loadd(1, w + 16 * k + kk, w_stride);
    _tile_loadd(2, pg + kk * mp, p_stride);
    _tile_loadd(3, pg + kk * mp + 32, p_stride);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_dpbf16ps(6, 1, 2);
    _tile_dpbf16ps(7, 1, 3);
  }
  _tile_stored(4, acc, 128);
  _tile_stored(5, acc + 16, 128);
  _tile_stored(6, acc + 16 * 32, 128);
  _tile_stored(7, acc + 16 * 32 + 16, 128);
}

// c's outputs [n0, n0 + rows) of rows [r0, r0 + count) of a, from their
// sums (`acc`, [output][row]) plus the bias, rounded.
PIPESERVE_AMX_TARGET void Emit(const float* acc, int64_t r0, int64_t count, int64_t n, int64_t n0,
                               int rows, const float* bias, uint16_t* c) {
  alignas(64) float sums_t[32 * 32];  // [row][output]
  for (int r = 0; r < 32; ++r) {
    for (int j = 0; j < 32; ++j) sums_t[j * 32 + r] = acc[r * 32 + j];
  }
  const float* b = bias == nullptr ? nullptr : bias + n0;
  for (int64_t j = 0; j < count; ++j) {
    uint16_t* out = c + (r0 + j) * n + n0;
    StoreRounded(sums_t + j * 32, b, std::min(rows, 16), out);
    if (rows > 16) StoreRounded(sums_t + j * 32 + 16, b + (b ? 16 : 0), rows - 16, out + 16);
  }
}

// Outputs [n0, n0 + rows) for every row of a: `w` holds 32 weight rows
// (stride k; those beyond `rows` are zero), `p` the rows of a in pairs
// (PackRows, mp of them), taken 32 at a time (beyond the first 32, the
// weight rows come from L2 again: bench/gemv_bf16 found chunking the
// columns to keep them in L1 no faster, and oneDNN faster beyond 32 rows).
PIPESERVE_AMX_TARGET void Block(int64_t m, int64_t mp, int64_t n, int64_t k, int64_t n0,
                                int rows, const uint16_t* w, const uint16_t* p,
                                const float* bias, uint16_t* c) {
  alignas(64) float acc[32 * 32];
  for (int64_t g = 0; g < mp / 32; ++g) {
    Chunk(w, k, p + g * 64, mp, 0, k, g == 0, acc);
    Emit(acc, g * 32, std::min<int64_t>(32, m - g * 32), n, n0, rows, bias, c);
  }
}

// a's rows in column pairs, AMX's layout for tile B: the pair (2q, 2q+1)
// of row i at p[q * mp + i] (as 32-bit words); rows m..mp-1 are zero.
void PackRows(int64_t m, int64_t mp, int64_t k, const uint16_t* a, uint32_t* p) {
  std::fill(p, p + k / 2 * mp, 0u);
  for (int64_t i = 0; i < m; ++i) {
    const uint16_t* row = a + i * k;
    for (int64_t q = 0; q < k / 2; ++q) {
      uint32_t pair;
      std::memcpy(&pair, row + 2 * q, 4);
      p[q * mp + i] = pair;
    }
  }
}

PIPESERVE_AMX_TARGET void Rows(int64_t m, int64_t mp, int64_t n, int64_t k, int64_t b0,
                               int64_t b1, const uint16_t* b, const uint16_t* p,
                               const float* bias, uint16_t* c) {
  _tile_loadconfig(&kTileConfig);
  std::vector<uint16_t> tail;  // the last rows of b, zero-padded to 32
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t n0 = blk * 32;
    const int rows = static_cast<int>(std::min<int64_t>(32, n - n0));
    const uint16_t* w = b + n0 * k;
    if (rows < 32) {
      tail.assign(32 * k, 0);
      std::memcpy(tail.data(), w, rows * k * 2);
      w = tail.data();
    }
    Block(m, mp, n, k, n0, rows, w, p, bias, c);
  }
  _tile_release();
}

}  // namespace

bool CpuHasAmxBf16() {
  static const bool has = [] {
    if (!CpuidHasAmxBf16()) return false;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
}

bool AmxBf16Runs(int64_t m, int64_t k) {
  static const bool runs = [] {
    const char* v = std::getenv("PIPESERVE_GEMV");
    return !(v != nullptr && std::strcmp(v, "onednn") == 0) && CpuHasAmxBf16();
  }();
  return runs && m >= kAmxBf16MinRows && m <= kAmxBf16MaxRows && k > 0 && k % 32 == 0;
}

void GemmAmxBf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, const uint16_t* b,
                 const uint16_t* bias, uint16_t* c) {
  if (m <= 0 || n <= 0) return;
  const int64_t mp = (m + 31) / 32 * 32;
  thread_local std::vector<uint32_t> packed;
  thread_local std::vector<float> bias_f;
  packed.resize(k / 2 * mp);
  PackRows(m, mp, k, a, packed.data());
  if (bias != nullptr) {
    bias_f.resize(n);
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t u = uint32_t{bias[j]} << 16;
      std::memcpy(&bias_f[j], &u, 4);
    }
  }
  const uint16_t* p = reinterpret_cast<const uint16_t*>(packed.data());
  const float* bf = bias != nullptr ? bias_f.data() : nullptr;
  // Each thread streams one contiguous share of the weight, 32 rows at a
  // time.
  const int64_t blocks = (n + 31) / 32;
  const int threads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), blocks));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    Rows(m, mp, n, k, blocks * t / nt, blocks * (t + 1) / nt, b, p, bf, c);
  }
}

}  // namespace pipeserve
