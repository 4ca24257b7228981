#include "server/stage_host.h"

#include <atomic>
#include <set>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "partitioner/routing.h"
#include "runtime/cpu/cpu_backend.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Collects frames; can be made to block until released.
class FakeSink : public FrameSink {
 public:
  absl::Status Send(Frame f) override {
    absl::MutexLock lock(&mu_);
    auto open = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !blocked_ || closed_; };
    mu_.Await(absl::Condition(&open));
    if (closed_) return absl::UnavailableError("closed");
    frames_.push_back(std::move(f));
    return absl::OkStatus();
  }
  void Close() override {
    absl::MutexLock lock(&mu_);
    closed_ = true;
  }
  void Block(bool b) {
    absl::MutexLock lock(&mu_);
    blocked_ = b;
  }
  // Waits for n frames and returns them.
  std::vector<Frame> Wait(size_t n) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return frames_.size() >= n; };
    mu_.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(10));
    return frames_;
  }

 private:
  absl::Mutex mu_;
  std::vector<Frame> frames_ ABSL_GUARDED_BY(mu_);
  bool blocked_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

// Stage 1 of: x -> relu -> a | a -> add(a, y) -> out   (y rides along)
struct Fixture {
  Model model;
  Plan plan;
  Routing routing;
  std::unique_ptr<StageHost> host;
  std::shared_ptr<FakeSink> sink = std::make_shared<FakeSink>();

  explicit Fixture(int stage, size_t capacity = 8, int workers = 1) {
    GraphBuilder b;
    b.Input("x", {-1, 4}).Input("y", {-1, 4});
    b.Op("relu", {"x"}, "a").Split().Op("add", {"a", "y"}, "out").Output("out");
    model = b.Build();
    plan = *Partition(model.graph, {});
    routing = RoutePlan(plan);
    StageSpec spec;
    spec.set_model("m");
    *spec.mutable_stage() = plan.stages(stage);
    for (const auto& f : routing.forward[stage]) spec.add_forward(f);
    auto prog = MakeCpuBackend({})->Compile(plan.stages(stage).graph(), model.weights);
    host = std::make_unique<StageHost>(spec, std::move(*prog), capacity, workers);
    host->SetSink(sink);
  }
};

Frame DataFrame(uint64_t id, std::vector<std::pair<std::string, Tensor>> ts,
                int64_t deadline = 0) {
  Frame f;
  f.header.set_request_id(id);
  f.header.set_deadline_us(deadline);
  for (auto& [n, t] : ts) f.Add(n, t);
  return f;
}

TEST(StageHostTest, ComputesAndForwardsWhatLaterStagesNeed) {
  Fixture fx(0);
  Tensor x = Tensor::FromVector({1, 4}, {-1, 2, -3, 4});
  Tensor y = Tensor::FromVector({1, 4}, {1, 1, 1, 1});
  fx.host->Push(DataFrame(7, {{"x", x}, {"y", y}}), [] {});
  std::vector<Frame> got = fx.sink->Wait(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header.request_id(), 7u);
  // Stage 0 sends y (read by stage 1) and its output a.
  ASSERT_EQ(got[0].header.tensors_size(), 2);
  EXPECT_EQ(got[0].header.tensors(0).name(), "y");
  EXPECT_EQ(got[0].header.tensors(1).name(), "a");
  EXPECT_EQ(got[0].tensors[1].data()[0], 0.0f);  // relu(-1)
  EXPECT_EQ(got[0].tensors[1].data()[1], 2.0f);
  EXPECT_EQ(fx.host->stats().processed, 1u);
}

// A thread-safe program that copies its input through and records how many
// Runs overlapped.
class SlowIdentity : public StageProgram {
 public:
  absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor> in) override {
    int now = ++running_;
    int seen = max_running_.load();
    while (now > seen && !max_running_.compare_exchange_weak(seen, now)) {}
    absl::SleepFor(absl::Milliseconds(5));  // stands in for compute
    --running_;
    return std::vector<Tensor>{in[0]};
  }
  std::atomic<int> running_{0}, max_running_{0};
};

TEST(StageHostTest, TwoWorkersRunTwoFramesAtOnceAndProcessEachOnce) {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Op("identity", {"x"}, "out").Output("out");
  StageSpec spec;
  spec.set_model("m");
  *spec.mutable_stage() = Partition(b.Build().graph, {})->stages(0);
  spec.add_forward("out");
  auto program = std::make_unique<SlowIdentity>();
  SlowIdentity* p = program.get();
  auto sink = std::make_shared<FakeSink>();
  StageHost host(spec, std::move(program), /*queue_capacity=*/8, /*workers=*/2);
  host.SetSink(sink);
  Tensor x = Tensor::Zeros({1, 4});
  for (uint64_t id = 1; id <= 20; ++id) host.Push(DataFrame(id, {{"x", x}}), [] {});
  std::vector<Frame> got = sink->Wait(20);
  ASSERT_EQ(got.size(), 20u);
  std::set<uint64_t> ids;
  for (const Frame& f : got) ids.insert(f.header.request_id());
  EXPECT_EQ(ids.size(), 20u);
  EXPECT_EQ(p->max_running_.load(), 2);
  EXPECT_EQ(host.stats().processed, 20u);
}

TEST(StageHostTest, ExpiredDeadlineIsDroppedNotComputed) {
  Fixture fx(0);
  Tensor x = Tensor::Zeros({1, 4});
  fx.host->Push(DataFrame(1, {{"x", x}, {"y", x}}, NowMicros() - 1000), [] {});
  fx.host->Push(DataFrame(2, {{"x", x}, {"y", x}}), [] {});
  std::vector<Frame> got = fx.sink->Wait(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header.request_id(), 2u);
  EXPECT_EQ(fx.host->stats().dropped_deadline, 1u);
}

TEST(StageHostTest, CancelledRequestIsDroppedAndTheCancelTravelsOn) {
  Fixture fx(0);
  Tensor x = Tensor::Zeros({1, 4});
  Frame cancel;
  cancel.header.set_kind(FrameHeader::CANCEL);
  cancel.header.set_request_id(5);
  fx.host->Push(std::move(cancel), [] {});
  fx.host->Push(DataFrame(5, {{"x", x}, {"y", x}}), [] {});
  fx.host->Push(DataFrame(6, {{"x", x}, {"y", x}}), [] {});
  std::vector<Frame> got = fx.sink->Wait(2);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].header.kind(), FrameHeader::CANCEL);
  EXPECT_EQ(got[1].header.request_id(), 6u);
  EXPECT_EQ(fx.host->stats().dropped_cancelled, 1u);
}

TEST(StageHostTest, BadFrameBecomesAnErrorFrameNamingTheStage) {
  Fixture fx(1);
  Tensor wrong = Tensor::Zeros({2, 5});
  fx.host->Push(DataFrame(3, {{"a", wrong}, {"y", wrong}}), [] {});
  std::vector<Frame> got = fx.sink->Wait(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header.kind(), FrameHeader::ERROR);
  EXPECT_EQ(got[0].header.error_code(), int(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(got[0].header.error_message(), HasSubstr("stage 1: input \"a\""));
}

TEST(StageHostTest, FullQueueHoldsTheReaderUntilTheWorkerCatchesUp) {
  Fixture fx(0, /*capacity=*/2);
  fx.sink->Block(true);  // downstream stalls
  Tensor x = Tensor::Zeros({1, 4});
  int resumed = 0;
  absl::Notification last_resumed;
  // The worker takes frame 1 and blocks in Send; frames 2 and 3 fill the
  // queue, so the third Push must not resume the reader.
  fx.host->Push(DataFrame(1, {{"x", x}, {"y", x}}), [&] { ++resumed; });
  // Wait until the worker has taken frame 1 (and is blocked in Send).
  for (int i = 0; i < 10000 && fx.host->stats().queue_depth != 0; ++i) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(fx.host->stats().queue_depth, 0u);
  fx.host->Push(DataFrame(2, {{"x", x}, {"y", x}}), [&] { ++resumed; });
  fx.host->Push(DataFrame(3, {{"x", x}, {"y", x}}),
                [&] { last_resumed.Notify(); });
  EXPECT_EQ(resumed, 2);
  EXPECT_FALSE(last_resumed.HasBeenNotified());
  EXPECT_EQ(fx.host->stats().queue_depth, 2u);
  fx.sink->Block(false);
  EXPECT_TRUE(last_resumed.WaitForNotificationWithTimeout(absl::Seconds(10)));
  EXPECT_EQ(fx.sink->Wait(3).size(), 3u);
}

}  // namespace
}  // namespace pipeserve
