// Test helpers for bfloat16 products: random bfloat16 inputs, and a check
// of c = a @ b^T + bias against a float64 reference, allowing one
// bfloat16 rounding of the result and float32 sums.
//
//   std::mt19937 rng(1);
//   std::vector<uint16_t> a = RandomBf16(m * k, rng), b = RandomBf16(n * k, rng);
//   GemvBf16(m, n, k, a.data(), b.data(), nullptr, c.data());
//   ExpectProductOf(m, n, k, a, b, nullptr, c);
#ifndef PIPESERVE_RUNTIME_CPU_BF16_REFERENCE_H_
#define PIPESERVE_RUNTIME_CPU_BF16_REFERENCE_H_

#include <cstdint>
#include <random>
#include <vector>

namespace pipeserve {

// n bfloat16 bit patterns of normally distributed values.
std::vector<uint16_t> RandomBf16(size_t n, std::mt19937& rng);

double Bf16ToDouble(uint16_t h);

// Expects c [m, n] to be a [m, k] @ b^T ([n, k]) + bias [n] (bias may be
// null), naming the first rows and outputs that are not.
void ExpectProductOf(int m, int n, int k, const std::vector<uint16_t>& a,
                     const std::vector<uint16_t>& b, const uint16_t* bias,
                     const std::vector<uint16_t>& c);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CPU_BF16_REFERENCE_H_
