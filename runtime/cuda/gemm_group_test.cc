// Linear layers on one input with weights of one shape (Llama's k and v
// projections, gate and up) run as one strided-batched GEMM when the
// unconfirmed kernels are allowed: the plan's batch and strides, what
// keeps layers apart (another shape, a bias, outputs needing other forms),
// and the emulator's values against the CPU backend in float32 and with
// bfloat16 GEMMs.
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

// x [-1, 24] through k and v [16, 24] and q [32, 24]; `v_into_gemm` feeds v
// only to another linear (so in bfloat16 its output needs another form
// than k's), `biased_v` gives v a bias.
Model ProjectionGraph(bool v_into_gemm = false, bool biased_v = false) {
  GraphBuilder b;
  b.Input("x", {-1, 24}).Param("q.weight", {32, 24}).Param("k.weight", {16, 24});
  b.Param("v.weight", {16, 24}).Param("v.bias", {16}).Param("o.weight", {8, 16});
  b.Op("linear", {"x", "k.weight"}, "k", "k")
      .Op("linear", {"x", "q.weight"}, "q", "q")
      .Op("linear", biased_v ? std::vector<std::string>{"x", "v.weight", "v.bias"}
                             : std::vector<std::string>{"x", "v.weight"},
          "v", "v")
      .Op("tanh", {"k"}, "k_out");
  if (v_into_gemm) {
    b.Op("linear", {"v", "o.weight"}, "o", "o").Output("o");
  } else {
    b.Op("tanh", {"v"}, "v_out").Output("v_out");
  }
  b.Output("k_out").Output("q");
  return b.Build();
}

std::vector<DeviceOp> Gemms(const Model& m, Precision p) {
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, p, true, CudaOps::kUnconfirmed);
  EXPECT_TRUE(stage.ok()) << stage.status();
  if (!stage.ok()) return {};
  absl::StatusOr<DevicePlan> plan = stage->Plan({{5, 24}});
  EXPECT_TRUE(plan.ok()) << plan.status();
  std::vector<DeviceOp> gemms;
  for (const DeviceOp& op : plan->ops) {
    if (op.type == DeviceOp::Type::kGemm) gemms.push_back(op);
  }
  return gemms;
}

TEST(GemmGroupTest, LinearsOnOneInputWithWeightsOfOneShapeAreOneBatchedGemm) {
  for (Precision p : {Precision::kFloat32, Precision::kBF16}) {
    const std::vector<DeviceOp> gemms = Gemms(ProjectionGraph(), p);
    ASSERT_EQ(gemms.size(), 2u);  // k and v together, then q
    const GemmOp& kv = gemms[0].gemm;
    EXPECT_EQ(gemms[0].node, "k");
    EXPECT_EQ(kv.batch, 2);
    EXPECT_EQ(kv.stride_b, 0);  // one x
    EXPECT_GE(kv.stride_a, 16 * 24);
    EXPECT_GE(kv.stride_d, 5 * 16);
    EXPECT_EQ(gemms[1].node, "q");
    EXPECT_EQ(gemms[1].gemm.batch, 1);
  }
  // A bias, or (with bfloat16 GEMMs) an output only a GEMM reads next to
  // one an elementwise op reads, keeps them apart.
  EXPECT_EQ(Gemms(ProjectionGraph(false, true), Precision::kFloat32).size(), 3u);
  EXPECT_EQ(Gemms(ProjectionGraph(true), Precision::kBF16).size(), 4u);
  EXPECT_EQ(Gemms(ProjectionGraph(true), Precision::kFloat32).size(), 3u);  // k, v grouped; o
}

TEST(GemmGroupTest, TheEmulatorMatchesTheCpuBackend) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  const Tensor x = RandomTensor({5, 24}, 3);
  for (Precision p : {Precision::kFloat32, Precision::kBF16}) {
    std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(p);
    for (bool v_into_gemm : {false, true}) {
      Model m = ProjectionGraph(v_into_gemm);
      auto want = cpu->Compile(m.graph, m.weights);
      auto got = emulator->Compile(m.graph, m.weights);
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_TRUE(got.ok()) << got.status();
      absl::StatusOr<std::vector<Tensor>> a = (*want)->Run({x}), b = (*got)->Run({x});
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      for (size_t k = 0; k < a->size(); ++k) {
        EXPECT_LE(MaxRelativeDifference((*b)[k], (*a)[k]), p == Precision::kFloat32 ? 1e-6 : 1e-2)
            << PrecisionName(p) << ", v into a GEMM " << v_into_gemm << ", output " << k;
      }
    }
  }
}

}  // namespace
}  // namespace pipeserve
