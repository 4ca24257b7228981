#include "runtime/cuda/kernel_gate.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

TEST(KernelGateTest, TheBuiltInListParsesAndHoldsWhatAnH100Confirmed) {
  ASSERT_FALSE(ConfirmedKernels().empty()) << "gpu_results/confirmed_kernels.txt did not parse";
  EXPECT_TRUE(CheckKernelGate("n", "linear", DT_FLOAT32, CudaOps::kConfirmed).ok());
  EXPECT_TRUE(CheckKernelGate("n", "add", DT_FLOAT32, CudaOps::kConfirmed).ok());
}

TEST(KernelGateTest, AnUnconfirmedKernelIsRefusedByDefaultAndRunsWithTheFlag) {
  const std::vector<KernelConfirmation> confirmed = {{"add", DT_FLOAT32, "x.log"}};
  absl::Status refused =
      CheckKernelGate("ln_1", "layer_norm", DT_BFLOAT16, CudaOps::kConfirmed, confirmed);
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("node \"ln_1\" (layer_norm, bfloat16)"));
  EXPECT_THAT(std::string(refused.message()), HasSubstr("--cuda_ops=unconfirmed"));
  EXPECT_FALSE(CheckKernelGate("a", "add", DT_BFLOAT16, CudaOps::kConfirmed, confirmed).ok())
      << "confirmed per dtype";
  EXPECT_TRUE(CheckKernelGate("a", "add", DT_FLOAT32, CudaOps::kConfirmed, confirmed).ok());
  EXPECT_TRUE(
      CheckKernelGate("ln_1", "layer_norm", DT_BFLOAT16, CudaOps::kUnconfirmed, confirmed).ok());
}

TEST(KernelGateTest, ConfirmationsNeedADtypeAndEvidence) {
  auto ok = ParseConfirmations("# comment\n\nsoftmax bfloat16 h200.log  # trailing\n");
  ASSERT_TRUE(ok.ok()) << ok.status();
  ASSERT_EQ(ok->size(), 1u);
  EXPECT_EQ((*ok)[0].op, "softmax");
  EXPECT_EQ((*ok)[0].dtype, DT_BFLOAT16);
  EXPECT_EQ((*ok)[0].evidence, "h200.log");
  auto no_evidence = ParseConfirmations("softmax bfloat16\n");
  EXPECT_THAT(std::string(no_evidence.status().message()), HasSubstr("line 1"));
  auto bad_dtype = ParseConfirmations("a float32 x\nsoftmax bf17 h.log\n");
  EXPECT_THAT(std::string(bad_dtype.status().message()), HasSubstr("line 2"));
  EXPECT_THAT(std::string(bad_dtype.status().message()), HasSubstr("bf17"));
}

TEST(KernelGateTest, TheFlagTakesTwoValues) {
  EXPECT_EQ(*ParseCudaOps("confirmed"), CudaOps::kConfirmed);
  EXPECT_EQ(*ParseCudaOps("unconfirmed"), CudaOps::kUnconfirmed);
  EXPECT_THAT(std::string(ParseCudaOps("all").status().message()), HasSubstr("--cuda_ops=all"));
}

}  // namespace
}  // namespace pipeserve
