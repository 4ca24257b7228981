#include "server/stage/stage_metrics.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "runtime/model_file.h"
#include "server/stage/stage_spec.h"
#include "tests/promtool.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// Results land here.
class CountingSink : public FrameSink {
 public:
  absl::Status Send(Frame, absl::Time) override {
    absl::MutexLock lock(&mu_);
    ++frames_;
    return absl::OkStatus();
  }
  void Close() override {}
  bool WaitFor(int n) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return frames_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(10));
  }

 private:
  absl::Mutex mu_;
  int frames_ ABSL_GUARDED_BY(mu_) = 0;
};

class NoDialer : public Dialer {
 public:
  std::shared_ptr<FrameSink> Dial(const std::string&, const StageKey&) override { return nullptr; }
};

TEST(StageMetricsTest, CountsFramesBytesTimeAndDropsPerStageAndPassesPromtool) {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Param("w", {4, 4}).Op("mm", {"x", "w"}, "y").Output("y");
  Model m = b.Build();
  StageSpec spec = MakeStageSpecs(*Partition(m.graph, {}), "m", 0xabc, {"s0:9000"}, 1, 1)[0];
  const Tensor& w = m.weights.at("w");
  spec.mutable_stage()->mutable_graph()->mutable_params(0)->set_crc32(
      Crc32(w.data(), w.byte_size()));
  NoDialer dialer;
  StageServerCore core({}, &dialer);
  auto load = core.BeginLoad(spec);
  ASSERT_TRUE(load.ok()) << load.status();
  WeightChunk c;
  c.set_fqn("w");
  c.set_data(reinterpret_cast<const char*>(w.data()), w.byte_size());
  ASSERT_TRUE((*load)->AddChunk(c).ok());
  ASSERT_TRUE((*load)->Finish().ok());
  auto results = std::make_shared<CountingSink>();
  ASSERT_TRUE(core.SubscribeResults(spec.key(), results).ok());
  std::shared_ptr<FrameSink> in = core.OpenInput(spec.key());
  for (int i = 0; i < 3; ++i) {
    Frame f;
    f.header.set_request_id(i + 1);
    if (i == 2) f.header.set_deadline_us(1);  // long past: dropped
    f.Add("x", Tensor::Zeros({2, 4}));
    ASSERT_TRUE(in->Send(std::move(f), absl::Now() + absl::Seconds(5)).ok());
  }
  ASSERT_TRUE(results->WaitFor(2));
  ASSERT_TRUE(core.FinishQueued(absl::Now() + absl::Seconds(5)));

  const std::string text = RenderStageMetrics(core);
  const std::string labels =
      "{model=\"m\",deployment=\"0000000000000abc\",stage=\"0\",replica=\"1\"}";
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_frames_received_total" + labels + " 3\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_received_bytes_total" + labels + " 96\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_frames_computed_total" + labels + " 2\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_frames_sent_total" + labels + " 2\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_sent_bytes_total" + labels + " 64\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_weight_bytes" + labels + " 64\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_downstream_up" + labels + " 1\n"));
  EXPECT_THAT(text, HasSubstr(
                        "pipeserve_stage_frames_dropped_total{model=\"m\",deployment=\"0000000000000abc\","
                        "stage=\"0\",replica=\"1\",reason=\"deadline\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("# TYPE pipeserve_stage_compute_seconds_total counter\n"));
  EXPECT_EQ(PromtoolProblems(text), "");
  // A server holding nothing renders the families without samples.
  ASSERT_TRUE(core.Unload(spec.key()).ok());
  EXPECT_EQ(PromtoolProblems(RenderStageMetrics(core)), "");
}

// A stage of one cached attention (2 KV heads of 8, 4 query heads) whose
// KV cache holds 8 blocks of 16 tokens.
StageSpec CacheAwareStage() {
  GraphBuilder b;
  b.Input("q", {1, 4, -1, 8}).Input("k", {1, 2, -1, 8}).Input("v", {1, 2, -1, 8});
  for (const char* meta : {"kv_positions", "kv_seq", "kv_seq_ids"}) b.Input(meta, {-1});
  b.Input("kv_blocks", {-1, -1});
  for (int i = 0; i < 7; ++i) b.graph().mutable_inputs(i)->set_batched(false);
  for (int i = 3; i < 7; ++i) b.graph().mutable_inputs(i)->set_dtype(DT_INT64);
  b.Op("cached_attention", {"q", "k", "v", "kv_positions", "kv_seq", "kv_blocks", "kv_seq_ids"},
       "a", "",
       {{"kv_heads", AttrI(2)}, {"head_dim", AttrI(8)}, {"scale", AttrF(0.35)},
        {"num_blocks", AttrI(8)}, {"block_size", AttrI(16)}});
  b.Output("a");
  Model m = b.Build();
  return MakeStageSpecs(*Partition(m.graph, {}), "g", 0xdef, {"s0:9000"}, 1, 1)[0];
}

Tensor Int64s(Shape shape, std::vector<int64_t> values) {
  Tensor t = Tensor::Zeros(std::move(shape), DT_INT64);
  std::copy(values.begin(), values.end(), t.data_as<int64_t>());
  return t;
}

TEST(StageMetricsTest, AStageWithAKvCacheReportsItsBlocksAndTheMemoryTaken) {
  NoDialer dialer;
  StageServerCore core({}, &dialer);
  const StageSpec spec = CacheAwareStage();
  auto load = core.BeginLoad(spec);
  ASSERT_TRUE(load.ok()) << load.status();
  ASSERT_TRUE((*load)->Finish().ok());
  const std::string labels =
      "{model=\"g\",deployment=\"0000000000000def\",stage=\"0\",replica=\"1\"}";
  std::string text = RenderStageMetrics(core);
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_kv_cache_blocks" + labels + " 8\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_kv_cache_blocks_allocated" + labels + " 0\n"));
  EXPECT_EQ(core.Stats(spec.key())->kv_cache_blocks(), 8);

  // One sequence's first 3 tokens, in block 5: one block's memory taken,
  // 2 (k, v) x 2 heads x 16 tokens x 8 x 4 bytes.
  auto results = std::make_shared<CountingSink>();
  ASSERT_TRUE(core.SubscribeResults(spec.key(), results).ok());
  Frame f;
  f.header.set_request_id(1);
  f.Add("q", Tensor::Zeros({1, 4, 3, 8}));
  f.Add("k", Tensor::Zeros({1, 2, 3, 8}));
  f.Add("v", Tensor::Zeros({1, 2, 3, 8}));
  f.Add("kv_positions", Int64s({3}, {0, 1, 2}));
  f.Add("kv_seq", Int64s({3}, {0, 0, 0}));
  f.Add("kv_seq_ids", Int64s({1}, {77}));
  f.Add("kv_blocks", Int64s({1, 1}, {5}));
  ASSERT_TRUE(core.OpenInput(spec.key())->Send(std::move(f), absl::Now() + absl::Seconds(5)).ok());
  ASSERT_TRUE(results->WaitFor(1));
  text = RenderStageMetrics(core);
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_kv_cache_blocks_allocated" + labels + " 1\n"));
  EXPECT_THAT(text, HasSubstr("pipeserve_stage_kv_cache_bytes" + labels + " 2048\n"));
  EXPECT_EQ(core.Stats(spec.key())->kv_cache_blocks_allocated(), 1);
  EXPECT_EQ(PromtoolProblems(text), "");
}

TEST(StageMetricsTest, StagesWithoutAKvCacheHaveNoKvCacheSamples) {
  NoDialer dialer;
  StageServerCore core({}, &dialer);
  GraphBuilder b;
  b.Input("x", {-1, 4}).Op("relu", {"x"}, "y").Output("y");
  Model m = b.Build();
  StageSpec spec = MakeStageSpecs(*Partition(m.graph, {}), "m", 1, {"s0:9000"}, 1, 1)[0];
  auto load = core.BeginLoad(spec);
  ASSERT_TRUE(load.ok()) << load.status();
  ASSERT_TRUE((*load)->Finish().ok());
  EXPECT_THAT(RenderStageMetrics(core), Not(HasSubstr("kv_cache")));
  EXPECT_EQ(core.Stats(spec.key())->kv_cache_blocks(), 0);
}

}  // namespace
}  // namespace pipeserve
