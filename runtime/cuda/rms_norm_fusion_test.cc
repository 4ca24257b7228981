// Llama's RMSNorm written out (pow, mean, add, rsqrt, mul, mul by the
// weight) on the CUDA lowering: one kernel when the unconfirmed kernels
// are allowed, whichever side the weight is on, with or without a weight;
// kept apart when an intermediate has another reader; and the same values
// as the CPU backend's op-by-op run, on the device emulator.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/conformance/reference.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/device_emulator.h"
#include "runtime/cuda/device_plan.h"
#include "runtime/random_tensor.h"

namespace pipeserve {
namespace {

std::vector<DeviceOp::Type> Compute(const DevicePlan& plan) {
  std::vector<DeviceOp::Type> t;
  for (size_t i = plan.compute_begin; i < plan.compute_end; ++i) t.push_back(plan.ops[i].type);
  return t;
}

// The plan for x [3, 16], with the unconfirmed kernels allowed.
absl::StatusOr<DevicePlan> PlanOf(const Model& m) {
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  if (!stage.ok()) return stage.status();
  return stage->Plan({{3, 16}});
}

// RMSNorm as Llama writes it: `weight_first` puts the weight on the
// left of its mul; `rsqrt_out` also returns the rsqrt (a second reader).
Model RmsNormGraph(bool weight_first, bool rsqrt_out, int64_t weight_len = 16,
                   bool two_to_the_x = false) {
  GraphBuilder b;
  b.Input("x", {-1, 16}).Param("w", {weight_len});
  b.Op("pow", {"x"}, "p", "", {{"scalar", AttrF(2)}, {"reverse", AttrI(two_to_the_x ? 1 : 0)}})
      .Op("mean", {"p"}, "m", "", {{"dims", AttrInts({-1})}, {"keepdim", AttrI(1)}})
      .Op("add", {"m"}, "a", "", {{"scalar", AttrF(1e-6)}})
      .Op("rsqrt", {"a"}, "r")
      .Op("mul", {"x", "r"}, "n")
      .Op("mul", weight_first ? std::vector<std::string>{"w", "n"}
                              : std::vector<std::string>{"n", "w"},
          "y")
      .Output("y");
  if (rsqrt_out) b.Output("r");
  return b.Build();
}

// With the unconfirmed kernels allowed, the six ops run as one RMSNorm
// kernel (the weight on either side); an intermediate with another reader
// keeps them apart, and a weight not of the last dim stays its own mul.
TEST(DevicePlanTest, RmsNormWrittenOutIsOneKernel) {
  for (bool weight_first : {true, false}) {
    absl::StatusOr<DevicePlan> plan = PlanOf(RmsNormGraph(weight_first, false));
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_EQ(Compute(*plan), (std::vector<DeviceOp::Type>{DeviceOp::Type::kRmsNorm}));
    const DeviceOp& op = plan->ops[plan->compute_begin];
    EXPECT_EQ(op.rows, 3);
    EXPECT_EQ(op.cols, 16);
    EXPECT_FLOAT_EQ(op.eps, 1e-6f);
    EXPECT_TRUE(op.has_weight);
  }
  // 2 ** x is not x ** 2; an rsqrt also returned keeps the ops apart.
  for (const Model& m : {RmsNormGraph(false, false, 16, /*two_to_the_x=*/true),
                         RmsNormGraph(false, true)}) {
    absl::StatusOr<DevicePlan> plan = PlanOf(m);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const std::vector<DeviceOp::Type> ops = Compute(*plan);
    EXPECT_EQ(std::count(ops.begin(), ops.end(), DeviceOp::Type::kRmsNorm), 0);
  }
  absl::StatusOr<DevicePlan> plan = PlanOf(RmsNormGraph(false, false, 1));
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(Compute(*plan).front(), DeviceOp::Type::kRmsNorm);
  EXPECT_FALSE(plan->ops[plan->compute_begin].has_weight);
  EXPECT_EQ(Compute(*plan).size(), 2u);  // and the [1] weight's mul
}

TEST(RmsNormFusion, TheEmulatorMatchesTheCpuBackend) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kFloat32);
  const Tensor x = RandomTensor({5, 16}, 9);
  for (int64_t weight_len : {16, 1}) {
    for (bool rsqrt_out : {false, true}) {
      Model m = RmsNormGraph(true, rsqrt_out, weight_len, /*two_to_the_x=*/rsqrt_out);
      auto want = cpu->Compile(m.graph, m.weights);
      auto got = emulator->Compile(m.graph, m.weights);
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_TRUE(got.ok()) << got.status();
      absl::StatusOr<std::vector<Tensor>> a = (*want)->Run({x}), b = (*got)->Run({x});
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      EXPECT_LE(MaxRelativeDifference((*b)[0], (*a)[0]), 1e-6) << "weight [" << weight_len << "], rsqrt out " << rsqrt_out;
    }
  }
}

}  // namespace
}  // namespace pipeserve
