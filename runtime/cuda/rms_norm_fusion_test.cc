// Llama's RMSNorm written out (pow, mean, add, rsqrt, mul, mul by the
// weight) on the CUDA lowering: one kernel when the unconfirmed kernels
// are allowed, whichever side the weight is on, with or without a weight;
// kept apart when an intermediate has another reader; and the same values
// as the CPU backend's op-by-op run, on the device emulator. The residual
// add before a norm (RMSNorm or layer_norm) joins the norm's kernel.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/cuda/device_plan.h"
#include "runtime/cuda/emulator_vs_cpu.h"
#include "runtime/random_tensor.h"

namespace pipeserve {
namespace {

std::vector<DeviceOp::Type> Compute(const DevicePlan& plan) {
  std::vector<DeviceOp::Type> t;
  for (size_t i = plan.compute_begin; i < plan.compute_end; ++i) t.push_back(plan.ops[i].type);
  return t;
}

// The plan for x [3, 16] (and r [3, 16] when the graph has it), with the
// unconfirmed kernels allowed.
absl::StatusOr<DevicePlan> PlanOf(const Model& m) {
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  if (!stage.ok()) return stage.status();
  return stage->Plan(std::vector<Shape>(m.graph.inputs_size(), Shape{3, 16}));
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
  const Tensor x = RandomTensor({5, 16}, 9);
  for (int64_t weight_len : {16, 1}) {
    for (bool rsqrt_out : {false, true}) {
      absl::StatusOr<std::vector<double>> d = EmulatorVsCpu(
          RmsNormGraph(true, rsqrt_out, weight_len, /*two_to_the_x=*/rsqrt_out), {x});
      ASSERT_TRUE(d.ok()) << d.status();
      EXPECT_LE((*d)[0], 1e-6) << "weight [" << weight_len << "], rsqrt out " << rsqrt_out;
    }
  }
}

// A transformer's residual stream around a norm: h = x + r, y = norm(h),
// z = h + y (the next residual add), as RMSNorm written out or as
// layer_norm. `early_reader` also computes h * h before the norm (a
// reader the fused kernel would be too late for); `broadcast_r` makes r a
// [16] row, which the norm's kernel does not index.
// `reshaped_r` makes r a reshape of a [-1, 32] input: the same [-1, 16] to
// the graph, but twice x's rows when the plan is made (the sum broadcasts).
Model ResidualGraph(bool rms, bool early_reader = false, bool broadcast_r = false,
                    bool reshaped_r = false) {
  GraphBuilder b;
  b.Input("x", {-1, 16}).Param("w", {16});
  if (reshaped_r) {
    b.Input("t", {-1, 32}).Op("reshape", {"t"}, "r", "", {{"shape", AttrInts({-1, 16})}});
  } else {
    b.Input("r", broadcast_r ? Shape{16} : Shape{-1, 16});
  }
  b.Op("add", {"x", "r"}, "h");
  if (early_reader) b.Op("mul", {"h", "h"}, "sq");
  if (rms) {
    b.Op("pow", {"h"}, "p", "", {{"scalar", AttrF(2)}})
        .Op("mean", {"p"}, "m", "", {{"dims", AttrInts({-1})}, {"keepdim", AttrI(1)}})
        .Op("add", {"m"}, "a", "", {{"scalar", AttrF(1e-6)}})
        .Op("rsqrt", {"a"}, "rs")
        .Op("mul", {"h", "rs"}, "n")
        .Op("mul", {"n", "w"}, "y");
  } else {
    b.Param("bias", {16}).Op("layer_norm", {"h", "w", "bias"}, "y", "",
                             {{"ndim", AttrI(1)}, {"eps", AttrF(1e-5)}, {"has_weight", AttrI(1)},
                              {"has_bias", AttrI(1)}});
  }
  b.Op("add", {"h", "y"}, "z").Output("z").Output("y");
  if (early_reader) b.Output("sq");
  return b.Build();
}

// The add before either norm is no kernel of its own: the norm's kernel
// reads x and r and writes h, which the next add reads. A reader of h
// before the norm, or a broadcast r, keeps the add a kernel.
TEST(DevicePlanTest, TheResidualAddBeforeANormJoinsItsKernel) {
  for (bool rms : {true, false}) {
    const DeviceOp::Type norm = rms ? DeviceOp::Type::kRmsNorm : DeviceOp::Type::kLayerNorm;
    absl::StatusOr<DevicePlan> plan = PlanOf(ResidualGraph(rms));
    ASSERT_TRUE(plan.ok()) << plan.status();
    const std::vector<DeviceOp::Type> ops = Compute(*plan);
    ASSERT_EQ(ops.size(), 2u) << rms;  // the norm, then h + y
    EXPECT_EQ(ops[0], norm);
    const DeviceOp& op = plan->ops[plan->compute_begin];
    EXPECT_TRUE(op.has_residual);
    EXPECT_TRUE(op.has_weight);
    // x, r (both as copied in: one merged copy) and h: three buffers
    EXPECT_EQ(plan->ops[0].type, DeviceOp::Type::kCopyIn);
    EXPECT_EQ(op.src.offset, plan->ops[0].dst.offset);
    EXPECT_EQ(op.src4.offset, plan->ops[0].dst.offset + 256);
    EXPECT_NE(op.residual_sum.offset, op.src.offset);
    EXPECT_NE(op.residual_sum.offset, op.src4.offset);
    const DeviceOp& next = plan->ops[plan->compute_begin + 1];
    EXPECT_TRUE(next.src.offset == op.residual_sum.offset ||
                next.src2.offset == op.residual_sum.offset);  // z reads the h the norm wrote
    for (const Model& m : {ResidualGraph(rms, true), ResidualGraph(rms, false, true)}) {
      absl::StatusOr<DevicePlan> apart = PlanOf(m);
      ASSERT_TRUE(apart.ok()) << apart.status();
      for (size_t i = apart->compute_begin; i < apart->compute_end; ++i) {
        EXPECT_FALSE(apart->ops[i].has_residual) << rms;
      }
      EXPECT_GE(Compute(*apart).size(), 3u) << rms;  // the add, the norm, h + y
    }
  }
}

TEST(RmsNormFusion, ResidualNormsOnTheEmulatorMatchTheCpuBackend) {
  const Tensor x = RandomTensor({5, 16}, 9), r = RandomTensor({5, 16}, 10);
  for (bool rms : {true, false}) {
    for (bool early_reader : {false, true}) {
      absl::StatusOr<std::vector<double>> d = EmulatorVsCpu(ResidualGraph(rms, early_reader), {x, r});
      ASSERT_TRUE(d.ok()) << d.status();
      for (size_t k = 0; k < d->size(); ++k) {
        EXPECT_LE((*d)[k], 1e-6) << "rms " << rms << ", early reader " << early_reader
                                 << ", output " << k;
      }
    }
  }
}

// x [1, 16] + r [2, 16] (a reshape of [1, 32]): the graph's shapes allow
// the fusion, these do not (the sum broadcasts), so this plan runs the add
// and the norm reads its sum; the values are the CPU backend's.
TEST(RmsNormFusion, AResidualThatBroadcastsAtRunTimeRunsTheAdd) {
  const Tensor x = RandomTensor({1, 16}, 9), t = RandomTensor({1, 32}, 10);
  for (bool rms : {true, false}) {
    Model m = ResidualGraph(rms, false, false, /*reshaped_r=*/true);
    absl::StatusOr<LoweredStage> stage =
        LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
    ASSERT_TRUE(stage.ok()) << stage.status();
    absl::StatusOr<DevicePlan> same = stage->Plan({{2, 16}, {1, 32}});  // x and r [2, 16]
    absl::StatusOr<DevicePlan> broadcast = stage->Plan({{1, 16}, {1, 32}});
    ASSERT_TRUE(same.ok()) << same.status();
    ASSERT_TRUE(broadcast.ok()) << broadcast.status();
    auto residual_norms = [](const DevicePlan& p) {
      int n = 0;
      for (size_t i = p.compute_begin; i < p.compute_end; ++i) n += p.ops[i].has_residual;
      return n;
    };
    EXPECT_EQ(residual_norms(*same), 1);
    EXPECT_EQ(residual_norms(*broadcast), 0);
    absl::StatusOr<std::vector<double>> d = EmulatorVsCpu(m, {x, t});
    ASSERT_TRUE(d.ok()) << d.status();
    for (size_t k = 0; k < d->size(); ++k) {
      EXPECT_LE((*d)[k], 1e-6) << "rms " << rms << ", output " << k;
    }
  }
}

}  // namespace
}  // namespace pipeserve
