#include "partitioner/routing.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;

Plan MustPartition(const Graph& g) {
  auto p = Partition(g, {});
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

TEST(RoutingTest, SkipConnectionAndLateInputRideAlongIntermediateHops) {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Input("y", {-1, 4});
  b.Op("relu", {"x"}, "a").Split();
  b.Op("relu", {"a"}, "b").Split();
  b.Op("add", {"b", "a"}, "c").Op("sub", {"c", "y"}, "d").Output("d");
  Routing r = RoutePlan(MustPartition(b.Build().graph));
  EXPECT_THAT(r.to_first, ElementsAre("x", "y"));
  EXPECT_THAT(r.forward[0], ElementsAre("y", "a"));     // y and a pass stage 1
  EXPECT_THAT(r.forward[1], ElementsAre("y", "a", "b"));
  EXPECT_THAT(r.forward[2], ElementsAre("d"));          // model outputs
}

TEST(RoutingTest, OutputMadeEarlyIsCarriedToTheEnd) {
  GraphBuilder b;
  b.Input("x", {-1, 4});
  b.Op("relu", {"x"}, "a").Split().Op("clone", {"a"}, "b").Output("a").Output("b");
  Routing r = RoutePlan(MustPartition(b.Build().graph));
  EXPECT_THAT(r.forward[0], ElementsAre("a"));
  EXPECT_THAT(r.forward[1], ElementsAre("a", "b"));
}

TEST(RoutingTest, UnusedModelInputIsNotSent) {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Input("unused", {-1, 4});
  b.Op("relu", {"x"}, "a").Output("a");
  Routing r = RoutePlan(MustPartition(b.Build().graph));
  EXPECT_THAT(r.to_first, ElementsAre("x"));
  EXPECT_THAT(r.forward[0], ElementsAre("a"));
}

}  // namespace
}  // namespace pipeserve
