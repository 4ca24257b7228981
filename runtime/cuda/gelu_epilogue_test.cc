// GELU with the tanh approximation on a GEMM's result, as one op
// (gelu(approximate="tanh")) or written out as GPT-2's MLP has it (through
// the view of Conv1D's addmm), on the CUDA lowering: the GEMM's epilogue
// when the unconfirmed kernels are allowed, nothing else computed; kept
// apart for the erf GELU, a result with another reader, or other
// constants; and the same values as the CPU backend's run on the device
// emulator, with a bias, without, and over an inner dimension of 0.
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

using Type = DeviceOp::Type;

struct Variant {
  bool written_out = true;    // GPT-2's eight ops, else one gelu op
  std::string approximate = "tanh";  // the one op's
  bool addmm = true;          // Conv1D: addmm then a view, else linear without a bias
  bool also_output = false;   // the GELU's input is an output too
  bool mm_out = false;        // addmm's result (before its view) is an output too
  double cube_coefficient = 0.044715;
  int64_t k = 16;             // the GEMM's inner dimension
};

// x [-1, k] through a GEMM to [-1, 32], GELU, then reshaped to [-1, 2, 16].
Model GeluGraph(const Variant& v) {
  GraphBuilder b;
  b.Input("x", {-1, v.k}).Param("w", v.addmm ? Shape{v.k, 32} : Shape{32, v.k});
  if (v.addmm) {
    b.Param("bias", {32})
        .Op("addmm", {"bias", "x", "w"}, "mm")
        .Op("reshape", {"mm"}, "h", "", {{"shape", AttrInts({-1, 32})}});
  } else {
    b.Op("linear", {"x", "w"}, "h");
  }
  if (v.written_out) {
    b.Op("mul", {"h"}, "a", "", {{"scalar", AttrF(0.5)}, {"reverse", AttrI(1)}})
        .Op("pow", {"h"}, "p", "", {{"scalar", AttrF(3.0)}})
        .Op("mul", {"p"}, "q", "", {{"scalar", AttrF(v.cube_coefficient)}, {"reverse", AttrI(1)}})
        .Op("add", {"h", "q"}, "r")
        .Op("mul", {"r"}, "t", "", {{"scalar", AttrF(std::sqrt(2.0 / M_PI))}, {"reverse", AttrI(1)}})
        .Op("tanh", {"t"}, "u")
        .Op("add", {"u"}, "w1", "", {{"scalar", AttrF(1.0)}, {"reverse", AttrI(1)}})
        .Op("mul", {"a", "w1"}, "g");
  } else {
    AttrValue approximate;
    approximate.set_s(v.approximate);
    b.Op("gelu", {"h"}, "g", "", {{"approximate", approximate}});
  }
  b.Op("reshape", {"g"}, "y", "", {{"shape", AttrInts({-1, 2, 16})}}).Output("y");
  if (v.also_output) b.Output("h");
  if (v.mm_out) b.Output("mm");
  return b.Build();
}

absl::StatusOr<DevicePlan> PlanOf(const Model& m) {
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  if (!stage.ok()) return stage.status();
  return stage->Plan({{3, m.graph.inputs(0).shape(1)}});
}

std::vector<Type> Compute(const DevicePlan& plan) {
  std::vector<Type> t;
  for (size_t i = plan.compute_begin; i < plan.compute_end; ++i) t.push_back(plan.ops[i].type);
  return t;
}

TEST(GeluEpilogueTest, TanhGeluOnAGemmIsItsEpilogue) {
  for (const Variant& v : {Variant{}, Variant{.written_out = false},
                           Variant{.written_out = false, .addmm = false},
                           Variant{.addmm = false}}) {
    absl::StatusOr<DevicePlan> plan = PlanOf(GeluGraph(v));
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_EQ(Compute(*plan), std::vector<Type>{Type::kGemm}) << v.written_out << v.addmm;
    const GemmOp& g = plan->ops[plan->compute_begin].gemm;
    EXPECT_TRUE(g.gelu);
    EXPECT_EQ(g.has_bias, v.addmm);
    // The output is copied back from the GEMM's own buffer.
    EXPECT_EQ(plan->ops.back().type, Type::kCopyOut);
    EXPECT_EQ(plan->ops.back().src.offset, g.d.offset);
  }
}

TEST(GeluEpilogueTest, OtherGelusAndSharedResultsStayApart) {
  for (const Variant& v : {Variant{.written_out = false, .approximate = "none"},
                           Variant{.also_output = true},
                           Variant{.written_out = false, .also_output = true},
                           Variant{.mm_out = true}, Variant{.written_out = false, .mm_out = true},
                           Variant{.cube_coefficient = 0.05}}) {
    absl::StatusOr<DevicePlan> plan = PlanOf(GeluGraph(v));
    ASSERT_TRUE(plan.ok()) << plan.status();
    const std::vector<Type> ops = Compute(*plan);
    ASSERT_EQ(ops.size(), 2u) << v.approximate << v.also_output;  // the GEMM, then the GELU
    EXPECT_FALSE(plan->ops[plan->compute_begin].gemm.gelu);
  }
}

TEST(GeluEpilogueTest, TheEmulatorMatchesTheCpuBackend) {
  for (const Variant& v : {Variant{}, Variant{.written_out = false, .addmm = false},
                           Variant{.k = 0}, Variant{.also_output = true}}) {
    absl::StatusOr<std::vector<double>> d =
        EmulatorVsCpu(GeluGraph(v), {RandomTensor({5, v.k}, 7)});
    ASSERT_TRUE(d.ok()) << d.status();
    for (size_t k = 0; k < d->size(); ++k) {
      EXPECT_LE((*d)[k], 1e-5) << "written out " << v.written_out << ", k " << v.k
                               << ", output " << k;
    }
  }
}

// In bfloat16 precision a GEMM read only by GEMMs writes bfloat16; over
// K = 0 without a bias its GELU is of zeros (nothing to run), and the
// values match the CPU backend's.
TEST(GeluEpilogueTest, ABfloat16OutputOverAnEmptyInnerDimensionIsZeros) {
  GraphBuilder b;
  b.Input("x", {-1, 0}).Param("w", {32, 0}).Param("w2", {1, 32});
  AttrValue tanh;
  tanh.set_s("tanh");
  b.Op("linear", {"x", "w"}, "h").Op("gelu", {"h"}, "g", "", {{"approximate", tanh}});
  b.Op("linear", {"g", "w2"}, "y").Output("y");
  absl::StatusOr<std::vector<double>> d =
      EmulatorVsCpu(b.Build(), {Tensor::Empty({100, 0})}, Precision::kBF16);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_LE((*d)[0], 1e-6);
}

}  // namespace
}  // namespace pipeserve
