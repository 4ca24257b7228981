#include "runtime/cpu/gemm_amx_bf16.h"

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
class GemmAmxBf16Test : public ::testing::TestWithParam<std::tuple<int, int, int, bool, int>> {};

TEST_P(GemmAmxBf16Test, MatchesAFloat64ReferenceRoundedToBfloat16) {
  if (!CpuHasAmxBf16()) GTEST_SKIP() << "this CPU (or OS) offers no AMX-BF16";
  const auto [m, n, k, with_bias, threads] = GetParam();
  std::mt19937 rng(m * 1000 + n + k);
  const std::vector<uint16_t> a = RandomBf16(m * k, rng), b = RandomBf16(n * k, rng),
                              bias = RandomBf16(n, rng);
  std::vector<uint16_t> c(m * n + 7, 0xffff);  // 7 past the end: never written
  omp_set_num_threads(threads);
  GemmAmxBf16(m, n, k, a.data(), b.data(), with_bias ? bias.data() : nullptr, c.data());
  ExpectProductOf(m, n, k, a, b, with_bias ? bias.data() : nullptr, c);
  for (int e = 0; e < 7; ++e) EXPECT_EQ(c[m * n + e], 0xffff) << "written past the end";
}

// m: below one tile of rows, one, several and a part; n: whole blocks of
// 32 outputs, a tail, fewer outputs than one tile, fewer blocks than
// threads; k: one step of 32 columns and many.
INSTANTIATE_TEST_SUITE_P(Shapes, GemmAmxBf16Test,
                         ::testing::Values(std::make_tuple(5, 64, 32, false, 2),
                                           std::make_tuple(7, 37, 96, true, 2),
                                           std::make_tuple(16, 9, 64, true, 1),
                                           std::make_tuple(32, 130, 2048, true, 2),
                                           std::make_tuple(33, 100, 160, false, 2),
                                           std::make_tuple(64, 45, 256, true, 4),
                                           std::make_tuple(20, 3, 32, true, 4)));

TEST(GemmAmxBf16Test, GemmTakesItForABatchOfRowsWithWholeColumnSteps) {
  if (!CpuHasAmxBf16()) GTEST_SKIP() << "this CPU (or OS) offers no AMX-BF16";
  if (std::getenv("PIPESERVE_GEMV") != nullptr) GTEST_SKIP() << "PIPESERVE_GEMV is set";
  EXPECT_TRUE(AmxBf16Runs(kAmxBf16MinRows, 64));
  EXPECT_TRUE(AmxBf16Runs(kAmxBf16MaxRows, 2048));
  EXPECT_FALSE(AmxBf16Runs(kAmxBf16MinRows - 1, 64));
  EXPECT_FALSE(AmxBf16Runs(kAmxBf16MaxRows + 1, 64));
  EXPECT_FALSE(AmxBf16Runs(32, 70)) << "k not a multiple of 32";
}

}  // namespace
}  // namespace pipeserve
