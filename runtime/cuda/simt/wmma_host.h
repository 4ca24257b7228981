// wmma.h in an ordinary C++ build: tensor-core fragments emulated. Include
// wmma.h, not this file.
//
// Every lane holds the whole tile, but each in its own order (element i of
// the tile at x[(i + 7 * lane) % num_elements]), so a kernel that treats
// x[] by index rather than uniformly computes a wrong answer here, as it
// would on the GPU (where a lane holds a few elements, mapped as the
// hardware likes). mma_sync is computed by each lane alike. Each *_sync
// call is a warp op: every lane of the warp must reach it, naming the same
// tile (array, offset, ldm, layout). Memory is touched as the hardware
// shares a tile out: an accumulator's element (r, c) is lane (r % 8) * 4 +
// (c % 8) / 2's, for its load and its store alike (a warp may load, mma
// and store back its own accumulator in one epoch), while a matrix_a or
// matrix_b load counts as a read by every lane. So a tile written by other
// threads and loaded, or stored and read by other lanes, without a
// barrier in between is a race the shared bookkeeping reports. A pointer
// that is not 32-byte aligned or an ldm that is not a multiple of 16 bytes
// is reported too, and only the shapes and types sm_80+ offers compile.
#ifndef PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_HOST_H_
#define PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_HOST_H_

#include <cstdint>
#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::simt::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// An M x K (matrix_a), K x N (matrix_b) or M x N (accumulator) tile of T.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert((M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                    (M == 8 && N == 32 && K == 16),
                "wmma shapes for 16-bit inputs: m16n16k16, m32n8k16, m8n32k16");
  static_assert(std::is_same_v<Use, accumulator>
                    ? std::is_same_v<T, float>
                    : std::is_same_v<T, simt::Half> || std::is_same_v<T, simt::Bf16>,
                "matrix_a and matrix_b of Half or Bf16, float accumulators");
  static_assert(std::is_same_v<Use, accumulator> ||
                    std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "matrix_a and matrix_b name their layout");
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

namespace internal {

// Where the calling lane keeps tile element i of n.
inline int Slot(int i, int n) { return (i + 7 * simt::LaneId()) % n; }

// The lane whose share of an accumulator element (r, c) is, as sm_80+
// lays out a 16x16 float accumulator.
inline int AccumulatorLane(int r, int c) { return (r % 8) * 4 + (c % 8) / 2; }

// The warp meets here (a warp op naming the tile: every lane the same),
// then the pointer and ldm are checked.
template <typename T>
void Meet(const char* call, const simt::SharedPtr<T>& p, unsigned ldm, int layout,
          const char* file, int line) {
  const uint64_t tile = reinterpret_cast<uintptr_t>(p.array()) * 1000003u ^
                        static_cast<uint64_t>(p.offset()) * 8191u ^ (uint64_t{ldm} << 1) ^
                        static_cast<uint64_t>(layout);
  simt::internal::WarpOp(simt::internal::WarpOpKind::kWmma, tile, 0, file, line);
  if ((p.offset() * static_cast<int64_t>(sizeof(T))) % 32 != 0) {
    simt::internal::ReportMisuse(
        absl::StrCat("wmma::", call, ": the pointer is element ", p.offset(),
                     " of its shared array, not 32-byte aligned"),
        file, line);
  }
  if ((ldm * sizeof(T)) % 16 != 0) {
    simt::internal::ReportMisuse(
        absl::StrCat("wmma::", call, ": ldm ", ldm, " is not a multiple of 16 bytes"), file,
        line);
  }
}

// Where element (r, c) of a tile is in memory laid out row- or column-major.
inline int64_t At(bool row_major, int r, int c, unsigned ldm) {
  return row_major ? int64_t{r} * ldm + c : int64_t{c} * ldm + r;
}

// p[at], recorded as this lane's read when `mine`.
template <typename T>
T Load(const simt::SharedPtr<T>& p, int64_t at, bool mine) {
  return mine ? static_cast<T>(p[at]) : p.Peek(at);
}

}  // namespace internal

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, T v) {
  for (T& e : f.x) e = v;
}

// matrix_a / matrix_b: the layout is the fragment's.
template <typename Use, int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const simt::SharedPtr<T>& p, unsigned ldm,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  constexpr bool kRowMajor = std::is_same_v<L, row_major>;
  internal::Meet("load_matrix_sync", p, ldm, kRowMajor, file, line);
  using F = fragment<Use, M, N, K, T, L>;
  for (int i = 0; i < F::num_elements; ++i) {  // every lane reads it all
    f.x[internal::Slot(i, F::num_elements)] =
        internal::Load(p, internal::At(kRowMajor, i / F::cols, i % F::cols, ldm), true);
  }
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const simt::SharedPtr<T>& p,
                      unsigned ldm, layout_t layout, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  internal::Meet("load_matrix_sync", p, ldm, layout, file, line);
  for (int i = 0; i < M * N; ++i) {
    const int r = i / N, c = i % N;
    f.x[internal::Slot(i, M * N)] =
        internal::Load(p, internal::At(layout == mem_row_major, r, c, ldm),
                       internal::AccumulatorLane(r, c) == simt::LaneId());
  }
}

// Each lane writes its share of the tile (AccumulatorLane).
template <int M, int N, int K, typename T>
void store_matrix_sync(const simt::SharedPtr<T>& p, const fragment<accumulator, M, N, K, T>& f,
                       unsigned ldm, layout_t layout, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  internal::Meet("store_matrix_sync", p, ldm, layout, file, line);
  for (int i = 0; i < M * N; ++i) {
    const int r = i / N, c = i % N;
    if (internal::AccumulatorLane(r, c) != simt::LaneId()) continue;
    p[internal::At(layout == mem_row_major, r, c, ldm)] = f.x[internal::Slot(i, M * N)];
  }
}

// d = a · b + c, products exact and sums in float (d may be c).
template <int M, int N, int K, typename T, typename La, typename Lb>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, La>& a,
              const fragment<matrix_b, M, N, K, T, Lb>& b,
              const fragment<accumulator, M, N, K, float>& c, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  simt::internal::WarpOp(simt::internal::WarpOpKind::kWmma, 0, 0, file, line);
  using internal::Slot;
  float out[M * N];
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc = c.x[Slot(m * N + n, M * N)];
      for (int k = 0; k < K; ++k) {
        acc += simt::ToFloat(a.x[Slot(m * K + k, M * K)]) *
               simt::ToFloat(b.x[Slot(k * N + n, K * N)]);
      }
      out[m * N + n] = acc;
    }
  }
  for (int i = 0; i < M * N; ++i) d.x[Slot(i, M * N)] = out[i];
}

}  // namespace pipeserve::simt::wmma

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_HOST_H_
