#include "server/coordinator/kv_budget.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// A stage graph with `layers` cached attentions of 2 KV heads of 8.
Graph StageWith(int layers) {
  GraphBuilder b;
  b.Input("q", {1, 4, -1, 8}).Input("k", {1, 2, -1, 8}).Input("v", {1, 2, -1, 8});
  for (const char* meta : {"kv_positions", "kv_seq", "kv_seq_ids"}) b.Input(meta, {-1});
  b.Input("kv_blocks", {-1, -1});
  for (int i = 3; i < 7; ++i) b.graph().mutable_inputs(i)->set_dtype(DT_INT64);
  for (int l = 0; l < layers; ++l) {
    const std::string out = "a" + std::to_string(l);
    b.Op("cached_attention", {"q", "k", "v", "kv_positions", "kv_seq", "kv_blocks", "kv_seq_ids"},
         out, "", {{"kv_heads", AttrI(2)}, {"head_dim", AttrI(8)}, {"scale", AttrF(0.35)}});
    b.Output(out);
  }
  if (layers == 0) b.Output("q");  // a stage without cached attention
  return b.Build().graph;
}

Plan TwoStages(int layers0, int layers1) {
  Plan plan;
  *plan.add_stages()->mutable_graph() = StageWith(layers0);
  *plan.add_stages()->mutable_graph() = StageWith(layers1);
  return plan;
}

Graph GenerationModel() {
  Graph g;
  g.mutable_generation()->set_block_size(16);
  g.mutable_generation()->set_layers(3);
  return g;
}

TEST(KvBudgetTest, EveryStageHoldsWhatTheWidestStageFits) {
  // A layer's block: 2 (k, v) x 2 heads x 8 x 16 tokens x 4 bytes = 2048;
  // the 2-layer stage's, with its bookkeeping: 4096 + 16 x 16 + 2 x 8.
  EXPECT_EQ(*StageBlockBytes(StageWith(2), 16), 4368);
  EXPECT_EQ(*StageBlockBytes(StageWith(0), 16), 0);
  Plan plan = TwoStages(1, 2);
  ASSERT_TRUE(SizeKvCache(GenerationModel(), int64_t{1} << 20, &plan).ok());
  EXPECT_EQ(plan.generation().num_blocks(), (int64_t{1} << 20) / 4368);
  EXPECT_EQ(plan.generation().layers(), 3);
  int nodes = 0;
  for (const Stage& s : plan.stages()) {
    for (const Node& n : s.graph().nodes()) {
      if (n.op() != "cached_attention") continue;
      EXPECT_EQ(n.attrs().at("num_blocks").i(), (int64_t{1} << 20) / 4368);
      ++nodes;
    }
  }
  EXPECT_EQ(nodes, 3);
}

TEST(KvBudgetTest, ABudgetThatHoldsNoBlockIsRefusedNamingIt) {
  Plan plan = TwoStages(1, 2);
  absl::Status s = SizeKvCache(GenerationModel(), 4000, &plan);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("holds no block of 16 tokens: a stage needs 4368 bytes"));
  EXPECT_THAT(s.message(), HasSubstr("--kv_cache_mb"));
}

TEST(KvBudgetTest, AModelNotExportedForGenerationIsLeftAlone) {
  Plan plan = TwoStages(1, 1);
  ASSERT_TRUE(SizeKvCache(Graph(), int64_t{1} << 20, &plan).ok());
  EXPECT_FALSE(plan.has_generation());
  EXPECT_FALSE(plan.stages(0).graph().nodes(0).attrs().contains("num_blocks"));
}

}  // namespace
}  // namespace pipeserve
