#include "partitioner/plan_text.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

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
}

}  // namespace
}  // namespace pipeserve
