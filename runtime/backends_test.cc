// MakeBackend's device strings, and what "auto" and "cuda" do on a machine
// or build without CUDA.
#include "runtime/backends.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "runtime/cuda/cuda_backend.h"

namespace pipeserve {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;

TEST(BackendsTest, CpuIsAlwaysThere) {
  auto b = MakeBackend("cpu", {});
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->Name(), "cpu");
}

TEST(BackendsTest, CpuRefusesReducedPrecision) {
  BackendOptions o;
  o.precision = Precision::kBF16;
  auto b = MakeBackend("cpu", o);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(b.status().message()),
              HasSubstr("fp32 only, not bf16"));
}

TEST(BackendsTest, UnknownDeviceStringsAreInvalidArguments) {
  for (const char* d : {"gpu", "cuda:", "cuda:x", "cuda:-1", ""}) {
    auto b = MakeBackend(d, {});
    ASSERT_FALSE(b.ok()) << d;
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument) << d;
  }
}

TEST(BackendsTest, AutoPicksCudaWhenUsableElseCpu) {
  auto b = MakeBackend("auto", {});
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ((*b)->Name(), CudaDeviceCount().ok() ? "cuda:0" : "cpu");
}

TEST(BackendsTest, CudaWithoutCudaFailsWithTheReason) {
  if (CudaDeviceCount().ok()) GTEST_SKIP() << "this machine has a CUDA device";
  for (const char* d : {"cuda", "cuda:0"}) {
    auto b = MakeBackend(d, {});
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(
        std::string(b.status().message()),
        AnyOf(HasSubstr(
                  "this build has no CUDA support (build with --config=cuda)"),
              HasSubstr("no CUDA device: cudaGetDeviceCount")));
  }
}

TEST(BackendsTest, CudaDeviceThatDoesNotExistFails) {
  auto b = MakeBackend("cuda:99", {});
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
  if (CudaDeviceCount().ok()) {
    EXPECT_THAT(std::string(b.status().message()),
                HasSubstr("CUDA device 99 does not exist"));
  }
}

}  // namespace
}  // namespace pipeserve
