#include "runtime/cpu/gemv_bf16.h"

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
class GemvBf16Test : public ::testing::TestWithParam<std::tuple<int, int, int, bool, int>> {};

TEST_P(GemvBf16Test, MatchesAFloat64ReferenceRoundedToBfloat16) {
  if (!CpuHasAvx512Bf16()) GTEST_SKIP() << "this CPU has no AVX512-BF16";
  const auto [m, n, k, with_bias, threads] = GetParam();
  std::mt19937 rng(m * 1000 + n + k);
  const std::vector<uint16_t> a = Random(m * k, rng), b = Random(n * k, rng),
                              bias = Random(n, rng);
  std::vector<uint16_t> c(m * n, 0xffff);
  omp_set_num_threads(threads);
  GemvBf16(m, n, k, a.data(), b.data(), with_bias ? bias.data() : nullptr, c.data());
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
  const std::vector<uint16_t> bias = {ToBf16(1.5f), ToBf16(-2.0f)};
  std::vector<uint16_t> c(2, 0);
  GemvBf16(1, 2, 0, nullptr, nullptr, bias.data(), c.data());
  EXPECT_EQ(FromBf16(c[0]), 1.5);
  EXPECT_EQ(FromBf16(c[1]), -2.0);
}

}  // namespace
}  // namespace pipeserve
