// wmma.h in an ordinary C++ build: tensor-core fragments emulated. Include
// wmma.h, not this file.
//
// Every lane holds the whole tile (element (r, c) at x[r * cols + c]), so
// mma_sync is computed by each lane alike. Loads and stores touch memory
// as the hardware splits a tile between lanes: element i is lane i % 32's
// share, and only that access is recorded (the lane reads the rest of the
// tile unrecorded), so a read of a stored tile by another warp or lane
// without a barrier in between is a race the shared bookkeeping reports,
// while a warp's load then store of its own tile (an accumulator kept in
// shared memory) is not. Each *_sync call is a warp op (every lane of the
// warp must reach it, as for shuffles), and a pointer that is not 32-byte
// aligned or an ldm that is not a multiple of 16 bytes is reported.
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
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

namespace internal {

// The warp meets here (a warp op), then the pointer and ldm are checked.
template <typename T>
void Meet(const char* call, const simt::SharedPtr<T>& p, unsigned ldm, const char* file,
          int line) {
  simt::internal::WarpOp(simt::internal::WarpOpKind::kWmma, 0, 0, file, line);
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

// Tile element i at p[at]: recorded as a read when it is this lane's share.
template <typename T>
T Load(const simt::SharedPtr<T>& p, int64_t at, int i) {
  return i % simt::kWarpSize == simt::LaneId() ? static_cast<T>(p[at]) : p.Peek(at);
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
  internal::Meet("load_matrix_sync", p, ldm, file, line);
  using F = fragment<Use, M, N, K, T, L>;
  for (int i = 0; i < F::num_elements; ++i) {
    f.x[i] = internal::Load(p, internal::At(std::is_same_v<L, row_major>, i / F::cols,
                                            i % F::cols, ldm), i);
  }
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const simt::SharedPtr<T>& p,
                      unsigned ldm, layout_t layout, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  internal::Meet("load_matrix_sync", p, ldm, file, line);
  for (int i = 0; i < M * N; ++i) {
    f.x[i] = internal::Load(p, internal::At(layout == mem_row_major, i / N, i % N, ldm), i);
  }
}

// Each lane writes its share of the tile: element i by lane i % 32.
template <int M, int N, int K, typename T>
void store_matrix_sync(const simt::SharedPtr<T>& p, const fragment<accumulator, M, N, K, T>& f,
                       unsigned ldm, layout_t layout, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  internal::Meet("store_matrix_sync", p, ldm, file, line);
  for (int i = simt::LaneId(); i < M * N; i += simt::kWarpSize) {
    p[internal::At(layout == mem_row_major, i / N, i % N, ldm)] = f.x[i];
  }
}

// d = a · b + c, products exact and sums in float (d may be c).
template <int M, int N, int K, typename T, typename La, typename Lb>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, La>& a,
              const fragment<matrix_b, M, N, K, T, Lb>& b,
              const fragment<accumulator, M, N, K, float>& c, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  simt::internal::WarpOp(simt::internal::WarpOpKind::kWmma, 0, 0, file, line);
  float out[M * N];
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc = c.x[m * N + n];
      for (int k = 0; k < K; ++k) {
        acc += simt::ToFloat(a.x[m * K + k]) * simt::ToFloat(b.x[k * N + n]);
      }
      out[m * N + n] = acc;
    }
  }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace pipeserve::simt::wmma

#endif  // PIPESERVE_RUNTIME_CUDA_SIMT_WMMA_HOST_H_
