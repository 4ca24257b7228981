// A permute that moves only dims of size 1 at the run's shapes (a decode
// step's [1, 1, H, D] -> [1, H, 1, D] around attention) keeps its elements'
// order: the plan gives it its input's buffers and no copy. At other
// shapes (a prefill's) it copies as before. Either way the device
// emulator's values are the CPU backend's.
#include <algorithm>
#include <cmath>
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

// x [-1, -1, 4, 8] -> permute(0, 2, 1, 3) -> y, then y * 2 (a reader).
Model PermuteGraph() {
  GraphBuilder b;
  b.Input("x", {-1, -1, 4, 8});
  b.Op("permute", {"x"}, "y", "", {{"dims", AttrInts({0, 2, 1, 3})}})
      .Op("mul", {"y"}, "z", "", {{"scalar", AttrF(2)}})
      .Output("z")
      .Output("y");
  return b.Build();
}

int Copies(const Shape& x) {
  Model m = PermuteGraph();
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  EXPECT_TRUE(stage.ok()) << stage.status();
  if (!stage.ok()) return -1;
  absl::StatusOr<DevicePlan> plan = stage->Plan({x});
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return -1;
  int copies = 0;
  for (size_t i = plan->compute_begin; i < plan->compute_end; ++i) {
    copies += plan->ops[i].type == DeviceOp::Type::kStridedCopy;
  }
  return copies;
}

TEST(PermuteAlias, APermuteOfSizeOneDimsIsNoCopy) {
  EXPECT_EQ(Copies({1, 1, 4, 8}), 0);  // decode: one token
  EXPECT_EQ(Copies({3, 1, 4, 8}), 0);  // dim 0 stays first
  EXPECT_EQ(Copies({1, 5, 4, 8}), 1);  // prefill: 5 tokens move
}

TEST(PermuteAlias, TheEmulatorMatchesTheCpuBackendEitherWay) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kFloat32);
  Model m = PermuteGraph();
  auto want = cpu->Compile(m.graph, m.weights);
  auto got = emulator->Compile(m.graph, m.weights);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_TRUE(got.ok()) << got.status();
  for (const Shape& shape : {Shape{1, 1, 4, 8}, Shape{3, 1, 4, 8}, Shape{2, 5, 4, 8}}) {
    const Tensor x = RandomTensor(shape, 4);
    absl::StatusOr<std::vector<Tensor>> a = (*want)->Run({x}), b = (*got)->Run({x});
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    for (int o = 0; o < 2; ++o) {
      ASSERT_EQ((*a)[o].shape(), (*b)[o].shape());
      for (int64_t i = 0; i < (*a)[o].numel(); ++i) {
        ASSERT_EQ((*a)[o].data()[i], (*b)[o].data()[i]) << "output " << o << " at " << i;
      }
    }
  }
}

// With bfloat16 GEMMs a linear reading the permuted value needs its GEMM
// form: shared when the input has one (x also feeds a linear), copied
// otherwise; the values stay within bfloat16 rounding of the CPU's.
Model LinearAfterPermute(bool x_feeds_a_gemm) {
  GraphBuilder b;
  b.Input("x", {-1, -1, 4, 8}).Param("w", {6, 8});
  b.Op("permute", {"x"}, "y", "", {{"dims", AttrInts({0, 2, 1, 3})}})
      .Op("linear", {"y", "w"}, "z")
      .Output("z");
  if (x_feeds_a_gemm) b.Op("linear", {"x", "w"}, "u").Output("u");
  return b.Build();
}

TEST(PermuteAlias, AGemmReadingThePermuteSharesItsInputsGemmFormOnlyWhenThereIsOne) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kBF16);
  for (bool shared : {true, false}) {
    Model m = LinearAfterPermute(shared);
    absl::StatusOr<LoweredStage> stage =
        LoweredStage::Create(m.graph, m.weights, Precision::kBF16, true, CudaOps::kUnconfirmed);
    ASSERT_TRUE(stage.ok()) << stage.status();
    absl::StatusOr<DevicePlan> plan = stage->Plan({{1, 1, 4, 8}});
    ASSERT_TRUE(plan.ok()) << plan.status();
    int copies = 0;
    for (size_t i = plan->compute_begin; i < plan->compute_end; ++i) {
      copies += plan->ops[i].type == DeviceOp::Type::kStridedCopy;
    }
    EXPECT_EQ(copies, shared ? 0 : 1) << "x feeds a GEMM: " << shared;
    auto want = cpu->Compile(m.graph, m.weights);
    auto got = emulator->Compile(m.graph, m.weights);
    ASSERT_TRUE(want.ok()) << want.status();
    ASSERT_TRUE(got.ok()) << got.status();
    const Tensor x = RandomTensor({1, 1, 4, 8}, 6);
    absl::StatusOr<std::vector<Tensor>> a = (*want)->Run({x}), b = (*got)->Run({x});
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_LE(MaxRelativeDifference((*b)[0], (*a)[0]), 1e-2) << "x feeds a GEMM: " << shared;
  }
}

}  // namespace
}  // namespace pipeserve
