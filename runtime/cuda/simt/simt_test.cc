// The emulator runs kernels as CUDA would (indices, barriers, warp ops,
// shared memory, 16-bit types) and reports each kind of misuse by name.
// Every example kernel is checked against a float64 loop.
#include "runtime/cuda/simt/simt.h"

#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/cuda/simt/example_kernels.h"

namespace pipeserve::simt {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

// Values in [-1, 1) stored as T.
template <typename T>
std::vector<T> Random(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<T> v(n);
  for (T& x : v) x = FromFloat<T>(dist(rng));
  return v;
}

// What a kernel's T output may differ from the float64 result by, relative
// to its magnitude: T's rounding, plus float accumulation.
template <typename T>
double Tolerance() {
  if constexpr (std::is_same_v<T, Half>) return 1e-3;
  if constexpr (std::is_same_v<T, Bf16>) return 8e-3;
  return 1e-5;
}

// ---------------------------------------------------------------------------
// Numbers.

TEST(NumbersTest, HalfRoundsToNearestEvenAndEveryValueRoundTrips) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const Half h{static_cast<uint16_t>(bits)};
    const float f = ToFloat(h);
    if (std::isnan(f)) {
      EXPECT_EQ(FromFloat<Half>(f).bits, 0x7fff) << bits;
    } else {
      EXPECT_EQ(FromFloat<Half>(f).bits, bits) << bits;
    }
  }
  EXPECT_EQ(FromFloat<Half>(1.0f).bits, 0x3c00);
  EXPECT_EQ(FromFloat<Half>(1.0f + 0x1p-11f).bits, 0x3c00);  // tie, even
  EXPECT_EQ(FromFloat<Half>(1.0f + 3 * 0x1p-11f).bits, 0x3c02);
  EXPECT_EQ(FromFloat<Half>(65519.0f).bits, 0x7bff);  // max half
  EXPECT_EQ(FromFloat<Half>(65520.0f).bits, 0x7c00);  // inf
  EXPECT_EQ(FromFloat<Half>(-INFINITY).bits, 0xfc00);
  EXPECT_EQ(FromFloat<Half>(0x1p-24f).bits, 0x0001);  // smallest subnormal
  EXPECT_EQ(FromFloat<Half>(0x1p-25f).bits, 0x0000);  // tie, even
  EXPECT_EQ(FromFloat<Half>(0x1.8p-25f).bits, 0x0001);
  EXPECT_EQ(FromFloat<Half>(-0x1p-14f).bits, 0x8400);  // smallest normal
}

TEST(NumbersTest, Bf16RoundsToNearestEvenAndKeepsNanAndInf) {
  EXPECT_EQ(FromFloat<Bf16>(1.0f).bits, 0x3f80);
  EXPECT_EQ(FromFloat<Bf16>(1.0f + 0x1p-8f).bits, 0x3f80);  // tie, even
  EXPECT_EQ(FromFloat<Bf16>(1.0f + 3 * 0x1p-8f).bits, 0x3f82);
  EXPECT_EQ(FromFloat<Bf16>(-INFINITY).bits, 0xff80);
  EXPECT_EQ(FromFloat<Bf16>(NAN).bits, 0x7fff);
  EXPECT_EQ(ToFloat(Bf16{0x3f82}), 1.015625f);
  EXPECT_EQ(ToFloat(Half{0x3c02}), 1.001953125f);
}

// ---------------------------------------------------------------------------
// Indices.

// Every thread writes what it sees at its global linear index.
SIMT_GLOBAL void RecordIndices(unsigned* out) {
  const Dim3 t = ThreadIdx(), b = BlockIdx(), bd = BlockDim(), g = GridDim();
  const unsigned block = b.x + g.x * (b.y + g.y * b.z);
  const unsigned i = block * bd.x * bd.y * bd.z + LinearThreadId();
  unsigned* o = out + 8 * i;
  o[0] = t.x, o[1] = t.y, o[2] = t.z;
  o[3] = b.x, o[4] = b.y, o[5] = b.z;
  o[6] = LaneId(), o[7] = WarpId();
}

TEST(EmulateTest, EveryThreadSeesItsOwnIndicesInThreeDimensions) {
  const Dim3 grid(2, 3, 2), block(8, 4, 2);
  std::vector<unsigned> out(8 * 12 * 64, ~0u);
  ASSERT_TRUE(Emulate(grid, block, [&] { RecordIndices(out.data()); }).ok());
  for (unsigned i = 0; i < 12 * 64; ++i) {
    const unsigned tid = i % 64, blk = i / 64;
    const unsigned* o = &out[8 * i];
    EXPECT_EQ(o[0], tid % 8);
    EXPECT_EQ(o[1], tid / 8 % 4);
    EXPECT_EQ(o[2], tid / 32);
    EXPECT_EQ(o[3], blk % 2);
    EXPECT_EQ(o[4], blk / 2 % 3);
    EXPECT_EQ(o[5], blk / 6);
    EXPECT_EQ(o[6], tid % 32);
    EXPECT_EQ(o[7], tid / 32);
  }
}

TEST(EmulateTest, RefusesLaunchesCudaWouldRefuse) {
  auto nothing = [] {};
  EXPECT_EQ(Emulate(1, 2048, nothing).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Emulate(1, Dim3(32, 32, 2), nothing).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Emulate(0, 32, nothing).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Emulate(Dim3(1, 70000), 32, nothing).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EmulateTest, EmulateInsideAKernelIsAnError) {
  std::vector<absl::StatusCode> codes(4);
  ASSERT_TRUE(Emulate(1, 4, [&] {
                codes[ThreadIdx().x] = Emulate(1, 1, [] {}).code();
              }).ok());
  for (absl::StatusCode c : codes) {
    EXPECT_EQ(c, absl::StatusCode::kFailedPrecondition);
  }
}

// ---------------------------------------------------------------------------
// The example kernels against float64.

template <typename T>
class TypedKernelTest : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, Half, Bf16>;
TYPED_TEST_SUITE(TypedKernelTest, StorageTypes);

template <typename T>
std::vector<double> RowSums(const std::vector<T>& x, int rows, int cols) {
  std::vector<double> sums(rows, 0.0);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) sums[r] += ToFloat(x[r * cols + c]);
  }
  return sums;
}

// |got - want| within float accumulation error of a sum of |values| <= 1.
void ExpectSums(const std::vector<float>& got, const std::vector<double>& want,
                int cols) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t r = 0; r < want.size(); ++r) {
    EXPECT_NEAR(got[r], want[r], 1e-6 * cols + 1e-6) << "row " << r;
  }
}

TYPED_TEST(TypedKernelTest, TreeReductionSumsRowsOfOddLengths) {
  using T = TypeParam;
  for (int cols : {1, 31, 33, 1000}) {
    const int rows = 3;
    const std::vector<T> x = Random<T>(rows * cols, cols);
    std::vector<float> out(rows, NAN);
    const absl::Status s = Emulate(rows, example::kRowSumThreads, [&] {
      example::RowSum<T>(x.data(), out.data(), rows, cols);
    });
    ASSERT_TRUE(s.ok()) << s;
    ExpectSums(out, RowSums(x, rows, cols), cols);
  }
}

TYPED_TEST(TypedKernelTest, WarpShuffleSumsOneRowPerWarp) {
  using T = TypeParam;
  // 10 rows in blocks of 4 warps: the last block's warps 2 and 3 have no row.
  const int rows = 10, warps = 4;
  for (int cols : {1, 33, 100}) {
    const std::vector<T> x = Random<T>(rows * cols, 7 + cols);
    std::vector<float> out(rows, NAN);
    const absl::Status s = Emulate(
        (rows + warps - 1) / warps, Dim3(kWarpSize, warps),
        [&] { example::RowSumWarp<T>(x.data(), out.data(), rows, cols); });
    ASSERT_TRUE(s.ok()) << s;
    ExpectSums(out, RowSums(x, rows, cols), cols);
  }
}

TEST(EmulateTest, BlocksOf1024ThreadsRun) {
  // Two blocks of 32 warps, the second with 8 rows for its 32 warps.
  const int rows = 40, cols = 45;
  const std::vector<float> x = Random<float>(rows * cols, 3);
  std::vector<float> out(rows, NAN);
  const absl::Status s = Emulate(2, Dim3(kWarpSize, 32), [&] {
    example::RowSumWarp<float>(x.data(), out.data(), rows, cols);
  });
  ASSERT_TRUE(s.ok()) << s;
  ExpectSums(out, RowSums(x, rows, cols), cols);
}

TYPED_TEST(TypedKernelTest, RmsNormMatchesFloat64) {
  using T = TypeParam;
  const int rows = 2;
  for (int cols : {1, 33, 1000}) {
    const std::vector<T> x = Random<T>(rows * cols, cols);
    const std::vector<T> w = Random<T>(cols, 99);
    std::vector<T> y(rows * cols);
    const absl::Status s = Emulate(rows, example::kRmsNormThreads, [&] {
      example::RmsNorm<T>(x.data(), w.data(), y.data(), rows, cols, 1e-5f);
    });
    ASSERT_TRUE(s.ok()) << s;
    for (int r = 0; r < rows; ++r) {
      double squares = 0;
      for (int c = 0; c < cols; ++c) {
        squares += std::pow(ToFloat(x[r * cols + c]), 2);
      }
      const double scale = 1 / std::sqrt(squares / cols + 1e-5);
      for (int c = 0; c < cols; ++c) {
        const double want = ToFloat(x[r * cols + c]) * scale * ToFloat(w[c]);
        EXPECT_NEAR(ToFloat(y[r * cols + c]), want,
                    Tolerance<T>() * (std::abs(want) + 1e-3))
            << "row " << r << " col " << c << " of " << cols;
      }
    }
  }
}

TYPED_TEST(TypedKernelTest, TwoDimensionalGridCoversAPartialLastBlock) {
  using T = TypeParam;
  const int rows = 3, cols = 70, threads = 32;  // 70 = 2 blocks + 6
  const std::vector<T> x = Random<T>(rows * cols, 1);
  const std::vector<T> bias = Random<T>(cols, 2);
  std::vector<T> y(rows * cols, FromFloat<T>(NAN));
  const Dim3 grid((cols + threads - 1) / threads, rows);
  const absl::Status s = Emulate(grid, threads, [&] {
    example::AddBias2D<T>(x.data(), bias.data(), y.data(), rows, cols);
  });
  ASSERT_TRUE(s.ok()) << s;
  for (int i = 0; i < rows * cols; ++i) {
    const double want =
        static_cast<double>(ToFloat(x[i])) + ToFloat(bias[i % cols]);
    EXPECT_NEAR(ToFloat(y[i]), want, Tolerance<T>() * (std::abs(want) + 1e-3))
        << i;
  }
}

TEST(EmulateTest, BallotAnyAndAllVoteAcrossEachWarp) {
  // Warps: all positive, alternating, none positive, and 4 positive
  // elements followed by 28 threads past the end.
  const int n = 100;
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) {
    x[i] = i < 32   ? 1.0f
           : i < 64 ? (i % 2 ? 1.0f : -1.0f)
           : i < 96 ? -1.0f
                    : 2.0f;
  }
  std::vector<uint32_t> ballots(4, 0xdeadbeef);
  std::vector<int> any(4, -1), all(4, -1);
  const absl::Status s = Emulate(2, 64, [&] {
    example::WarpVotes(x.data(), n, ballots.data(), any.data(), all.data());
  });
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(ballots, (std::vector<uint32_t>{0xffffffffu, 0xaaaaaaaau, 0, 0xf}));
  EXPECT_EQ(any, (std::vector<int>{1, 1, 0, 1}));
  EXPECT_EQ(all, (std::vector<int>{1, 0, 0, 1}));
}

TEST(EmulateTest, ShflUpScansEachWarp) {
  const int n = 70;
  std::vector<int> x(n), out(n, -1);
  for (int i = 0; i < n; ++i) x[i] = i * i % 7 - 3;
  const absl::Status s = Emulate(
      2, 64, [&] { example::WarpInclusiveScan(x.data(), out.data(), n); });
  ASSERT_TRUE(s.ok()) << s;
  int sum = 0;
  for (int i = 0; i < n; ++i) {
    sum = (i % kWarpSize == 0 ? 0 : sum) + x[i];
    EXPECT_EQ(out[i], sum) << i;
  }
}

// out[4 t ..] = Shfl(t, 5), ShflXor(t, 3), ShflDown(t, 4), ShflUp(t, 31).
SIMT_GLOBAL void Shuffles(int* out) {
  const int t = static_cast<int>(ThreadIdx().x);
  out[4 * t] = Shfl(t, 5);
  out[4 * t + 1] = ShflXor(t, 3);
  out[4 * t + 2] = ShflDown(t, 4);
  out[4 * t + 3] = ShflUp(t, 31);
}

TEST(EmulateTest, ShufflesReadTheirSourceLaneOrKeepTheirOwnValue) {
  std::vector<int> out(4 * 64);
  ASSERT_TRUE(Emulate(1, 64, [&] { Shuffles(out.data()); }).ok());
  for (int t = 0; t < 64; ++t) {
    const int warp = t / 32 * 32, lane = t % 32;
    EXPECT_EQ(out[4 * t], warp + 5);
    EXPECT_EQ(out[4 * t + 1], warp + (lane ^ 3));
    EXPECT_EQ(out[4 * t + 2], lane + 4 < 32 ? t + 4 : t);
    EXPECT_EQ(out[4 * t + 3], lane == 31 ? warp : t);
  }
}

// out = x reversed through a shared array of T, read through a view at its
// end.
template <typename T>
SIMT_GLOBAL void ReverseThroughView(const T* x, float* out) {
  SIMT_SHARED(T, s, 64);
  const int t = static_cast<int>(ThreadIdx().x);
  s[t] = x[t];
  SyncThreads();
  SharedPtr<T> last = s + 63;
  out[t] = ToFloat(last[-t]);
}

TYPED_TEST(TypedKernelTest, SharedArraysHoldTAndViewsIndexFromTheirOffset) {
  using T = TypeParam;
  std::vector<T> x(64);
  std::vector<float> out(64);
  for (int i = 0; i < 64; ++i) x[i] = FromFloat<T>(static_cast<float>(i));
  const absl::Status s =
      Emulate(1, 64, [&] { ReverseThroughView<T>(x.data(), out.data()); });
  ASSERT_TRUE(s.ok()) << s;
  for (int i = 0; i < 64; ++i) EXPECT_EQ(out[i], 63 - i);
}

// ---------------------------------------------------------------------------
// Violations.

// RowSum without the barrier between storing the partial sums and the
// first reduction step.
SIMT_GLOBAL void RowSumMissingBarrier(const float* x, float* out, int cols) {
  SIMT_SHARED(float, partial, 64);
  const int t = static_cast<int>(ThreadIdx().x);
  float sum = 0.0f;
  for (int c = t; c < cols; c += 64) sum += x[c];
  partial[t] = sum;
  for (int s = 32; s > 0; s >>= 1) {
    if (t < s) partial[t] += partial[t + s];
    SyncThreads();
  }
  if (t == 0) out[0] = partial[0];
}

TEST(ViolationTest, MissingBarrierIsReportedAsARace) {
  const std::vector<float> x(100, 1.0f);
  float out = 0;
  const absl::Status s =
      Emulate(1, 64, [&] { RowSumMissingBarrier(x.data(), &out, 100); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("block (0,0,0)"),
                    HasSubstr("shared-memory race on partial["),
                    HasSubstr("simt_test.cc"), HasSubstr("epoch 0"),
                    HasSubstr("no SyncThreads() between them")));
}

SIMT_GLOBAL void TwoWriters() {
  SIMT_SHARED(int, s, 1);
  if (ThreadIdx().x < 2) s[0] = static_cast<int>(ThreadIdx().x);
}

TEST(ViolationTest, TwoWritesInOneEpochAreARace) {
  const absl::Status s = Emulate(1, 32, [] { TwoWriters(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("race on s[0]"), HasSubstr("wrote it and"),
                    HasSubstr(" wrote it with no SyncThreads()")));
}

SIMT_GLOBAL void ReadBeforeWrite(float* out) {
  SIMT_SHARED(float, s, 32);
  const int t = static_cast<int>(ThreadIdx().x);
  if (t == 0) out[0] = s[5];
  SyncThreads();
  s[t] = 1.0f;
}

TEST(ViolationTest, ReadingNeverWrittenSharedMemoryIsReported) {
  float out = 0;
  const absl::Status s = Emulate(1, 32, [&] { ReadBeforeWrite(&out); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("read of s[5]"),
                    HasSubstr("never written in this block (poisoned)"),
                    HasSubstr("thread (0,0,0)"), HasSubstr("epoch 0")));
  EXPECT_TRUE(std::isnan(out));  // poisoned storage reads as NaN
}

SIMT_GLOBAL void WriteOneTooFar() {
  SIMT_SHARED(float, s, 64);
  s[ThreadIdx().x + 1] = 1.0f;
}

TEST(ViolationTest, OutOfBoundsSharedIndexIsReported) {
  const absl::Status s = Emulate(1, 64, [] { WriteOneTooFar(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("out-of-bounds shared index"),
                    HasSubstr("thread (63,0,0) wrote s[64] of 64 elements")));
}

SIMT_GLOBAL void BarrierInHalfAWarp() {
  if (ThreadIdx().x < 16) SyncThreads();
}

TEST(ViolationTest, BarrierReachedByPartOfTheBlockIsReportedNotAHang) {
  const auto start = std::chrono::steady_clock::now();
  const absl::Status s = Emulate(1, 64, [] { BarrierInHalfAWarp(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("divergent SyncThreads() at "),
                                 HasSubstr("simt_test.cc:")));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
}

SIMT_GLOBAL void TwoDifferentBarriers() {
  if (ThreadIdx().x < 32) {
    SyncThreads();
  } else {
    SyncThreads();
  }
}

TEST(ViolationTest, ThreadsAtDifferentBarriersAreReported) {
  const absl::Status s = Emulate(1, 64, [] { TwoDifferentBarriers(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("divergent SyncThreads(): thread ("));
}

SIMT_GLOBAL void ShflXorInHalfAWarp(float* out) {
  float v = static_cast<float>(ThreadIdx().x);
  if (LaneId() < 16) v += ShflXor(v, 8);
  out[ThreadIdx().x] = v;
}

TEST(ViolationTest, WarpOpReachedByHalfAWarpIsReportedNotAHang) {
  std::vector<float> out(32);
  const absl::Status s =
      Emulate(1, 32, [&] { ShflXorInHalfAWarp(out.data()); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(
      s.message(),
      AllOf(HasSubstr("warp op ShflXor at "), HasSubstr("simt_test.cc:"),
            HasSubstr("not reached by all 32 lanes of warp 0")));
}

SIMT_GLOBAL void HalfShuffleHalfBarrier() {
  float v = 1.0f;
  if (LaneId() < 16) {
    v = ShflXor(v, 1);
  } else {
    SyncThreads();
  }
}

TEST(ViolationTest, LanesSplitBetweenAWarpOpAndABarrierAreReported) {
  const absl::Status s = Emulate(1, 32, [] { HalfShuffleHalfBarrier(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("not reached by all 32 lanes of warp 0"),
                    HasSubstr("SyncThreads()")));
}

SIMT_GLOBAL void VoteInPartialWarp() { Any(true); }

TEST(ViolationTest, WarpOpsInAPartialWarpAreReported) {
  const absl::Status s = Emulate(1, 48, [] { VoteInPartialWarp(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("warp op Any at "),
                                 HasSubstr("has only 16 threads")));
}

// Block 2 reads past the end of its shared array.
SIMT_GLOBAL void FailInBlockTwo(int* visited) {
  SIMT_SHARED(int, s, 32);
  const unsigned t = ThreadIdx().x;
  s[t] = 0;
  if (BlockIdx().x == 2 && t == 0) s[32] = 1;
  if (t == 0) visited[BlockIdx().x] = 1;
}

TEST(ViolationTest, ReportNamesTheBlockAndLaterBlocksDoNotRun) {
  std::vector<int> visited(4, 0);
  const absl::Status s =
      Emulate(4, 32, [&] { FailInBlockTwo(visited.data()); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("block (2,0,0) of grid (4,1,1)"));
  EXPECT_EQ(visited, (std::vector<int>{1, 1, 1, 0}));
}

TEST(ViolationTest, AFailedLaunchLeavesTheNextOneClean) {
  ASSERT_FALSE(Emulate(1, 64, [] { WriteOneTooFar(); }).ok());
  const std::vector<float> x(64, 1.0f);
  std::vector<float> out(1);
  EXPECT_TRUE(Emulate(1, example::kRowSumThreads, [&] {
                example::RowSum<float>(x.data(), out.data(), 1, 64);
              }).ok());
  EXPECT_EQ(out[0], 64.0f);
}

}  // namespace
}  // namespace pipeserve::simt
