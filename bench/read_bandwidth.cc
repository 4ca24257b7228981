// bench/read_bandwidth: how fast N threads read memory, the ceiling of a
// decode step that streams the weights (bench/generation.py divides the
// bytes read per token by it).
//
//   bazel run -c opt //bench:read_bandwidth -- [--threads 2] [--mib 1024]
//
// Each thread sums its contiguous share of a buffer far larger than the
// caches, 64 bytes per load with 8 accumulators (so the adds never limit
// it); prints the median GB/s of 7 passes, as one number.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace {

#if defined(__GNUC__)
#define PIPESERVE_WIDE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PIPESERVE_WIDE
#endif

// The sum of n 64-bit words, 8 independent lanes.
PIPESERVE_WIDE uint64_t Sum(const uint64_t* p, int64_t n) {
  uint64_t lane[8] = {};
  for (int64_t i = 0; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lane[j] += p[i + j];
  }
  uint64_t s = 0;
  for (uint64_t x : lane) s += x;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2;
  int64_t mib = 1024;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--threads") == 0) threads = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--mib") == 0) mib = std::atoll(argv[i + 1]);
  }
  const int64_t words = mib * (1 << 20) / 8;
  std::unique_ptr<uint64_t[]> buf(new uint64_t[words]);
#pragma omp parallel for num_threads(threads)
  for (int64_t i = 0; i < words; ++i) buf[i] = i;  // touched by the threads that read it
  std::vector<double> seconds;
  uint64_t sink = 0;
  for (int pass = 0; pass < 7; ++pass) {
    const auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t from = words * t / nt, to = words * (t + 1) / nt;
      sink += Sum(buf.get() + from, to - from);
    }
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
                          .count());
  }
  std::sort(seconds.begin(), seconds.end());
  std::printf("%.2f\n", static_cast<double>(words) * 8 / seconds[3] / 1e9);
  return sink == 42 ? 1 : 0;  // keeps the sums
}
