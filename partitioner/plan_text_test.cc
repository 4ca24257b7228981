#include "partitioner/plan_text.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(PlanTextTest, ShowsParamsCrossingValuesAndServers) {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Input("y", {-1, 4}).Param("w", {4, 4});
  b.Op("mm", {"x", "w"}, "a").Split().Op("relu", {"a"}, "r");
  b.Op("sub", {"r", "y"}, "out").Output("out");
  auto plan = Partition(b.Build().graph, {});
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::string text = FormatPlan(*plan, {"10.0.0.1:9000", "10.0.0.2:9000"});
  EXPECT_THAT(text, HasSubstr("2 stages\n"));
  EXPECT_THAT(text, HasSubstr("stage 0 @ 10.0.0.1:9000: 1 nodes, 1 parameter (64 B)"));
  EXPECT_THAT(text, HasSubstr("params   w [4,4]"));
  EXPECT_THAT(text, HasSubstr("outputs  a -> stage 1"));
  EXPECT_THAT(text, HasSubstr("inputs   a [B,4] <- stage 0, y [B,4] <- model input"));
  EXPECT_THAT(text, HasSubstr("outputs  out -> output"));
  EXPECT_THAT(text, HasSubstr("cut by   the model's cut points\n"));
  EXPECT_THAT(text, Not(HasSubstr("KV cache")));
  plan->mutable_generation()->set_num_blocks(100);
  plan->mutable_generation()->set_block_size(16);
  plan->mutable_generation()->set_layers(4);
  plan->mutable_generation()->set_max_positions(64);
  EXPECT_THAT(FormatPlan(*plan, {}),
              HasSubstr("KV cache 100 blocks of 16 tokens per stage (1600 tokens of all "
                        "sequences together; 4 cached attentions, sequences up to 64 positions)\n"));
  EXPECT_THAT(text, Not(HasSubstr("  time ")));
}

TEST(PlanTextTest, ShowsPredictedAndMeasuredTimes) {
  GraphBuilder b;
  b.Input("x", {-1, 4});
  b.Op("relu", {"x"}, "a").Op("relu", {"a"}, "r").Output("r");
  PartitionOptions o;
  o.num_stages = 2;
  o.node_seconds = {30e-6, 10e-6};
  o.cost_source = "measured on cpu at 16 rows (2 nodes run)";
  auto plan = Partition(b.Build().graph, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::string text = FormatPlan(*plan, {}, {28.0, 11.5});
  EXPECT_THAT(text, HasSubstr("cut by   measured on cpu at 16 rows (2 nodes run); transfers "
                              "not counted\n"));
  EXPECT_THAT(text, HasSubstr("stage 0: 1 nodes, 0 parameters (0 B)\n"));
  EXPECT_THAT(text, HasSubstr("  time     predicted 30.0 us compute + 0.0 us transfer; "
                              "measured 28.0 us compute per microbatch\n"));
  EXPECT_THAT(text, HasSubstr("  time     predicted 10.0 us compute + 0.0 us transfer; "
                              "measured 11.5 us compute per microbatch\n"));
}

}  // namespace
}  // namespace pipeserve
