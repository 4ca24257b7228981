#include "runtime/cpu/cpu_kernels.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace pipeserve {
namespace {

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Naive reference: c = a [m,k] @ (trans_b ? b^T : b), accumulated in double.
// `abs_sum` (if given) gets sum_p |a_ip * b_pj|, the scale of the rounding
// error a float32 GEMM may make.
std::vector<float> NaiveGemm(bool trans_b, int m, int n, int k,
                             const std::vector<float>& a,
                             const std::vector<float>& b,
                             std::vector<double>* abs_sum = nullptr) {
  std::vector<float> c(m * n);
  if (abs_sum) abs_sum->assign(m * n, 0.0);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double acc = 0, mag = 0;
      for (int p = 0; p < k; ++p) {
        double t = double(a[i * k + p]) * (trans_b ? b[j * k + p] : b[p * n + j]);
        acc += t;
        mag += std::fabs(t);
      }
      c[i * n + j] = static_cast<float>(acc);
      if (abs_sum) (*abs_sum)[i * n + j] = mag;
    }
  }
  return c;
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want,
                 double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], tol * (1 + std::fabs(want[i]))) << "at " << i;
  }
}

class GemmTest : public ::testing::TestWithParam<std::tuple<int, int, int, bool>> {};

TEST_P(GemmTest, MatchesNaiveReference) {
  auto [m, n, k, trans_b] = GetParam();
  std::vector<float> a = Random(m * k, 1), b = Random(k * n, 2);
  std::vector<float> c(m * n, std::numeric_limits<float>::quiet_NaN());
  ASSERT_TRUE(Gemm(trans_b, m, n, k, a.data(), b.data(), 0.0f, c.data()).ok());
  std::vector<double> mag;
  std::vector<float> want = NaiveGemm(trans_b, m, n, k, a, b, &mag);
  // Every element written (NaN poison gone) and within 1e-5 of its scale.
  for (size_t i = 0; i < c.size(); ++i) {
    ASSERT_LE(std::fabs(c[i] - want[i]), 1e-5 * mag[i] + 1e-7) << "at " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GemmTest,
    ::testing::Values(std::make_tuple(1, 1, 1, false),
                      std::make_tuple(16, 512, 512, false),
                      std::make_tuple(16, 512, 512, true),
                      std::make_tuple(7, 13, 5, false),
                      std::make_tuple(7, 13, 5, true),
                      std::make_tuple(33, 17, 64, true)));

TEST(GemmTest, BetaOneAccumulates) {
  std::vector<float> a = Random(4 * 3, 3), b = Random(3 * 5, 4);
  std::vector<float> c(20, 1.0f);
  ASSERT_TRUE(Gemm(false, 4, 5, 3, a.data(), b.data(), 1.0f, c.data()).ok());
  std::vector<float> want = NaiveGemm(false, 4, 5, 3, a, b);
  for (float& w : want) w += 1.0f;
  ExpectClose(c, want, 1e-5);
}

TEST(LinearTest, BiasAndFusedReluMatchReference) {
  const int m = 9, n = 6, k = 10;
  std::vector<float> x = Random(m * k, 5), w = Random(n * k, 6), bias = Random(n, 7);
  std::vector<float> y(m * n);
  ASSERT_TRUE(LinearForward(x.data(), w.data(), bias.data(), m, n, k, y.data(),
                            /*relu=*/true)
                  .ok());
  std::vector<float> want = NaiveGemm(true, m, n, k, x, w);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      float v = want[i * n + j] + bias[j];
      want[i * n + j] = v < 0 ? 0 : v;
    }
  }
  ExpectClose(y, want, 1e-5);
}

TEST(BinaryTest, RowBroadcastAddsBiasToEveryRow) {
  std::vector<float> a = Random(3 * 4, 8), b = Random(4, 9), out(12);
  BinaryBroadcast(BinaryOp::kAdd, a.data(), {3, 4}, b.data(), {4}, out.data(), {3, 4});
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) EXPECT_FLOAT_EQ(out[i * 4 + j], a[i * 4 + j] + b[j]);
}

TEST(BinaryTest, ColumnBroadcastAndLeftOperandBroadcast) {
  std::vector<float> a = Random(3, 10), b = Random(3 * 4, 11), out(12);
  // a [3,1] - b [3,4]
  BinaryBroadcast(BinaryOp::kSub, a.data(), {3, 1}, b.data(), {3, 4}, out.data(), {3, 4});
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) EXPECT_FLOAT_EQ(out[i * 4 + j], a[i] - b[i * 4 + j]);
}

TEST(BinaryTest, RankThreeTimesMiddleBroadcast) {
  // a [2,3,4] * b [3,1]
  std::vector<float> a = Random(24, 12), b = Random(3, 13), out(24);
  BinaryBroadcast(BinaryOp::kMul, a.data(), {2, 3, 4}, b.data(), {3, 1}, out.data(),
                  {2, 3, 4});
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 4; ++k)
        EXPECT_FLOAT_EQ(out[(i * 3 + j) * 4 + k], a[(i * 3 + j) * 4 + k] * b[j]);
}

TEST(BinaryTest, BothSidesBroadcastToOuterProductShape) {
  // a [3,1] + b [1,4] -> [3,4]
  std::vector<float> a = Random(3, 14), b = Random(4, 15), out(12);
  BinaryBroadcast(BinaryOp::kAdd, a.data(), {3, 1}, b.data(), {1, 4}, out.data(), {3, 4});
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) EXPECT_FLOAT_EQ(out[i * 4 + j], a[i] + b[j]);
}

TEST(BinaryTest, ScalarOperandOnEitherSide) {
  std::vector<float> x = {1, 2, -3}, out(3);
  BinaryScalar(BinaryOp::kSub, x.data(), 1.5f, /*reverse=*/false, 3, out.data());
  EXPECT_EQ(out, (std::vector<float>{-0.5f, 0.5f, -4.5f}));
  BinaryScalar(BinaryOp::kSub, x.data(), 1.5f, /*reverse=*/true, 3, out.data());
  EXPECT_EQ(out, (std::vector<float>{0.5f, -0.5f, 4.5f}));
}

TEST(ReluTest, ClampsNegativesAndKeepsNaN) {
  std::vector<float> x = {-1, 0, 2, std::numeric_limits<float>::quiet_NaN()}, out(4);
  Relu(x.data(), 4, out.data());
  EXPECT_EQ(out[0], 0);
  EXPECT_EQ(out[1], 0);
  EXPECT_EQ(out[2], 2);
  EXPECT_TRUE(std::isnan(out[3]));
}

}  // namespace
}  // namespace pipeserve

namespace pipeserve {
namespace {

TEST(TransposeTest, MatchesIndexSwapOnNonSquareBlocks) {
  const int rows = 45, cols = 70;  // not multiples of the 32 block
  std::vector<float> in = Random(rows * cols, 20), out(rows * cols);
  Transpose(in.data(), rows, cols, out.data());
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) ASSERT_EQ(out[j * rows + i], in[i * cols + j]);
}

TEST(LinearTest, PretransposedWeightGivesTheSameResult) {
  const int m = 5, n = 6, k = 7;
  std::vector<float> x = Random(m * k, 21), w = Random(n * k, 22), b = Random(n, 23);
  std::vector<float> wt(k * n), y1(m * n), y2(m * n);
  Transpose(w.data(), n, k, wt.data());
  ASSERT_TRUE(LinearForward(x.data(), w.data(), b.data(), m, n, k, y1.data(), false).ok());
  ASSERT_TRUE(LinearForward(x.data(), wt.data(), b.data(), m, n, k, y2.data(), false,
                            /*w_transposed=*/true)
                  .ok());
  ExpectClose(y2, y1, 1e-6);
}

}  // namespace
}  // namespace pipeserve
