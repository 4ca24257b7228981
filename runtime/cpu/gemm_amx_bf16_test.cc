#include "runtime/cpu/gemm_amx_bf16.h"

#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace pipeserve {
namespace {

uint16_t ToBf16(float f) {  // truncation is enough for test inputs
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

double FromBf16(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::vector<uint16_t> Random(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (uint16_t& x : v) x = ToBf16(d(rng));
  return v;
}

// m rows, n outputs, k columns, bias or not, threads.
class GemmAmxBf16Test : public ::testing::TestWithParam<std::tuple<int, int, int, bool, int>> {};

TEST_P(GemmAmxBf16Test, MatchesAFloat64ReferenceRoundedToBfloat16) {
  if (!CpuHasAmxBf16()) GTEST_SKIP() << "this CPU (or OS) offers no AMX-BF16";
  const auto [m, n, k, with_bias, threads] = GetParam();
  std::mt19937 rng(m * 1000 + n + k);
  const std::vector<uint16_t> a = Random(m * k, rng), b = Random(n * k, rng),
                              bias = Random(n, rng);
  std::vector<uint16_t> c(m * n + 7, 0xffff);  // 7 past the end: never written
  omp_set_num_threads(threads);
  GemmAmxBf16(m, n, k, a.data(), b.data(), with_bias ? bias.data() : nullptr, c.data());
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double ref = with_bias ? FromBf16(bias[j]) : 0.0, scale = std::abs(ref);
      for (int p = 0; p < k; ++p) {
        ref += FromBf16(a[i * k + p]) * FromBf16(b[j * k + p]);
        scale += std::abs(FromBf16(a[i * k + p]) * FromBf16(b[j * k + p]));
      }
      // One bfloat16 rounding of the result, and float32 sums.
      EXPECT_NEAR(FromBf16(c[i * n + j]), ref, std::ldexp(std::abs(ref), -8) + 1e-6 * scale)
          << "row " << i << " output " << j;
    }
  }
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
