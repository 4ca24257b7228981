#include "runtime/cpu/gemv_bf16.h"

#include <omp.h>

#include <cstdlib>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/cpu/bf16_reference.h"

namespace pipeserve {
namespace {

// m rows, n outputs, k columns, bias or not, threads.
class GemvBf16Test : public ::testing::TestWithParam<std::tuple<int, int, int, bool, int>> {};

TEST_P(GemvBf16Test, MatchesAFloat64ReferenceRoundedToBfloat16) {
  if (!CpuHasAvx512Bf16()) GTEST_SKIP() << "this CPU has no AVX512-BF16";
  const auto [m, n, k, with_bias, threads] = GetParam();
  std::mt19937 rng(m * 1000 + n + k);
  const std::vector<uint16_t> a = RandomBf16(m * k, rng), b = RandomBf16(n * k, rng),
                              bias = RandomBf16(n, rng);
  std::vector<uint16_t> c(m * n, 0xffff);
  omp_set_num_threads(threads);
  GemvBf16(m, n, k, a.data(), b.data(), with_bias ? bias.data() : nullptr, c.data());
  ExpectProductOf(m, n, k, a, b, with_bias ? bias.data() : nullptr, c);
}

// k: whole 32-column steps, a tail, and k below one step; n: whole groups
// of 4 rows and not, fewer groups than threads.
INSTANTIATE_TEST_SUITE_P(Shapes, GemvBf16Test,
                         ::testing::Values(std::make_tuple(1, 64, 256, false, 2),
                                           std::make_tuple(1, 37, 70, true, 2),
                                           std::make_tuple(2, 9, 5, true, 1),
                                           std::make_tuple(3, 6, 100, false, 2),
                                           std::make_tuple(4, 130, 2048, true, 2),
                                           std::make_tuple(4, 3, 33, true, 4),
                                           // more rows than it takes at once
                                           std::make_tuple(6, 21, 40, true, 2)));

TEST(GemvBf16Test, GemmTakesItForAFewRowsOnly) {
  if (!CpuHasAvx512Bf16()) GTEST_SKIP() << "this CPU has no AVX512-BF16";
  if (std::getenv("PIPESERVE_GEMV") != nullptr) GTEST_SKIP() << "PIPESERVE_GEMV is set";
  EXPECT_TRUE(GemvBf16Runs(kGemvBf16MaxRows));
  EXPECT_FALSE(GemvBf16Runs(0));
  EXPECT_FALSE(GemvBf16Runs(kGemvBf16MaxRows + 1));
}

TEST(GemvBf16Test, NoColumnsGivesTheBias) {
  if (!CpuHasAvx512Bf16()) GTEST_SKIP() << "this CPU has no AVX512-BF16";
  const std::vector<uint16_t> bias = {0x3fc0, 0xc000};  // 1.5, -2
  std::vector<uint16_t> c(2, 0);
  GemvBf16(1, 2, 0, nullptr, nullptr, bias.data(), c.data());
  EXPECT_EQ(Bf16ToDouble(c[0]), 1.5);
  EXPECT_EQ(Bf16ToDouble(c[1]), -2.0);
}

}  // namespace
}  // namespace pipeserve
