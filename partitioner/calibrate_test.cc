#include "partitioner/calibrate.h"

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "graph/validate.h"
#include "runtime/cpu/cpu_backend.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// A narrow start (16 wide, 6 small matmuls) then one wide layer pair (1024
// wide): equal node counts, very different times.
Model NarrowThenWide() {
  GraphBuilder b;
  b.Input("x", {-1, 16});
  std::string prev = "x";
  for (int i = 0; i < 6; ++i) {
    std::string w = "narrow." + std::to_string(i);
    b.Param(w, {16, 16});
    b.Op("mm", {prev, w}, "n" + std::to_string(i));
    prev = "n" + std::to_string(i);
  }
  b.Param("up", {16, 1024}).Param("wide", {1024, 1024}).Param("down", {1024, 16});
  b.Op("mm", {prev, "up"}, "u").Op("mm", {"u", "wide"}, "w").Op("relu", {"w"}, "r");
  b.Op("mm", {"r", "down"}, "d").Output("d");
  return b.Build();
}

ParamReader FromModel(const Model& m) {
  return [&m](const TensorInfo& p) -> absl::StatusOr<Tensor> { return m.weights.at(p.fqn()); };
}

TEST(CalibrateTest, TimesEveryComputeNodeAndTheWideOneMost) {
  Model m = NarrowThenWide();
  auto cpu = MakeCpuBackend({});
  CalibrationOptions o;
  o.rows = 32;
  absl::StatusOr<Calibration> c = Calibrate(m.graph, FromModel(m), *cpu, o);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->node_seconds.size(), ComputeNodes(m.graph).size());
  EXPECT_EQ(c->measured, 10);
  EXPECT_EQ(c->estimated, 0);
  for (double s : c->node_seconds) EXPECT_GT(s, 0);
  // The 1024 x 1024 matmul (node 7) does 4096x the FLOPs of a 16 x 16 one:
  // well above the narrow matmuls' median even in a sanitizer build on a
  // busy machine.
  std::vector<double> narrow(c->node_seconds.begin(), c->node_seconds.begin() + 6);
  std::sort(narrow.begin(), narrow.end());
  EXPECT_GT(c->node_seconds[7], 2 * narrow[3]);
  EXPECT_EQ(c->Describe(), "measured on cpu at 32 rows (10 nodes run)");
}

TEST(CalibrateTest, NodesOverTheWeightLimitAreScaledFromTheEstimate) {
  Model m = NarrowThenWide();
  auto cpu = MakeCpuBackend({});
  CalibrationOptions o;
  o.max_node_bytes = 1 << 20;  // the 4 MiB wide layer is not run
  absl::StatusOr<Calibration> c = Calibrate(m.graph, FromModel(m), *cpu, o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->measured, 9);
  EXPECT_EQ(c->estimated, 1);
  EXPECT_GT(c->node_seconds[7], c->node_seconds[0]);
  EXPECT_THAT(c->Describe(), HasSubstr("1 over the weight limit estimated"));
  // Scaled by the seconds per unit of estimate of the nodes that ran and
  // read weights (the matmuls, not the relu, node 8).
  std::vector<double> estimate = EstimatedNodeCosts(m.graph, *ValidateGraph(m.graph));
  double seconds = 0, units = 0;
  for (int i : {0, 1, 2, 3, 4, 5, 6, 9}) {
    seconds += c->node_seconds[i];
    units += estimate[i];
  }
  EXPECT_NEAR(c->node_seconds[7], estimate[7] * seconds / units, 1e-12);
  o.max_node_bytes = 0;  // only the relu, which reads no weights, runs
  absl::StatusOr<Calibration> relu_only = Calibrate(m.graph, FromModel(m), *cpu, o);
  ASSERT_TRUE(relu_only.ok()) << relu_only.status();
  EXPECT_EQ(relu_only->measured, 1);
  for (double s : relu_only->node_seconds) EXPECT_GT(s, 0);
}

TEST(CalibrateTest, AReadErrorNamesTheNode) {
  Model m = NarrowThenWide();
  auto cpu = MakeCpuBackend({});
  ParamReader broken = [](const TensorInfo& p) -> absl::StatusOr<Tensor> {
    return absl::DataLossError(absl::StrCat("cannot read ", p.fqn()));
  };
  absl::StatusOr<Calibration> c = Calibrate(m.graph, broken, *cpu, {});
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("cannot read narrow.0"));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("calibrating node"));
}

// A backend whose every run takes 2 ms whatever its rows (a node that is
// all overhead), recording the shape of each run's first input.
class FixedCostBackend : public ComputeBackend {
 public:
  std::string Name() const override { return "fixed"; }
  absl::StatusOr<std::unique_ptr<StageProgram>> Compile(const Graph&,
                                                        const WeightMap&) override {
    return std::unique_ptr<StageProgram>(new Program(this));
  }
  std::vector<Shape> seen;

 private:
  class Program : public StageProgram {
   public:
    explicit Program(FixedCostBackend* b) : b_(b) {}
    absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor> inputs) override {
      b_->seen.push_back(inputs[0].shape());
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      return std::vector<Tensor>{Tensor::Zeros(inputs[0].shape())};
    }

   private:
    FixedCostBackend* b_;
  };
};

TEST(CalibrateTest, JoinedRowsChargeEachMicrobatchItsShareOfTheRun) {
  GraphBuilder b;
  b.Input("x", {-1, -1});  // the batch, and a free dimension that is not
  b.Op("relu", {"x"}, "r").Output("r");
  Model m = b.Build();
  FixedCostBackend fixed;
  CalibrationOptions o;
  o.rows = 16;
  absl::StatusOr<Calibration> alone = Calibrate(m.graph, FromModel(m), fixed, o);
  ASSERT_TRUE(alone.ok()) << alone.status();
  EXPECT_EQ(fixed.seen.back(), Shape({16, 16}));
  EXPECT_GE(alone->node_seconds[0], 0.002);
  EXPECT_EQ(alone->Describe(), "measured on fixed at 16 rows (1 nodes run)");
  // A loaded stage runs 4 microbatches at once: the batch dimension only
  // grows, and each microbatch pays a quarter of the run.
  o.joined_rows = 64;
  absl::StatusOr<Calibration> joined = Calibrate(m.graph, FromModel(m), fixed, o);
  ASSERT_TRUE(joined.ok()) << joined.status();
  EXPECT_EQ(fixed.seen.back(), Shape({64, 16}));
  EXPECT_GE(joined->node_seconds[0], 0.002 / 4);
  EXPECT_LT(joined->node_seconds[0], 0.75 * alone->node_seconds[0]);
  EXPECT_EQ(joined->rows, 16);
  EXPECT_EQ(joined->Describe(),
            "measured on fixed at 64 rows joined, per 16-row microbatch (1 nodes run)");
}

TEST(CalibrateTest, AMeasuredPlanPredictsTheSlowestStageOfTheBestCut) {
  // The wide matmul (node 7) is most of the time: it shares a stage with
  // either the nodes before it or the nodes after it, whichever is faster.
  Model m = NarrowThenWide();
  auto cpu = MakeCpuBackend({});
  absl::StatusOr<Calibration> c = Calibrate(m.graph, FromModel(m), *cpu, {});
  ASSERT_TRUE(c.ok()) << c.status();
  PartitionOptions p;
  p.num_stages = 2;
  p.node_seconds = c->node_seconds;
  p.cost_source = c->Describe();
  absl::StatusOr<Plan> plan = Partition(m.graph, p);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->balance(), HasSubstr("measured on cpu at 16 rows"));
  const std::vector<double>& t = c->node_seconds;
  auto sum = [&](int from, int to) {
    double s = 0;
    for (int i = from; i < to; ++i) s += t[i];
    return s;
  };
  double best = std::min(std::max(sum(0, 7), sum(7, 10)), std::max(sum(0, 8), sum(8, 10)));
  double slowest = std::max(plan->stages(0).predicted_compute_us(),
                            plan->stages(1).predicted_compute_us());
  EXPECT_NEAR(slowest, best * 1e6, 1e-6);
  EXPECT_NEAR(plan->stages(0).predicted_compute_us() + plan->stages(1).predicted_compute_us(),
              sum(0, 10) * 1e6, 1e-6);
}

}  // namespace
}  // namespace pipeserve
