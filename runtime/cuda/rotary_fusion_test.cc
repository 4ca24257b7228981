// Llama's rotary embedding written out (x * cos + cat(-x[..., D/2:],
// x[..., :D/2]) * sin) on the CUDA lowering: one kernel when the
// unconfirmed kernels are allowed, whichever side of each mul the tables
// are on; op by op when the halves are not the halves or an intermediate
// has another reader or the tables have a row per sequence; and the same
// values as the CPU backend's run, on the device emulator, with tables of
// a row per token or one row for all.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/device_emulator.h"
#include "runtime/cuda/device_plan.h"
#include "runtime/random_tensor.h"

namespace pipeserve {
namespace {

struct Variant {
  bool tables_first = false;  // mul(cos, x) and mul(sin, cat)
  int64_t split = 4;          // where the slices cut D = 8
  bool neg_out = false;       // the neg is also an output
  bool per_batch = false;     // tables [-1, 1, -1, 8], batched (a row per sequence too)
};

// x [-1, 4, -1, 8] (batch, heads, tokens, D); cos and sin [-1, 8], not
// batched (a row per token, as the exporter's embedding of positions).
Model RotaryGraph(const Variant& v) {
  GraphBuilder b;
  if (v.per_batch) {
    b.Input("x", {-1, 4, -1, 8}).Input("cos", {-1, 1, -1, 8}).Input("sin", {-1, 1, -1, 8});
  } else {
    b.Input("x", {-1, 4, -1, 8}).Input("cos", {-1, 8}).Input("sin", {-1, 8});
    for (int i : {1, 2}) b.graph().mutable_inputs(i)->set_batched(false);
  }
  auto mul = [&](const std::string& a, const std::string& t, const std::string& out) {
    b.Op("mul", v.tables_first ? std::vector<std::string>{t, a} : std::vector<std::string>{a, t},
         out);
  };
  mul("x", "cos", "plain");
  b.Op("slice", {"x"}, "high", "", {{"dim", AttrI(3)}, {"start", AttrI(v.split)}, {"step", AttrI(1)}})
      .Op("neg", {"high"}, "negated")
      .Op("slice", {"x"}, "low", "", {{"dim", AttrI(3)}, {"stop", AttrI(v.split)}, {"step", AttrI(1)}})
      .Op("cat", {"negated", "low"}, "turned", "", {{"dim", AttrI(-1)}});
  mul("turned", "sin", "rotated");
  b.Op("add", {"plain", "rotated"}, "y").Output("y");
  if (v.neg_out) b.Output("negated");
  return b.Build();
}

std::vector<DeviceOp::Type> ComputeOf(const Model& m, const std::vector<Shape>& shapes) {
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  EXPECT_TRUE(stage.ok()) << stage.status();
  if (!stage.ok()) return {};
  absl::StatusOr<DevicePlan> plan = stage->Plan(shapes);
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return {};
  std::vector<DeviceOp::Type> t;
  for (size_t i = plan->compute_begin; i < plan->compute_end; ++i) t.push_back(plan->ops[i].type);
  return t;
}

TEST(RotaryFusion, TheWrittenOutRotaryIsOneKernelUnlessItIsNotQuiteRotary) {
  const std::vector<Shape> shapes = {{2, 4, 3, 8}, {3, 8}, {3, 8}};
  const std::vector<DeviceOp::Type> one = {DeviceOp::Type::kRotary};
  EXPECT_EQ(ComputeOf(RotaryGraph({}), shapes), one);
  EXPECT_EQ(ComputeOf(RotaryGraph({.tables_first = true}), shapes), one);
  const std::vector<Shape> per_batch = {{2, 4, 3, 8}, {2, 1, 3, 8}, {2, 1, 3, 8}};
  for (const Variant& v : {Variant{.split = 3}, Variant{.neg_out = true},
                           Variant{.per_batch = true}}) {
    const std::vector<DeviceOp::Type> ops = ComputeOf(RotaryGraph(v), v.per_batch ? per_batch : shapes);
    EXPECT_EQ(std::count(ops.begin(), ops.end(), DeviceOp::Type::kRotary), 0);
    EXPECT_GT(ops.size(), 2u);
  }
}

TEST(RotaryFusion, TheEmulatorMatchesTheCpuBackend) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kFloat32);
  for (const Variant& v : {Variant{}, Variant{.tables_first = true}, Variant{.split = 3},
                           Variant{.per_batch = true}}) {
    for (int64_t table_rows : {3, 1}) {  // a row per token, or one for all
      Model m = RotaryGraph(v);
      const Shape table = v.per_batch ? Shape{2, 1, table_rows, 8} : Shape{table_rows, 8};
      auto want = cpu->Compile(m.graph, m.weights);
      auto got = emulator->Compile(m.graph, m.weights);
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_TRUE(got.ok()) << got.status();
      const std::vector<Tensor> in = {RandomTensor({2, 4, 3, 8}, 1), RandomTensor(table, 2),
                                      RandomTensor(table, 3)};
      absl::StatusOr<std::vector<Tensor>> a = (*want)->Run(in), b = (*got)->Run(in);
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      double err = 0;
      for (int64_t i = 0; i < (*a)[0].numel(); ++i) {
        err = std::max(err, static_cast<double>(std::fabs((*a)[0].data()[i] - (*b)[0].data()[i])));
      }
      EXPECT_LE(err, 1e-6) << "split " << v.split << ", tables first " << v.tables_first
                           << ", table rows " << table_rows;
    }
  }
}

}  // namespace
}  // namespace pipeserve
