// One kernel source, two machines: example::RowSum on the GPU (nvcc's
// build, LaunchRowSum) gives the emulator's answer for float, half and
// bfloat16 rows. Runs only under --config=cuda with a device; skips
// elsewhere.
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/cuda/simt/example_kernels.h"
#include "runtime/cuda/simt/simt.h"

#if defined(PIPESERVE_SIMT_GPU_TEST)
#include <cuda_runtime_api.h>

#include "runtime/cuda/simt/example_kernels_cuda.h"
#endif

namespace pipeserve::simt {
namespace {

#if defined(PIPESERVE_SIMT_GPU_TEST)

// The emulator's T and the GPU's have the same bits.
template <typename T>
struct DeviceType;
template <>
struct DeviceType<float> {
  using type = float;
};
template <>
struct DeviceType<Half> {
  using type = __half;
};
template <>
struct DeviceType<Bf16> {
  using type = __nv_bfloat16;
};

// The GPU's row sums of x [rows, cols], or an empty vector on a CUDA error.
template <typename T>
std::vector<float> GpuRowSums(const std::vector<T>& x, int rows, int cols) {
  using D = typename DeviceType<T>::type;
  static_assert(sizeof(D) == sizeof(T));
  void* dx = nullptr;
  void* dout = nullptr;
  std::vector<float> out(rows);
  bool ok = cudaMalloc(&dx, x.size() * sizeof(T)) == cudaSuccess &&
            cudaMalloc(&dout, rows * sizeof(float)) == cudaSuccess &&
            cudaMemcpy(dx, x.data(), x.size() * sizeof(T),
                       cudaMemcpyHostToDevice) == cudaSuccess &&
            example::LaunchRowSum<D>(static_cast<const D*>(dx),
                                     static_cast<float*>(dout), rows, cols,
                                     nullptr) == cudaSuccess &&
            cudaMemcpy(out.data(), dout, rows * sizeof(float),
                       cudaMemcpyDeviceToHost) == cudaSuccess;
  cudaFree(dx);
  cudaFree(dout);
  if (!ok) out.clear();
  return out;
}

template <typename T>
class GpuRowSumTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
      GTEST_SKIP() << "no CUDA device";
    }
  }
};
using StorageTypes = ::testing::Types<float, Half, Bf16>;
TYPED_TEST_SUITE(GpuRowSumTest, StorageTypes);

TYPED_TEST(GpuRowSumTest, GpuAgreesWithTheEmulator) {
  using T = TypeParam;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (int cols : {1, 31, 33, 1000}) {
    const int rows = 5;
    std::vector<T> x(rows * cols);
    for (T& v : x) v = FromFloat<T>(dist(rng));
    std::vector<float> emulated(rows);
    ASSERT_TRUE(Emulate(rows, example::kRowSumThreads, [&] {
                  example::RowSum<T>(x.data(), emulated.data(), rows, cols);
                }).ok());
    const std::vector<float> gpu = GpuRowSums(x, rows, cols);
    ASSERT_EQ(gpu.size(), rows) << "CUDA error";
    for (int r = 0; r < rows; ++r) {
      // Same additions in the same order: equal up to FMA contraction.
      EXPECT_NEAR(gpu[r], emulated[r], 1e-5f * cols) << cols << " " << r;
    }
  }
}

#else

TEST(GpuRowSumTest, NeedsConfigCuda) {
  GTEST_SKIP() << "built without --config=cuda";
}

#endif

}  // namespace
}  // namespace pipeserve::simt
