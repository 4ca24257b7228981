// A permute that moves only dims of size 1 at the run's shapes (a decode
// step's [1, 1, H, D] -> [1, H, 1, D] around attention) keeps its elements'
// order: the plan gives it its input's buffers and no copy. At other
// shapes (a prefill's) it copies as before. Either way the device
// emulator's values are the CPU backend's.
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
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

}  // namespace
}  // namespace pipeserve
