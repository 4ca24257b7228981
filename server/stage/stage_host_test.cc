#include "server/stage/stage_host.h"

#include <atomic>
#include <functional>
#include <new>
#include <set>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "runtime/cpu/cpu_backend.h"
#include "server/stage/stage_spec.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// Collects frames; can be made to block or to fail.
class FakeSink : public FrameSink {
 public:
  absl::Status Send(Frame f, absl::Time deadline) override {
    absl::MutexLock lock(&mu_);
    ++sends_;
    auto open = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !blocked_ || closed_; };
    if (!mu_.AwaitWithDeadline(absl::Condition(&open), deadline)) {
      return absl::DeadlineExceededError("blocked past the deadline");
    }
    if (closed_) return absl::UnavailableError("closed");
    if (failing_ || sends_ == fail_send_) return absl::UnavailableError("link down");
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
  void Fail(bool f) {
    absl::MutexLock lock(&mu_);
    failing_ = f;
  }
  // The n-th Send (counting from 1) fails, as a stream that broke would.
  void FailSend(int n) {
    absl::MutexLock lock(&mu_);
    fail_send_ = n;
  }
  int sends() {
    absl::MutexLock lock(&mu_);
    return sends_;
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
  bool failing_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  int sends_ ABSL_GUARDED_BY(mu_) = 0;
  int fail_send_ ABSL_GUARDED_BY(mu_) = 0;
};

// A producer that records what the host tells it.
class FakeProducer : public StageHost::Producer {
 public:
  void Resume() override { ++resumed; }
  void Stopped() override { ++stopped; }
  std::atomic<int> resumed{0}, stopped{0};
};

// Stage `stage` of: x -> relu -> a | a -> add(a, y) -> out   (y rides along)
struct Fixture {
  // Makes the program the host runs from the CPU program of the stage.
  using Wrap = std::function<std::unique_ptr<StageProgram>(std::unique_ptr<StageProgram>)>;

  Model model;
  Plan plan;
  std::shared_ptr<StageHost> host;
  std::shared_ptr<FakeSink> sink = std::make_shared<FakeSink>();

  explicit Fixture(int stage, size_t capacity = 8, int workers = 1)
      : Fixture(stage, nullptr, StageHost::Options{capacity, workers}) {}

  Fixture(int stage, const Wrap& wrap, StageHost::Options options) {
    GraphBuilder b;
    b.Input("x", {-1, 4}).Input("y", {-1, 4});
    b.Op("relu", {"x"}, "a").Split().Op("add", {"a", "y"}, "out").Output("out");
    model = b.Build();
    plan = *Partition(model.graph, {});
    StageSpec spec = MakeStageSpecs(plan, "m", 1, {"s0:1", "s1:1"}, 1)[stage];
    std::unique_ptr<StageProgram> prog =
        *MakeCpuBackend({})->Compile(plan.stages(stage).graph(), model.weights);
    if (wrap) prog = wrap(std::move(prog));
    host = std::make_shared<StageHost>(spec, std::move(prog), options);
    host->SetSink(sink);
  }
};

// A frame of `rows` rows for stage 1 (it receives a and y).
Frame StageOneFrame(uint64_t id, int64_t rows);

Frame DataFrame(uint64_t id, std::vector<std::pair<std::string, Tensor>> ts,
                int64_t deadline = 0) {
  Frame f;
  f.header.set_request_id(id);
  f.header.set_deadline_us(deadline);
  for (auto& [n, t] : ts) f.Add(n, t);
  return f;
}

Frame StageOneFrame(uint64_t id, int64_t rows) {
  return DataFrame(id, {{"a", Tensor::Zeros({rows, 4})}, {"y", Tensor::Zeros({rows, 4})}});
}

TEST(StageHostTest, ComputesAndForwardsWhatLaterStagesNeed) {
  Fixture fx(0);
  Tensor x = Tensor::FromVector({1, 4}, {-1, 2, -3, 4});
  Tensor y = Tensor::FromVector({1, 4}, {1, 1, 1, 1});
  fx.host->Push(DataFrame(7, {{"x", x}, {"y", y}}), nullptr);
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
  StageSpec spec = MakeStageSpecs(*Partition(b.Build().graph, {}), "m", 1, {"s0:1"}, 1)[0];
  auto program = std::make_unique<SlowIdentity>();
  SlowIdentity* p = program.get();
  auto sink = std::make_shared<FakeSink>();
  StageHost host(spec, std::move(program), {/*queue_capacity=*/8, /*workers=*/2});
  host.SetSink(sink);
  Tensor x = Tensor::Zeros({1, 4});
  for (uint64_t id = 1; id <= 20; ++id) host.Push(DataFrame(id, {{"x", x}}), nullptr);
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
  fx.host->Push(DataFrame(1, {{"x", x}, {"y", x}}, NowMicros() - 1000), nullptr);
  fx.host->Push(DataFrame(2, {{"x", x}, {"y", x}}), nullptr);
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
  fx.host->Push(std::move(cancel), nullptr);
  fx.host->Push(DataFrame(5, {{"x", x}, {"y", x}}), nullptr);
  fx.host->Push(DataFrame(6, {{"x", x}, {"y", x}}), nullptr);
  std::vector<Frame> got = fx.sink->Wait(2);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].header.kind(), FrameHeader::CANCEL);
  EXPECT_EQ(got[1].header.request_id(), 6u);
  EXPECT_EQ(fx.host->stats().dropped_cancelled, 1u);
}

// Frames that disagree with the stage's plan are refused on arrival: the
// request fails at once, nothing runs on them.
TEST(StageHostTest, FrameThatDoesNotMatchTheStageBecomesAnErrorFrame) {
  Fixture fx(1);
  Tensor wrong = Tensor::Zeros({2, 5});
  Tensor right = Tensor::Zeros({2, 4});
  fx.host->Push(DataFrame(3, {{"a", wrong}, {"y", wrong}}), nullptr);
  fx.host->Push(DataFrame(4, {{"a", right}}), nullptr);
  fx.host->Push(DataFrame(5, {{"a", right}, {"y", Tensor::Zeros({3, 4})}}), nullptr);
  fx.host->Push(DataFrame(6, {{"a", right}, {"z", right}}), nullptr);
  std::vector<Frame> got = fx.sink->Wait(4);
  ASSERT_EQ(got.size(), 4u);
  for (const Frame& f : got) {
    EXPECT_EQ(f.header.kind(), FrameHeader::ERROR);
    EXPECT_EQ(f.header.error_code(), int(absl::StatusCode::kInvalidArgument));
  }
  EXPECT_THAT(got[0].header.error_message(), HasSubstr("stage 1: input \"y\": shape [2,5]"));
  EXPECT_THAT(got[1].header.error_message(), HasSubstr("frame carries 1 values, the stage receives 2"));
  EXPECT_THAT(got[2].header.error_message(), HasSubstr("does not match [B,4] (batch 3)"));
  EXPECT_THAT(got[3].header.error_message(), HasSubstr("frame lacks value \"y\""));
  EXPECT_EQ(fx.host->stats().rejected, 4u);
  EXPECT_EQ(fx.host->stats().processed, 0u);
}

TEST(StageHostTest, ErrorFrameWithoutAnErrorCodeTravelsOnAsInternal) {
  Fixture fx(1);
  Frame f;
  f.header.set_kind(FrameHeader::ERROR);
  f.header.set_request_id(9);
  fx.host->Push(std::move(f), nullptr);
  std::vector<Frame> got = fx.sink->Wait(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header.error_code(), int(absl::StatusCode::kInternal));
}

// A program whose backend runs out of host memory on more than 2 rows
// (its allocation throws, as Tensor::Empty does).
class OutOfMemoryProgram : public StageProgram {
 public:
  explicit OutOfMemoryProgram(std::unique_ptr<StageProgram> inner) : inner_(std::move(inner)) {}
  absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor> in) override {
    if (in[0].dim(0) > 2) throw std::bad_alloc();
    return inner_->Run(in);
  }

 private:
  std::unique_ptr<StageProgram> inner_;
};

// Regression: std::bad_alloc from a kernel went uncaught and ended the
// stage server; the coordinator then replayed the request on each
// replacement. Now the request gets RESOURCE_EXHAUSTED and the stage serves on.
TEST(StageHostTest, AProgramOutOfMemoryFailsOnlyThatFrameWithResourceExhausted) {
  Fixture fx(
      1, [](auto inner) { return std::make_unique<OutOfMemoryProgram>(std::move(inner)); }, {});
  fx.host->Push(StageOneFrame(1, 3), nullptr);
  fx.host->Push(StageOneFrame(2, 2), nullptr);
  std::vector<Frame> got = fx.sink->Wait(2);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].header.kind(), FrameHeader::ERROR);
  EXPECT_EQ(got[0].header.error_code(), int(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(got[0].header.error_message(), HasSubstr("stage 1: out of memory"));
  EXPECT_EQ(got[1].header.kind(), FrameHeader::DATA) << "the next request is served";
}

// A program whose output claims 4 GiB: a view of a small buffer that
// nothing reads.
class HugeOutputProgram : public StageProgram {
 public:
  absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor>) override {
    auto owner = std::make_shared<std::vector<float>>(16);
    return std::vector<Tensor>{Tensor::Wrap(owner, owner->data(), {int64_t{1} << 30})};
  }
};

// A microbatch whose values to send on exceed one message fails with
// RESOURCE_EXHAUSTED at the stage that made them, instead of breaking the
// link to the next stage (whose receive limit refused the message) and
// with it every request in flight.
TEST(StageHostTest, AFrameTooLargeForOneMessageFailsItsMicrobatchOnly) {
  Fixture fx(1, [](auto) { return std::make_unique<HugeOutputProgram>(); }, {});
  fx.host->Push(StageOneFrame(1, 2), nullptr);
  std::vector<Frame> got = fx.sink->Wait(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header.kind(), FrameHeader::ERROR);
  EXPECT_EQ(got[0].header.error_code(), int(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(got[0].header.error_message(), HasSubstr("more than one message carries"));
}

// A program whose first run waits until released; later runs go through.
class HoldFirstRun : public StageProgram {
 public:
  explicit HoldFirstRun(std::unique_ptr<StageProgram> inner) : inner_(std::move(inner)) {}
  absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor> in) override {
    if (!first_.exchange(true)) {
      started.Notify();
      release.WaitForNotification();
    }
    return inner_->Run(in);
  }
  int max_concurrent_runs() const override { return 2; }
  absl::Notification started, release;

 private:
  std::unique_ptr<StageProgram> inner_;
  std::atomic<bool> first_{false};
};

// Regression: FinishHeld counted finished frames, not which: with two
// workers, a frame that arrived during the drain and finished on the second
// worker stood in for one the first still computed, and the shutdown went
// ahead with it in hand.
TEST(StageHostTest, FinishHeldWaitsForTheFramesHeldAtTheCallNotJustAsMany) {
  HoldFirstRun* held = nullptr;
  Fixture fx(
      1,
      [&held](auto inner) {
        auto program = std::make_unique<HoldFirstRun>(std::move(inner));
        held = program.get();
        return program;
      },
      StageHost::Options{8, 2});
  fx.host->Push(StageOneFrame(1, 2), nullptr);
  held->started.WaitForNotification();  // frame 1 in the first worker
  bool drained = true;
  std::thread drain([&] { drained = fx.host->FinishHeld(absl::Now() + absl::Seconds(1)); });
  absl::SleepFor(absl::Milliseconds(50));
  fx.host->Push(StageOneFrame(2, 2), nullptr);  // arrives during the drain
  EXPECT_EQ(fx.sink->Wait(1).size(), 1u) << "the second worker sent frame 2 on";
  drain.join();
  EXPECT_FALSE(drained) << "frame 1 was still being computed";
  held->release.Notify();
  EXPECT_TRUE(fx.host->FinishHeld(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(fx.sink->Wait(2).size(), 2u);
}

TEST(StageHostTest, FullQueuePausesTheProducerUntilTheWorkerCatchesUp) {
  Fixture fx(0, /*capacity=*/2);
  fx.sink->Block(true);  // downstream stalls
  Tensor x = Tensor::Zeros({1, 4});
  auto producer = std::make_shared<FakeProducer>();
  ASSERT_TRUE(fx.host->AddProducer(producer));
  // The worker takes frame 1 and blocks in Send; frames 2 and 3 fill the
  // queue, so the third Push must pause the producer.
  EXPECT_TRUE(fx.host->Push(DataFrame(1, {{"x", x}, {"y", x}}), producer));
  for (int i = 0; i < 10000 && fx.host->stats().queue_depth != 0; ++i) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(fx.host->stats().queue_depth, 0u);
  EXPECT_TRUE(fx.host->Push(DataFrame(2, {{"x", x}, {"y", x}}), producer));
  EXPECT_FALSE(fx.host->Push(DataFrame(3, {{"x", x}, {"y", x}}), producer));
  EXPECT_EQ(producer->resumed.load(), 0);
  EXPECT_EQ(fx.host->stats().queue_depth, 2u);
  fx.sink->Block(false);
  EXPECT_EQ(fx.sink->Wait(3).size(), 3u);
  EXPECT_EQ(producer->resumed.load(), 1);
}

// Regression: a second incoming stream overwrote the first one's resume
// callback, so the first stream stayed paused for good.
TEST(StageHostTest, EveryPausedProducerIsResumed) {
  Fixture fx(0, /*capacity=*/1);
  fx.sink->Block(true);
  Tensor x = Tensor::Zeros({1, 4});
  auto first = std::make_shared<FakeProducer>();
  auto second = std::make_shared<FakeProducer>();
  ASSERT_TRUE(fx.host->AddProducer(first));
  ASSERT_TRUE(fx.host->AddProducer(second));
  fx.host->Push(DataFrame(1, {{"x", x}, {"y", x}}), first);  // taken by the worker
  for (int i = 0; i < 10000 && fx.host->stats().queue_depth != 0; ++i) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_FALSE(fx.host->Push(DataFrame(2, {{"x", x}, {"y", x}}), first));
  EXPECT_FALSE(fx.host->Push(DataFrame(3, {{"x", x}, {"y", x}}), second));
  fx.sink->Block(false);
  EXPECT_EQ(fx.sink->Wait(3).size(), 3u);
  EXPECT_GE(first->resumed.load(), 1);
  EXPECT_EQ(second->resumed.load(), 1) << "the second stream must not stay paused";
}

// Regression: a failed send cleared the sink and the worker then waited
// forever for a new one; no error was reported and the stage wedged.
TEST(StageHostTest, AFailedLinkIsRetriedReportedAndUsedAgainWhenItRecovers) {
  Fixture fx(0);
  Tensor x = Tensor::Zeros({1, 4});
  fx.sink->Fail(true);
  fx.host->Push(DataFrame(1, {{"x", x}, {"y", x}}), nullptr);
  for (int i = 0; i < 10000 && fx.host->stats().undeliverable == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  StageHost::Stats s = fx.host->stats();
  EXPECT_EQ(s.undeliverable, 1u);
  EXPECT_EQ(s.downstream_error, "link down");
  EXPECT_EQ(fx.sink->sends(), 2) << "one retry on a new stream, then the frame is dropped";
  fx.sink->Fail(false);
  fx.host->Push(DataFrame(2, {{"x", x}, {"y", x}}), nullptr);
  std::vector<Frame> got = fx.sink->Wait(1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].header.request_id(), 2u);
  for (int i = 0; i < 10000 && !fx.host->stats().downstream_error.empty(); ++i) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(fx.host->stats().downstream_error, "") << "a good send clears the error";
}

TEST(StageHostTest, WithoutASinkFramesAreDroppedNotWaitedFor) {
  Fixture fx(1);
  fx.host->ClearSink(fx.sink.get());
  Tensor x = Tensor::Zeros({1, 4});
  fx.host->Push(DataFrame(1, {{"a", x}, {"y", x}}), nullptr);
  fx.host->Push(DataFrame(2, {{"a", x}, {"y", x}}), nullptr);
  for (int i = 0; i < 10000 && fx.host->stats().undeliverable < 2; ++i) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_EQ(fx.host->stats().undeliverable, 2u);
  EXPECT_EQ(fx.host->stats().downstream_error, "no coordinator is subscribed to the results");
  // A subscriber arriving later gets what comes next.
  fx.host->SetSink(fx.sink);
  fx.host->Push(DataFrame(3, {{"a", x}, {"y", x}}), nullptr);
  EXPECT_EQ(fx.sink->Wait(1).size(), 1u);
}

// Regression: a stage whose reader had no read outstanding was never freed
// after an unload; now Stop tells every producer so its stream can end.
TEST(StageHostTest, StopTellsEveryProducerOnceAndRefusesNewOnes) {
  Fixture fx(0, /*capacity=*/1);
  fx.sink->Block(true);
  auto paused = std::make_shared<FakeProducer>();
  auto idle = std::make_shared<FakeProducer>();
  ASSERT_TRUE(fx.host->AddProducer(paused));
  ASSERT_TRUE(fx.host->AddProducer(idle));
  Tensor x = Tensor::Zeros({1, 4});
  fx.host->Push(DataFrame(1, {{"x", x}, {"y", x}}), paused);
  fx.host->Push(DataFrame(2, {{"x", x}, {"y", x}}), paused);
  fx.host->Stop();  // the blocked Send is woken by the sink's Close
  fx.host->Stop();
  EXPECT_EQ(paused->stopped.load(), 1);
  EXPECT_EQ(idle->stopped.load(), 1);
  EXPECT_FALSE(fx.host->AddProducer(std::make_shared<FakeProducer>()));
  EXPECT_TRUE(fx.host->Push(DataFrame(3, {{"x", x}, {"y", x}}), paused)) << "dropped, not queued";
  EXPECT_EQ(fx.host->stats().queue_depth, 0u);
}

// Runs `inner`, recording each run's rows; the first run, and the first
// after each Rearm, waits for Open.
class GatedProgram : public StageProgram {
 public:
  // How it behaves beyond `inner`.
  struct Traits {
    // Runs of more rows fail, as a device out of memory for a large joined
    // run would (0: none do).
    int64_t fail_above_rows = 0;
    // Its prefers_few_shapes(), as the CUDA program's (a graph per shape).
    bool few_shapes = false;
  };
  GatedProgram(std::unique_ptr<StageProgram> inner, Traits traits)
      : inner_(std::move(inner)), traits_(traits) {}
  absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor> in) override {
    {
      absl::MutexLock lock(&mu_);
      rows_.push_back(in[0].dim(0));
      if (rows_.size() == gated_run_) mu_.Await(absl::Condition(&open_));
    }
    if (traits_.fail_above_rows > 0 && in[0].dim(0) > traits_.fail_above_rows) {
      return absl::ResourceExhaustedError("out of device memory");
    }
    return inner_->Run(in);
  }
  bool prefers_few_shapes() const override { return traits_.few_shapes; }
  void Open() {
    absl::MutexLock lock(&mu_);
    open_ = true;
  }
  // The next run waits for Open again.
  void Rearm() {
    absl::MutexLock lock(&mu_);
    open_ = false;
    gated_run_ = rows_.size() + 1;
  }
  // Waits until `n` runs have started.
  bool WaitRuns(size_t n) {
    absl::MutexLock lock(&mu_);
    auto started = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return rows_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&started), absl::Seconds(10));
  }
  std::vector<int64_t> rows() {
    absl::MutexLock lock(&mu_);
    return rows_;
  }

 private:
  std::unique_ptr<StageProgram> inner_;
  const Traits traits_;
  absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  size_t gated_run_ ABSL_GUARDED_BY(mu_) = 1;
  std::vector<int64_t> rows_ ABSL_GUARDED_BY(mu_);
};

// Stage 0 of the fixture's model (relu of x; y rides along) on a gated
// program that joins up to `merge_rows` rows.
struct JoinFixture {
  std::shared_ptr<StageHost> host;
  GatedProgram* program = nullptr;
  std::shared_ptr<FakeSink> sink = std::make_shared<FakeSink>();

  JoinFixture(int64_t merge_rows, std::unique_ptr<StageProgram> inner = nullptr,
              GatedProgram::Traits traits = {}) {
    GraphBuilder b;
    b.Input("x", {-1, 4}).Input("y", {-1, 4});
    b.Op("relu", {"x"}, "a").Split().Op("add", {"a", "y"}, "out").Output("out");
    Model model = b.Build();
    Plan plan = *Partition(model.graph, {});
    StageSpec spec = MakeStageSpecs(plan, "m", 1, {"s0:1", "s1:1"}, 1, 0, merge_rows)[0];
    EXPECT_EQ(spec.merge_rows(), merge_rows);
    if (inner == nullptr) {
      inner = *MakeCpuBackend({})->Compile(plan.stages(0).graph(), model.weights);
    }
    auto gated = std::make_unique<GatedProgram>(std::move(inner), traits);
    program = gated.get();
    StageHost::Options o;
    o.queue_capacity = 16;
    host = std::make_shared<StageHost>(spec, std::move(gated), o);
    host->SetSink(sink);
  }

  // Pushes `first` and, once the worker is held in its run, `queued`
  // behind it; then lets the program go and returns every frame sent on
  // so far (waiting up to 10 s for these to come out).
  std::vector<Frame> RunBehind(Frame first, std::vector<Frame> queued) {
    const size_t runs = program->rows().size();
    const size_t out = sink->Wait(0).size() + 1 + queued.size();
    program->Rearm();
    host->Push(std::move(first), nullptr);
    EXPECT_TRUE(program->WaitRuns(runs + 1));
    for (Frame& f : queued) host->Push(std::move(f), nullptr);
    program->Open();
    return sink->Wait(out);
  }
};

// Microbatch `mb` of request `id`: `rows` rows of x counting down from
// -(mb * 10) (so relu keeps some, zeroes others), y = mb.
Frame Microbatch(uint64_t id, int mb, int64_t rows, bool trace = false) {
  std::vector<float> x, y;
  for (int64_t i = 0; i < rows * 4; ++i) {
    x.push_back(static_cast<float>(mb * 10 - i));
    y.push_back(static_cast<float>(mb));
  }
  Frame f = DataFrame(id, {{"x", Tensor::FromVector({rows, 4}, x)},
                           {"y", Tensor::FromVector({rows, 4}, y)}});
  f.header.set_microbatch(mb);
  f.header.set_trace(trace);
  if (trace) f.header.set_sent_us(NowMicros());
  return f;
}

// Microbatches `from` to `to` of request `id`, `rows` rows each.
std::vector<Frame> Microbatches(uint64_t id, int from, int to, int64_t rows) {
  std::vector<Frame> out;
  for (int mb = from; mb <= to; ++mb) out.push_back(Microbatch(id, mb, rows));
  return out;
}

// Each frame out of stage 0 must carry its own microbatch's y and relu(x).
void ExpectForwardedOwnRows(const Frame& out, int mb, int64_t rows) {
  ASSERT_EQ(out.header.kind(), FrameHeader::DATA) << out.header.error_message();
  EXPECT_EQ(out.header.microbatch(), mb);
  const Tensor* a = out.Find("a");
  const Tensor* y = out.Find("y");
  ASSERT_NE(a, nullptr);
  ASSERT_NE(y, nullptr);
  ASSERT_EQ(a->shape(), Shape({rows, 4}));
  ASSERT_EQ(y->shape(), Shape({rows, 4}));
  for (int64_t i = 0; i < rows * 4; ++i) {
    EXPECT_EQ(a->data()[i], std::max(0.0f, static_cast<float>(mb * 10 - i))) << "mb " << mb;
    EXPECT_EQ(y->data()[i], static_cast<float>(mb));
  }
}

// Microbatches of one request that queue behind a busy worker are computed
// in one run, up to merge_rows rows, and leave as their own frames; a
// frame of another request is never joined with them.
TEST(StageHostTest, QueuedMicrobatchesOfOneRequestRunAsOne) {
  JoinFixture fx(/*merge_rows=*/6);
  std::vector<Frame> queued = Microbatches(7, 1, 4, 2);
  queued.push_back(Microbatch(8, 0, 2));
  queued.push_back(Microbatch(7, 5, 2));
  queued.push_back(Microbatch(7, 6, 3));
  std::vector<Frame> got = fx.RunBehind(Microbatch(7, 0, 2), std::move(queued));
  ASSERT_EQ(got.size(), 8u);
  // mb 0 alone (the worker was busy with it), mb 1-3 (6 rows), mb 4 (mb 5
  // is behind request 8's frame), request 8, mb 5 and 6 (5 rows).
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 6, 2, 2, 5}));
  const std::vector<std::pair<uint64_t, int>> order = {{7, 0}, {7, 1}, {7, 2}, {7, 3},
                                                       {7, 4}, {8, 0}, {7, 5}, {7, 6}};
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].header.request_id(), order[i].first);
    ExpectForwardedOwnRows(got[i], order[i].second, order[i].second == 6 ? 3 : 2);
  }
  StageHost::Stats s = fx.host->stats();
  EXPECT_EQ(s.processed, 8u);
  EXPECT_EQ(s.runs, 5u);
}

TEST(StageHostTest, WithoutMergeRowsEveryMicrobatchRunsAlone) {
  JoinFixture fx(/*merge_rows=*/0);
  std::vector<Frame> got = fx.RunBehind(Microbatch(7, 0, 2), Microbatches(7, 1, 3, 2));
  ASSERT_EQ(got.size(), 4u);
  for (int mb = 0; mb < 4; ++mb) ExpectForwardedOwnRows(got[mb], mb, 2);
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(fx.host->stats().runs, 4u);
}

// A replayed microbatch (a later attempt of the request) never joins
// frames of the attempt before it: each attempt is answered on its own.
TEST(StageHostTest, OnlyFramesOfOneAttemptJoin) {
  JoinFixture fx(/*merge_rows=*/8);
  auto attempt = [](Frame f, int a) {
    f.header.set_attempt(a);
    return f;
  };
  std::vector<Frame> got =
      fx.RunBehind(attempt(Microbatch(7, 0, 2), 1),
                   {attempt(Microbatch(7, 1, 2), 1), attempt(Microbatch(7, 2, 2), 2),
                    attempt(Microbatch(7, 3, 2), 2)});
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 2, 4}));
  for (int mb = 0; mb < 4; ++mb) {
    ExpectForwardedOwnRows(got[mb], mb, 2);
    EXPECT_EQ(got[mb].header.attempt(), mb < 2 ? 1 : 2);
  }
}

// A joined run takes at most 64 frames and 1 MiB of input, whatever
// merge_rows allows.
TEST(StageHostTest, AJoinedRunTakesAtMost64FramesAndOneMiB) {
  JoinFixture fx(/*merge_rows=*/1 << 20);
  std::vector<Frame> got = fx.RunBehind(Microbatch(7, 0, 2), Microbatches(7, 1, 70, 1));
  ASSERT_EQ(got.size(), 71u);
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 64, 6}));
  for (int mb = 0; mb <= 70; ++mb) ExpectForwardedOwnRows(got[mb], mb, mb == 0 ? 2 : 1);
  // Frames of 512 KiB (x and y, 16384 rows of 4 floats each): two join.
  got = fx.RunBehind(Microbatch(8, 0, 2), Microbatches(8, 1, 3, 16384));
  ASSERT_EQ(got.size(), 75u);
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 64, 6, 2, 32768, 16384}));
  for (int mb = 1; mb <= 3; ++mb) {
    EXPECT_EQ(got[71 + mb].header.microbatch(), mb);
    EXPECT_EQ(got[71 + mb].Find("a")->shape(), Shape({16384, 4}));
  }
}

// A traced microbatch that ran joined still carries its own transfer and
// queue spans, and the shared run as its compute span.
TEST(StageHostTest, JoinedMicrobatchesKeepTheirOwnSpans) {
  JoinFixture fx(/*merge_rows=*/8);
  std::vector<Frame> got = fx.RunBehind(Microbatch(7, 0, 2, /*trace=*/true),
                                        {Microbatch(7, 1, 2, true), Microbatch(7, 2, 2, true)});
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 4}));
  for (int mb = 0; mb < 3; ++mb) {
    std::set<std::string> what;
    for (const TraceSpan& span : got[mb].header.spans()) {
      EXPECT_EQ(span.microbatch(), mb);
      what.insert(span.what());
    }
    EXPECT_EQ(what, (std::set<std::string>{"transfer", "queue", "compute"}));
  }
  const auto compute = [](const Frame& f) {
    for (const TraceSpan& span : f.header.spans()) {
      if (span.what() == "compute") return span.start_us();
    }
    return int64_t{-1};
  };
  EXPECT_EQ(compute(got[1]), compute(got[2]));
}

// Returns one row whatever it is given: its output does not follow the
// batch, so a joined run cannot be split back.
class OneRow : public StageProgram {
 public:
  absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor> in) override {
    return std::vector<Tensor>{in[0].SliceRows(0, 1)};
  }
};

TEST(StageHostTest, AJoinedRunWhoseOutputLostTheRowsIsDoneAgainFrameByFrame) {
  JoinFixture fx(/*merge_rows=*/8, std::make_unique<OneRow>());
  std::vector<Frame> got = fx.RunBehind(Microbatch(7, 0, 1), Microbatches(7, 1, 2, 2));
  ASSERT_EQ(got.size(), 3u);
  // The joined run (4 rows) gave 1 row: mb 1 and 2 ran again alone.
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{1, 4, 2, 2}));
  for (int mb = 0; mb < 3; ++mb) {
    EXPECT_EQ(got[mb].header.microbatch(), mb);
    ASSERT_EQ(got[mb].header.kind(), FrameHeader::DATA);
    EXPECT_EQ(got[mb].Find("a")->dim(0), 1);
    EXPECT_EQ(got[mb].Find("y")->dim(0), mb == 0 ? 1 : 2) << "y rides along whole";
  }
  EXPECT_EQ(fx.host->stats().runs, 4u);
  // Having seen that, the stage joins no more: queued microbatches run
  // alone at once instead of a joined run and then each again.
  ASSERT_EQ(fx.RunBehind(Microbatch(9, 0, 1), Microbatches(9, 1, 2, 2)).size(), 6u);
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{1, 4, 2, 2, 1, 2, 2}));
}

TEST(StageHostTest, AJoinedRunThatFailsIsDoneAgainFrameByFrame) {
  GatedProgram::Traits out_of_memory;
  out_of_memory.fail_above_rows = 2;
  JoinFixture fx(/*merge_rows=*/8, nullptr, out_of_memory);
  std::vector<Frame> got = fx.RunBehind(Microbatch(7, 0, 2), Microbatches(7, 1, 3, 2));
  ASSERT_EQ(got.size(), 4u);
  // The joined run of 6 rows failed; each microbatch then got its answer.
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 6, 2, 2, 2}));
  for (int mb = 0; mb < 4; ++mb) ExpectForwardedOwnRows(got[mb], mb, 2);
}

// For a program that prefers few shapes (as the CUDA one does) a stage
// joins only microbatches of equal rows, a power of two of them: few run
// sizes, so its shape cache holds them all.
TEST(StageHostTest, AProgramThatPrefersFewShapesJoinsPowersOfTwoOfEqualMicrobatches) {
  GatedProgram::Traits like_cuda;
  like_cuda.few_shapes = true;
  JoinFixture fx(/*merge_rows=*/64, nullptr, like_cuda);
  // 7 queued behind mb 0: 4 of them run together (8 rows), then 2, then 1.
  std::vector<Frame> got = fx.RunBehind(Microbatch(7, 0, 2), Microbatches(7, 1, 7, 2));
  ASSERT_EQ(got.size(), 8u);
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 8, 4, 2}));
  for (int mb = 0; mb < 8; ++mb) ExpectForwardedOwnRows(got[mb], mb, 2);
  // A microbatch of other rows ends the group.
  got = fx.RunBehind(Microbatch(8, 0, 2),
                     {Microbatch(8, 1, 2), Microbatch(8, 2, 3), Microbatch(8, 3, 3)});
  ASSERT_EQ(got.size(), 12u);
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 8, 4, 2, 2, 2, 6}));
  for (int mb = 0; mb < 4; ++mb) ExpectForwardedOwnRows(got[8 + mb], mb, mb < 2 ? 2 : 3);
}

// Regression: when a stream broke partway through a joined group, the
// retry sent the group again from its first frame, and the frames the
// sink had already taken went twice (the coordinator fails a request on
// a microbatch that comes back twice).
TEST(StageHostTest, ARetryAfterAPartialSendSendsOnlyTheRest) {
  JoinFixture fx(/*merge_rows=*/8);
  fx.sink->FailSend(3);  // mb 0's send, mb 1's, then mb 2's fails once
  std::vector<Frame> got = fx.RunBehind(Microbatch(7, 0, 2), Microbatches(7, 1, 3, 2));
  absl::SleepFor(absl::Milliseconds(50));  // a duplicate would follow at once
  got = fx.sink->Wait(4);
  ASSERT_EQ(got.size(), 4u);
  for (int mb = 0; mb < 4; ++mb) ExpectForwardedOwnRows(got[mb], mb, 2);
  EXPECT_EQ(fx.program->rows(), (std::vector<int64_t>{2, 6}));
  EXPECT_EQ(fx.sink->sends(), 5);
  StageHost::Stats st = fx.host->stats();
  EXPECT_EQ(st.frames_out, 4u);
  EXPECT_EQ(st.undeliverable, 0u);
}

// A value that does not follow the batch (here: y is replicated to every
// microbatch) keeps a stage from joining rows.
TEST(StageHostTest, AStageReceivingAnUnbatchedValueNeverJoins) {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Input("y", {1, 4});
  b.Op("relu", {"x"}, "a").Split().Op("add", {"a", "y"}, "out").Output("out");
  Model model = b.Build();
  Plan plan = *Partition(model.graph, {});
  for (const StageSpec& spec : MakeStageSpecs(plan, "m", 1, {"s0:1", "s1:1"}, 1, 0, 64)) {
    EXPECT_EQ(spec.merge_rows(), 0) << "stage " << spec.key().stage();
  }
  GraphBuilder c;
  c.Input("x", {-1, 4}).Op("relu", {"x"}, "a").Split().Op("relu", {"a"}, "out").Output("out");
  for (const StageSpec& spec :
       MakeStageSpecs(*Partition(c.Build().graph, {}), "m", 1, {"s0:1", "s1:1"}, 1, 0, 64)) {
    EXPECT_EQ(spec.merge_rows(), 64) << "stage " << spec.key().stage();
  }
}

}  // namespace
}  // namespace pipeserve
