#include "runtime/cpu/bf16_reference.h"

#include <cmath>
#include <cstring>

#include "gtest/gtest.h"

namespace pipeserve {

std::vector<uint16_t> RandomBf16(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (uint16_t& x : v) {
    const float f = d(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    x = static_cast<uint16_t>(u >> 16);  // truncation is enough for test inputs
  }
  return v;
}

double Bf16ToDouble(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void ExpectProductOf(int m, int n, int k, const std::vector<uint16_t>& a,
                     const std::vector<uint16_t>& b, const uint16_t* bias,
                     const std::vector<uint16_t>& c) {
  int wrong = 0;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n && wrong < 10; ++j) {
      double ref = bias != nullptr ? Bf16ToDouble(bias[j]) : 0.0, scale = std::abs(ref);
      for (int p = 0; p < k; ++p) {
        const double x = Bf16ToDouble(a[i * k + p]) * Bf16ToDouble(b[j * k + p]);
        ref += x;
        scale += std::abs(x);
      }
      const double got = Bf16ToDouble(c[i * n + j]);
      const double allowed = std::ldexp(std::abs(ref), -8) + 1e-6 * scale;
      if (!(std::abs(got - ref) <= allowed)) ++wrong;
      EXPECT_NEAR(got, ref, allowed) << "row " << i << " output " << j;
    }
  }
}

}  // namespace pipeserve
