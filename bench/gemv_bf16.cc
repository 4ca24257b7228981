// bench/gemv_bf16: bfloat16 products of the rows of a decode step (one per
// sequence) by a TinyLlama MLP weight (5632 x 2048, 8 of them, far beyond
// the caches): pipeserve's AVX512-BF16 loop (runtime/cpu/gemv_bf16.h) and
// AMX tiles (runtime/cpu/gemm_amx_bf16.h) against oneDNN's matmul, the
// same-run baseline, on 2 threads.
//
//   bazel run -c opt //bench:gemv_bf16
//
// Prints GB/s of weights read (median of 5 passes) for 1 to 256 rows;
// GemmBf16 takes each where it wins (kGemvBf16MaxRows, kAmxBf16MinRows to
// kAmxBf16MaxRows).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/gemm_amx_bf16.h"
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
  std::vector<uint16_t> x(256 * kK, 0x3f80), y(256 * kN);
  std::printf("%lld matrices of %lld x %lld bf16 weights, 2 threads; GB/s of weights read\n",
              static_cast<long long>(kMatrices), static_cast<long long>(kN),
              static_cast<long long>(kK));
  const bool gemv = pipeserve::CpuHasAvx512Bf16(), amx = pipeserve::CpuHasAmxBf16();
  std::printf("rows  oneDNN matmul  pipeserve GemvBf16  pipeserve AMX tiles\n");
  auto cell = [](bool runs, double v, double base) {
    char buf[32];
    if (!runs) return std::string("-");
    std::snprintf(buf, sizeof buf, "%.1f (%.2fx)", v, v / base);
    return std::string(buf);
  };
  for (int m : {1, 2, 4, 5, 8, 16, 32, 48, 64, 256}) {
    const double onednn = GbPerS([&] {
      for (auto& wm : w) {
        (void)pipeserve::GemmBf16(true, m, kN, kK, x.data(), wm.data(), nullptr, y.data());
      }
    });
    const bool gemv_runs = gemv && m <= pipeserve::kGemvBf16MaxRows;
    const double g = !gemv_runs ? 0 : GbPerS([&] {
      for (auto& wm : w) pipeserve::GemvBf16(m, kN, kK, x.data(), wm.data(), nullptr, y.data());
    });
    const double t = !amx ? 0 : GbPerS([&] {
      for (auto& wm : w) {
        pipeserve::GemmAmxBf16(m, kN, kK, x.data(), wm.data(), nullptr, y.data());
      }
    });
    std::printf("%4d  %13.1f  %18s  %19s\n", m, onednn, cell(gemv_runs, g, onednn).c_str(),
                cell(amx, t, onednn).c_str());
  }
  if (!gemv) std::printf("(no AVX512-BF16 on this CPU)\n");
  if (!amx) std::printf("(no AMX-BF16 on this CPU, or the OS does not allow it)\n");
  return 0;
}
