// bench/gemv_bf16: bfloat16 products of a few rows (decode steps) by a
// TinyLlama MLP weight (5632 x 2048, 8 of them, far beyond the caches):
// pipeserve's AVX512-BF16 loop (runtime/cpu/gemv_bf16.h) against oneDNN's
// matmul, the same-run baseline, on 2 threads.
//
//   bazel run -c opt //bench:gemv_bf16
//
// Prints GB/s of weights read (median of 5 passes) for 1 to 8, 16 and 32
// rows; the loop runs where it wins (kGemvBf16MaxRows).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/gemv_bf16.h"

namespace {

constexpr int64_t kN = 5632, kK = 2048, kMatrices = 8;

// GB/s of weights read by `pass` (all matrices once), median of 5.
double GbPerS(const std::function<void()>& pass) {
  pass();  // primitives made, pages touched
  std::vector<double> s;
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    pass();
    s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(s.begin(), s.end());
  return kMatrices * kN * kK * 2 / s[2] / 1e9;
}

}  // namespace

int main() {
  setenv("PIPESERVE_GEMV", "onednn", 1);  // GemmBf16 below: oneDNN only
  pipeserve::SetComputeThreads(2);
  std::vector<std::vector<uint16_t>> w(kMatrices, std::vector<uint16_t>(kN * kK));
  for (auto& m : w) {
    for (size_t i = 0; i < m.size(); ++i) m[i] = static_cast<uint16_t>(0x3c00 + i % 97);
  }
  std::vector<uint16_t> x(32 * kK, 0x3f80), y(32 * kN);
  std::printf("%lld matrices of %lld x %lld bf16 weights, 2 threads; GB/s of weights read\n",
              static_cast<long long>(kMatrices), static_cast<long long>(kN),
              static_cast<long long>(kK));
  std::printf("rows  oneDNN matmul  pipeserve GemvBf16\n");
  for (int m : {1, 2, 3, 4, 5, 6, 7, 8, 16, 32}) {
    const double onednn = GbPerS([&] {
      for (auto& wm : w) {
        (void)pipeserve::GemmBf16(true, m, kN, kK, x.data(), wm.data(), nullptr, y.data());
      }
    });
    if (m > pipeserve::kGemvBf16MaxRows || !pipeserve::CpuHasAvx512Bf16()) {
      std::printf("%4d  %13.1f  %18s\n", m, onednn,
                  pipeserve::CpuHasAvx512Bf16() ? "(oneDNN)" : "(no AVX512-BF16)");
      continue;
    }
    const double gemv = GbPerS([&] {
      for (auto& wm : w) pipeserve::GemvBf16(m, kN, kK, x.data(), wm.data(), nullptr, y.data());
    });
    std::printf("%4d  %13.1f  %12.1f (%.2fx)\n", m, onednn, gemv, gemv / onednn);
  }
  return 0;
}
