// Linear layers on one input with weights of one shape (Llama's k and v
// projections, gate and up) run as one strided-batched GEMM when the
// unconfirmed kernels are allowed: the plan's batch and strides, what
// keeps layers apart (another shape, a bias, outputs needing other forms,
// an inner dimension of 0), and the emulator's values against the CPU
// backend in float32 and with TF32 and bfloat16 GEMMs.
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/cuda/device_plan.h"
#include "runtime/cuda/emulator_vs_cpu.h"
#include "runtime/random_tensor.h"

namespace pipeserve {
namespace {

struct Variant {
  bool v_into_gemm = false;  // v read only by a linear, k by tanh
  bool both_into_gemms = false;  // k and v each read only by a linear
  bool biased_v = false;
  bool q_like_k = false;     // q [16, K] too: a group of three
  int64_t k = 24;            // the inner dimension
};

// x [-1, K] through k and v [16, K] and q [32, K] (or [16, K]).
Model ProjectionGraph(const Variant& v) {
  GraphBuilder b;
  b.Input("x", {-1, v.k}).Param("q.weight", {v.q_like_k ? 16 : 32, v.k});
  b.Param("k.weight", {16, v.k}).Param("v.weight", {16, v.k}).Param("v.bias", {16});
  b.Param("o.weight", {8, 16}).Param("p.weight", {8, 16});
  b.Op("linear", {"x", "k.weight"}, "k", "k")
      .Op("linear", {"x", "q.weight"}, "q", "q")
      .Op("linear", v.biased_v ? std::vector<std::string>{"x", "v.weight", "v.bias"}
                               : std::vector<std::string>{"x", "v.weight"},
          "v", "v");
  if (v.both_into_gemms) {
    b.Op("linear", {"k", "p.weight"}, "k_out", "p");
  } else {
    b.Op("tanh", {"k"}, "k_out");
  }
  if (v.v_into_gemm || v.both_into_gemms) {
    b.Op("linear", {"v", "o.weight"}, "v_out", "o");
  } else {
    b.Op("tanh", {"v"}, "v_out");
  }
  b.Output("v_out").Output("k_out").Output("q");
  return b.Build();
}

std::vector<DeviceOp> Gemms(const Variant& v, Precision p) {
  const Model m = ProjectionGraph(v);
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, p, true, CudaOps::kUnconfirmed);
  EXPECT_TRUE(stage.ok()) << stage.status();
  if (!stage.ok()) return {};
  absl::StatusOr<DevicePlan> plan = stage->Plan({{5, v.k}});
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return {};
  std::vector<DeviceOp> gemms;
  for (const DeviceOp& op : plan->ops) {
    if (op.type == DeviceOp::Type::kGemm) gemms.push_back(op);
  }
  return gemms;
}

TEST(GemmGroupTest, LinearsOnOneInputWithWeightsOfOneShapeAreOneBatchedGemm) {
  for (Precision p : {Precision::kFloat32, Precision::kBF16}) {
    const std::vector<DeviceOp> gemms = Gemms({}, p);
    ASSERT_EQ(gemms.size(), 2u);  // k and v together, then q
    const GemmOp& kv = gemms[0].gemm;
    EXPECT_EQ(gemms[0].node, "k");
    EXPECT_EQ(kv.batch, 2);
    EXPECT_EQ(kv.stride_b, 0);    // one x
    EXPECT_EQ(kv.stride_a, 384);  // [16, 24] weights, back to back (256-byte aligned)
    EXPECT_EQ(kv.stride_d, 128);  // [5, 16] float32 outputs: 320 bytes, 512 with padding
    EXPECT_EQ(gemms[1].node, "q");
    EXPECT_EQ(gemms[1].gemm.batch, 1);
  }
  // q, k and v of one shape: three in one.
  const std::vector<DeviceOp> qkv = Gemms({.q_like_k = true}, Precision::kFloat32);
  ASSERT_EQ(qkv.size(), 1u);
  EXPECT_EQ(qkv[0].gemm.batch, 3);
  // Outputs only GEMMs read, in bfloat16 precision: written as bfloat16.
  const std::vector<DeviceOp> bf16 = Gemms({.both_into_gemms = true}, Precision::kBF16);
  ASSERT_EQ(bf16.size(), 4u);  // k and v; q; the two readers
  EXPECT_EQ(bf16[0].gemm.batch, 2);
  EXPECT_EQ(bf16[0].gemm.d_type, DType::kBF16);
  EXPECT_EQ(bf16[0].gemm.stride_d, 128);  // 160 bytes, 256 with padding
  // A bias, outputs in different forms, or K = 0 keep them apart.
  EXPECT_EQ(Gemms({.biased_v = true}, Precision::kFloat32).size(), 3u);
  EXPECT_EQ(Gemms({.v_into_gemm = true}, Precision::kBF16).size(), 4u);
  EXPECT_EQ(Gemms({.v_into_gemm = true}, Precision::kFloat32).size(), 3u);  // k and v; q; o
  EXPECT_EQ(Gemms({.k = 0}, Precision::kFloat32).size(), 0u);  // fills, each its own
}

TEST(GemmGroupTest, TheEmulatorMatchesTheCpuBackend) {
  for (Precision p : {Precision::kFloat32, Precision::kTF32, Precision::kBF16}) {
    for (const Variant& v : {Variant{}, Variant{.v_into_gemm = true},
                             Variant{.both_into_gemms = true}, Variant{.q_like_k = true},
                             Variant{.k = 0}}) {
      absl::StatusOr<std::vector<double>> d =
          EmulatorVsCpu(ProjectionGraph(v), {RandomTensor({5, v.k}, 3)}, p);
      ASSERT_TRUE(d.ok()) << d.status();
      for (size_t k = 0; k < d->size(); ++k) {
        EXPECT_LE((*d)[k], p == Precision::kFloat32 ? 1e-6 : 1e-2)
            << PrecisionName(p) << ", variant " << v.v_into_gemm << v.both_into_gemms
            << v.q_like_k << " k " << v.k << ", output " << k;
      }
    }
  }
}

}  // namespace
}  // namespace pipeserve
