// The emulated tensor-core fragments (wmma.h): a warp's mma of 16-bit
// tiles against float64 in both B layouts and two shapes, and each misuse
// the hardware would punish (a stored tile read without a barrier, a
// misaligned pointer or ldm, part of a warp at an mma) reported by name.
#include "runtime/cuda/simt/wmma.h"

#include <cmath>
#include <random>
#include <type_traits>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/cuda/simt/simt.h"

namespace pipeserve::simt {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// c [M, N] = 2 * a [M, K] · b [K, N] (b stored as LayoutB says), by one
// warp through shared memory; the doubling is the uniform use of x[] a
// kernel may make.
template <typename T, int M, int N, int K, typename LayoutB>
SIMT_GLOBAL void OneTile(const T* a, const T* b, float* c) {
  SIMT_SHARED(T, a_s, M * K);
  SIMT_SHARED(T, b_s, K * N);
  SIMT_SHARED(float, c_s, M * N);
  const int t = static_cast<int>(ThreadIdx().x);
  for (int i = t; i < M * K; i += kWarpSize) a_s[i] = a[i];
  for (int i = t; i < K * N; i += kWarpSize) b_s[i] = b[i];
  SyncThreads();
  wmma::fragment<wmma::matrix_a, M, N, K, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, M, N, K, T, LayoutB> fb;
  wmma::fragment<wmma::accumulator, M, N, K, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a_s, K);
  wmma::load_matrix_sync(fb, b_s, std::is_same_v<LayoutB, wmma::row_major> ? N : K);
  wmma::mma_sync(fc, fa, fb, fc);
  for (int i = 0; i < fc.num_elements; ++i) fc.x[i] *= 2.0f;
  wmma::store_matrix_sync(c_s, fc, N, wmma::mem_row_major);
  SyncThreads();
  for (int i = t; i < M * N; i += kWarpSize) c[i] = c_s[i];
}

template <typename T, int M, int N, int K, typename LayoutB>
double TileError() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-2, 2);
  std::vector<T> a(M * K), b(K * N);
  for (T& v : a) v = FromFloat<T>(u(rng));
  for (T& v : b) v = FromFloat<T>(u(rng));
  std::vector<float> c(M * N);
  const absl::Status s =
      Emulate(1, kWarpSize, [&] { OneTile<T, M, N, K, LayoutB>(a.data(), b.data(), c.data()); });
  EXPECT_TRUE(s.ok()) << s;
  double err = 0;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double want = 0;
      for (int k = 0; k < K; ++k) {
        const int bi = std::is_same_v<LayoutB, wmma::row_major> ? k * N + n : n * K + k;
        want += static_cast<double>(ToFloat(a[m * K + k])) * ToFloat(b[bi]);
      }
      err = std::max(err, std::fabs(c[m * N + n] - 2 * want) / (1 + std::fabs(2 * want)));
    }
  }
  return err;
}

TEST(WmmaTest, MmaOfSixteenBitTilesMatchesFloat64) {
  // Products of 16-bit values are exact in float; only the float sums round.
  EXPECT_LE((TileError<Half, 16, 16, 16, wmma::row_major>()), 1e-6);
  EXPECT_LE((TileError<Half, 16, 16, 16, wmma::col_major>()), 1e-6);
  EXPECT_LE((TileError<Bf16, 16, 16, 16, wmma::row_major>()), 1e-6);
  EXPECT_LE((TileError<Bf16, 16, 16, 16, wmma::col_major>()), 1e-6);
  EXPECT_LE((TileError<Bf16, 8, 32, 16, wmma::col_major>()), 1e-6);
}

// A stored tile read back by another lane with no barrier in between.
SIMT_GLOBAL void ReadsAStoreTooSoon(float* out) {
  SIMT_SHARED(Half, a_s, 256);
  SIMT_SHARED(float, c_s, 256);
  for (int i = LaneId(); i < 256; i += kWarpSize) a_s[i] = FromFloat<Half>(1.0f);
  SyncThreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, Half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, Half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 0.0f);
  wmma::load_matrix_sync(a, a_s, 16);
  wmma::load_matrix_sync(b, a_s, 16);
  wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(c_s, c, 16, wmma::mem_row_major);
  out[LaneId()] = c_s[(LaneId() + 1) % kWarpSize];  // another lane's element
}

TEST(WmmaViolationTest, AStoredTileReadWithoutABarrierIsARace) {
  std::vector<float> out(kWarpSize);
  const absl::Status s = Emulate(1, kWarpSize, [&] { ReadsAStoreTooSoon(out.data()); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("shared-memory race on c_s["));
}

// A warp keeps its accumulator in shared memory: load, mma, store back,
// in one epoch (its own lanes' shares: no race), then another tile's worth.
SIMT_GLOBAL void AccumulatesInShared(float* out) {
  SIMT_SHARED(Bf16, a_s, 256);
  SIMT_SHARED(float, c_s, 256);
  for (int i = LaneId(); i < 256; i += kWarpSize) {
    a_s[i] = FromFloat<Bf16>(i % 17 == 0 ? 1.0f : 0.0f);
    c_s[i] = 1.0f;
  }
  SyncThreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, Bf16, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, Bf16, wmma::row_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::load_matrix_sync(a, a_s, 16);  // the identity
  wmma::load_matrix_sync(b, a_s, 16);
  for (int round = 0; round < 2; ++round) {
    wmma::load_matrix_sync(c, c_s, 16, wmma::mem_row_major);
    wmma::mma_sync(c, a, b, c);
    wmma::store_matrix_sync(c_s, c, 16, wmma::mem_row_major);
  }
  SyncThreads();
  for (int i = LaneId(); i < 256; i += kWarpSize) out[i] = c_s[i];
}

TEST(WmmaTest, AWarpMayKeepItsAccumulatorInSharedMemory) {
  std::vector<float> out(256);
  const absl::Status s = Emulate(1, kWarpSize, [&] { AccumulatesInShared(out.data()); });
  ASSERT_TRUE(s.ok()) << s;
  for (int i = 0; i < 256; ++i) EXPECT_EQ(out[i], i % 17 == 0 ? 3.0f : 1.0f) << i;
}

// A load at element `offset` of its array with stride `ldm`.
SIMT_GLOBAL void LoadAt(int offset, unsigned ldm) {
  SIMT_SHARED(Bf16, a_s, 1024);
  for (int i = LaneId(); i < 1024; i += kWarpSize) a_s[i] = FromFloat<Bf16>(0.5f);
  SyncThreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, Bf16, wmma::row_major> a;
  wmma::load_matrix_sync(a, a_s + offset, ldm);
}

TEST(WmmaViolationTest, MisalignedPointersAndStridesAreReported) {
  EXPECT_TRUE(Emulate(1, kWarpSize, [] { LoadAt(16, 24); }).ok());  // 32 and 48 bytes
  absl::Status s = Emulate(1, kWarpSize, [] { LoadAt(8, 16); });
  EXPECT_THAT(s.message(), AllOf(HasSubstr("wmma::load_matrix_sync: the pointer is element 8"),
                                 HasSubstr("not 32-byte aligned"), HasSubstr("wmma_test.cc:")));
  s = Emulate(1, kWarpSize, [] { LoadAt(0, 12); });
  EXPECT_THAT(s.message(), HasSubstr("ldm 12 is not a multiple of 16 bytes"));
}

SIMT_GLOBAL void MmaInHalfAWarp() {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, Half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, Half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(a, FromFloat<Half>(1.0f));
  wmma::fill_fragment(b, FromFloat<Half>(1.0f));
  wmma::fill_fragment(c, 0.0f);
  if (LaneId() < 16) wmma::mma_sync(c, a, b, c);
}

TEST(WmmaViolationTest, AnMmaReachedByHalfAWarpIsReportedNotAHang) {
  const absl::Status s = Emulate(1, kWarpSize, [] { MmaInHalfAWarp(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("warp op wmma at "), HasSubstr("wmma_test.cc:"),
                                 HasSubstr("not reached by all 32 lanes of warp 0")));
}

// A tile filled lane by lane and loaded with no barrier in between: on
// the GPU other lanes read those elements.
SIMT_GLOBAL void LoadsAFillTooSoon() {
  SIMT_SHARED(Half, a_s, 256);
  for (int i = LaneId(); i < 256; i += kWarpSize) a_s[i] = FromFloat<Half>(1.0f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, Half, wmma::row_major> a;
  wmma::load_matrix_sync(a, a_s, 16);
}

// A stored accumulator read back lane by lane (element i by lane i % 32)
// with no barrier: the hardware's lanes own other elements.
SIMT_GLOBAL void ReadsAStoreLaneByLane(float* out) {
  SIMT_SHARED(float, c_s, 256);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 1.0f);
  wmma::store_matrix_sync(c_s, c, 16, wmma::mem_row_major);
  for (int i = LaneId(); i < 256; i += kWarpSize) out[i] = c_s[i];
}

TEST(WmmaViolationTest, LaneByLaneAccessesWithoutABarrierAreRaces) {
  absl::Status s = Emulate(1, kWarpSize, [] { LoadsAFillTooSoon(); });
  EXPECT_THAT(s.message(), HasSubstr("shared-memory race on a_s["));
  std::vector<float> out(256);
  s = Emulate(1, kWarpSize, [&] { ReadsAStoreLaneByLane(out.data()); });
  EXPECT_THAT(s.message(), HasSubstr("shared-memory race on c_s["));
}

// Lanes naming different tiles in one load.
SIMT_GLOBAL void LanesLoadDifferentTiles() {
  SIMT_SHARED(Half, a_s, 512);
  for (int i = LaneId(); i < 512; i += kWarpSize) a_s[i] = FromFloat<Half>(1.0f);
  SyncThreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, Half, wmma::row_major> a;
  wmma::load_matrix_sync(a, a_s + (LaneId() < 16 ? 0 : 256), 16);
}

TEST(WmmaViolationTest, LanesPassingDifferentArgumentsAreReported) {
  const absl::Status s = Emulate(1, kWarpSize, [] { LanesLoadDifferentTiles(); });
  EXPECT_THAT(s.message(), AllOf(HasSubstr("wmma call at "), HasSubstr("wmma_test.cc:"),
                                 HasSubstr("the lanes of a warp pass different arguments")));
}

// Scales row r of an accumulator by r + 1 through x[i] as if x were the
// tile row-major: a guess at the hardware's mapping that the emulator
// (each lane's elements in its own order) does not honour either.
SIMT_GLOBAL void ScalesRowsByIndex(float* out) {
  SIMT_SHARED(float, c_s, 256);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 1.0f);
  for (int i = 0; i < c.num_elements; ++i) c.x[i] *= static_cast<float>(i / 16 + 1);
  wmma::store_matrix_sync(c_s, c, 16, wmma::mem_row_major);
  SyncThreads();
  for (int i = LaneId(); i < 256; i += kWarpSize) out[i] = c_s[i];
}

TEST(WmmaTest, AKernelRelyingOnTheElementOrderGetsAWrongAnswer) {
  std::vector<float> out(256);
  ASSERT_TRUE(Emulate(1, kWarpSize, [&] { ScalesRowsByIndex(out.data()); }).ok());
  int right = 0;
  for (int i = 0; i < 256; ++i) right += out[i] == static_cast<float>(i / 16 + 1);
  EXPECT_LT(right, 256);
}

}  // namespace
}  // namespace pipeserve::simt
