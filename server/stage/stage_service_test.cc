// The stage server's gRPC layer on a real (loopback) server: who may call
// it, and what its streams do when their other end misbehaves.
#include "server/stage/stage_service.h"

#include <thread>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "server/stage/stage_spec.h"
#include "server/testing/gated_backend.h"
#include "server/transport/frame_stream.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

constexpr char kToken[] = "cluster-token-for-tests-0123456789";

// One stage server on a loopback port, holding one single-stage model
// (relu) whose results a test can subscribe to.
class StageServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    channels_ = *StageChannels::Create({{}, kToken});
    dialer_ = std::make_unique<GrpcDialer>(channels_, 4);
    StageServerOptions o;
    o.queue_capacity = 1;
    o.backend = std::make_shared<GatedBackend>(&gate_);
    core_ = std::make_unique<StageServerCore>(o, dialer_.get());
    service_ = std::make_unique<StageServiceImpl>(core_.get(), kToken);
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(service_.get());
    server_ = b.BuildAndStart();
    address_ = absl::StrCat("127.0.0.1:", port);

    GraphBuilder g;
    g.Input("x", {-1, 4}).Op("relu", {"x"}, "y").Output("y");
    spec_ = MakeStageSpecs(*Partition(g.Build().graph, {}), "m", 42, {address_}, 1)[0];
    auto load = core_->BeginLoad(spec_);
    ASSERT_TRUE(load.ok()) << load.status();
    ASSERT_TRUE((*load)->Finish().ok());
  }

  void TearDown() override {
    gate_.Set(true);
    server_->Shutdown(std::chrono::system_clock::now());
    core_.reset();
  }

  Frame Data(uint64_t id) {
    Frame f;
    f.header.set_request_id(id);
    f.Add("x", Tensor::FromVector({1, 4}, {-1, 2, -3, 4}));
    return f;
  }

  StageStatsResponse Stats() { return *core_->Stats(spec_.key()); }

  // Collects results frames.
  struct Collector {
    absl::Mutex mu;
    std::vector<uint64_t> ids ABSL_GUARDED_BY(mu);
    std::vector<Frame> frames ABSL_GUARDED_BY(mu);
    absl::Status ended ABSL_GUARDED_BY(mu);
    bool done ABSL_GUARDED_BY(mu) = false;
    void Frame_(Frame f) {
      absl::MutexLock lock(&mu);
      ids.push_back(f.header.request_id());
      frames.push_back(std::move(f));
    }
    void Done(const absl::Status& s) {
      absl::MutexLock lock(&mu);
      ended = s;
      done = true;
    }
    bool WaitFor(size_t n) {
      absl::MutexLock lock(&mu);
      auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return ids.size() >= n; };
      return mu.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(10));
    }
    bool WaitDone() {
      absl::MutexLock lock(&mu);
      auto d = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return done; };
      return mu.AwaitWithTimeout(absl::Condition(&d), absl::Seconds(10));
    }
  };

  absl::StatusOr<std::unique_ptr<ResultsSubscription>> Subscribe(Collector* c) {
    return ResultsSubscription::Start(
        channels_, address_, spec_.key(), [c](Frame f) { c->Frame_(std::move(f)); },
        [c](const absl::Status& s) { c->Done(s); }, absl::Now() + absl::Seconds(10));
  }

  Gate gate_;
  std::shared_ptr<StageChannels> channels_;
  std::unique_ptr<GrpcDialer> dialer_;
  std::unique_ptr<StageServerCore> core_;
  std::unique_ptr<StageServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  StageSpec spec_;
};

// Regression: anyone who reached a stage server's port could load stages
// (dialing any host), unload them, read stats, inject frames or take the
// results.
TEST_F(StageServiceTest, EveryCallWithoutTheClusterTokenIsUnauthenticated) {
  auto stranger = *StageChannels::Create({});
  auto stub = StageService::NewStub(stranger->To(address_));
  {
    grpc::ClientContext ctx;
    StageStatsRequest req;
    *req.mutable_key() = spec_.key();
    StageStatsResponse resp;
    EXPECT_EQ(stub->GetStageStats(&ctx, req, &resp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    UnloadStageRequest req;
    *req.mutable_key() = spec_.key();
    UnloadStageResponse resp;
    EXPECT_EQ(stub->UnloadStage(&ctx, req, &resp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("pipeserve-cluster-token", "a guess");
    LoadStageResponse resp;
    auto w = stub->LoadStage(&ctx, &resp);
    LoadStageRequest req;
    StageSpec forged = spec_;
    forged.mutable_key()->set_deployment(666);
    *req.mutable_spec() = forged;
    w->Write(req);
    w->WritesDone();
    grpc::Status s = w->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_THAT(s.error_message(), HasSubstr("only from members of their cluster"));
  }
  Collector c;
  auto sub = ResultsSubscription::Start(
      stranger, address_, spec_.key(), [&c](Frame f) { c.Frame_(std::move(f)); },
      [&c](const absl::Status& s) { c.Done(s); }, absl::Now() + absl::Seconds(10));
  EXPECT_EQ(sub.status().code(), absl::StatusCode::kUnauthenticated) << sub.status();
  // An injected frame goes nowhere.
  auto sender = FrameSender::Create(stranger, address_, spec_.key(), 4);
  sender->Send(Data(1), absl::Now() + absl::Seconds(5)).IgnoreError();
  sender->Close();
  EXPECT_EQ(Stats().frames_processed(), 0u);
  EXPECT_EQ(core_->size(), 1u);
}

TEST_F(StageServiceTest, FramesFlowFromProcessToTheResultsSubscriber) {
  Collector c;
  auto sub = Subscribe(&c);
  ASSERT_TRUE(sub.ok()) << sub.status();
  EXPECT_TRUE(Stats().results_subscribed());
  auto sender = FrameSender::Create(channels_, address_, spec_.key(), 4);
  for (uint64_t id = 1; id <= 5; ++id) {
    ASSERT_TRUE(sender->Send(Data(id), absl::Now() + absl::Seconds(5)).ok());
  }
  ASSERT_TRUE(c.WaitFor(5));
}

// Microbatches of one request queued behind a busy worker run as one and
// go back as one message, each in its own frame, over real streams.
TEST_F(StageServiceTest, JoinedMicrobatchesTravelBackAsOneMessage) {
  spec_.set_merge_rows(8);
  auto load = core_->BeginLoad(spec_);
  ASSERT_TRUE(load.ok()) << load.status();
  ASSERT_TRUE((*load)->Finish().ok());
  Collector c;
  auto sub = Subscribe(&c);
  ASSERT_TRUE(sub.ok()) << sub.status();
  auto microbatch = [](int mb) {
    Frame f;
    f.header.set_request_id(9);
    f.header.set_microbatch(mb);
    f.Add("x", Tensor::FromVector({2, 4}, {-1, 2, -3, 4, float(mb), -5, 6, -7}));
    return f;
  };
  gate_.Set(false);
  auto sender = FrameSender::Create(channels_, address_, spec_.key(), 4);
  const absl::Time later = absl::Now() + absl::Seconds(5);
  ASSERT_TRUE(sender->Send(microbatch(0), later).ok());
  ASSERT_TRUE(gate_.WaitHeld(1));
  // Three in one message: all queue at once behind the held run.
  std::vector<Frame> three = {microbatch(1), microbatch(2), microbatch(3)};
  ASSERT_TRUE(sender->SendAll(&three, later).ok());
  EXPECT_TRUE(three.empty()) << "all sent";
  for (int i = 0; i < 1000 && Stats().queue_depth() < 3; ++i) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_EQ(Stats().queue_depth(), 3u);
  const FrameReceiveStats before = GetFrameReceiveStats();
  gate_.Set(true);
  ASSERT_TRUE(c.WaitFor(4));
  const FrameReceiveStats after = GetFrameReceiveStats();
  absl::MutexLock lock(&c.mu);
  for (int mb = 0; mb < 4; ++mb) {
    const Frame& f = c.frames[mb];
    EXPECT_EQ(f.header.microbatch(), mb);
    ASSERT_EQ(f.tensors.size(), 1u);
    EXPECT_EQ(f.tensors[0].shape(), Shape({2, 4}));
    EXPECT_EQ(f.tensors[0].data()[4], float(mb)) << "its own rows";
    EXPECT_EQ(f.tensors[0].data()[5], 0.0f);
  }
  EXPECT_EQ(Stats().frames_processed(), 4u);
  EXPECT_EQ(Stats().program_runs(), 2u);
  // Back to the subscriber: microbatch 0, then the three together.
  EXPECT_EQ(after.frames - before.frames, 4u);
  EXPECT_EQ(after.messages - before.messages, 2u);
}

// Regression: a stage whose next stage's server refused the stream after
// taking frames (a pod replaced under the same name: the name now leads
// to a server where the stage is not loaded) reported no error, so the
// coordinator's health check passed and the request waited forever.
TEST_F(StageServiceTest, FramesTheNextServerRefusedAfterTakingThemAreReportedLost) {
  GraphBuilder g;
  g.Input("x", {-1, 4}).Op("relu", {"x"}, "a").Split().Op("relu", {"a"}, "y").Output("y");
  // Stage 1 is meant to be here too, but never loaded.
  const StageSpec first =
      MakeStageSpecs(*Partition(g.Build().graph, {}), "two", 43, {address_, address_}, 1)[0];
  auto load = core_->BeginLoad(first);
  ASSERT_TRUE(load.ok()) << load.status();
  ASSERT_TRUE((*load)->Finish().ok());
  auto sender = FrameSender::Create(channels_, address_, first.key(), 4);
  ASSERT_TRUE(sender->Send(Data(1), absl::Now() + absl::Seconds(5)).ok());
  auto error = [&] { return core_->Stats(first.key())->downstream_error(); };
  const absl::Time until = absl::Now() + absl::Seconds(10);
  while (error().empty() && absl::Now() < until) absl::SleepFor(absl::Milliseconds(5));
  // "frames sent to ... may be lost: ..." (the refusal came after the
  // push), or "sending to ...: ..." (before it, on a slow machine).
  EXPECT_THAT(error(), HasSubstr("stage 1 of \"two\""));
  EXPECT_THAT(error(), HasSubstr("is not loaded here"));
  EXPECT_EQ(core_->Stats(first.key())->frames_processed(), 1u);
}

// Regression: when a results subscriber hung up, the stage's sink was gone
// and the stage waited for a new one forever while health said SERVING.
TEST_F(StageServiceTest, ASubscriberThatHangsUpLeavesTheStageServingAndSaysSo) {
  auto sender = FrameSender::Create(channels_, address_, spec_.key(), 4);
  {
    Collector c;
    auto sub = Subscribe(&c);
    ASSERT_TRUE(sub.ok());
    ASSERT_TRUE(sender->Send(Data(1), absl::Now() + absl::Seconds(5)).ok());
    ASSERT_TRUE(c.WaitFor(1));
  }  // hangs up
  absl::Time until = absl::Now() + absl::Seconds(10);
  while (Stats().results_subscribed() && absl::Now() < until) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_FALSE(Stats().results_subscribed());
  // Frames made meanwhile are dropped and counted, not waited on.
  ASSERT_TRUE(sender->Send(Data(2), absl::Now() + absl::Seconds(5)).ok());
  until = absl::Now() + absl::Seconds(10);
  while (Stats().frames_undeliverable() == 0 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(Stats().frames_undeliverable(), 1u);
  EXPECT_THAT(Stats().downstream_error(), HasSubstr("no coordinator is subscribed"));
  // A new subscriber gets what comes next.
  Collector again;
  auto sub = Subscribe(&again);
  ASSERT_TRUE(sub.ok());
  ASSERT_TRUE(sender->Send(Data(3), absl::Now() + absl::Seconds(5)).ok());
  ASSERT_TRUE(again.WaitFor(1));
  until = absl::Now() + absl::Seconds(10);
  while (!Stats().downstream_error().empty() && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(Stats().downstream_error(), "") << "a good send clears the error";
}

TEST_F(StageServiceTest, ANewSubscriberEndsTheOldOnesStream) {
  Collector first, second;
  auto a = Subscribe(&first);
  ASSERT_TRUE(a.ok());
  auto b = Subscribe(&second);
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(first.WaitDone());
  auto sender = FrameSender::Create(channels_, address_, spec_.key(), 4);
  ASSERT_TRUE(sender->Send(Data(1), absl::Now() + absl::Seconds(5)).ok());
  ASSERT_TRUE(second.WaitFor(1));
  absl::MutexLock lock(&first.mu);
  EXPECT_TRUE(first.ids.empty());
}

// Regression: a malformed frame could take a stage down with it; now it
// ends only the stream that sent it.
TEST_F(StageServiceTest, AMalformedFrameEndsItsStreamOnly) {
  grpc::GenericStub stub(channels_->To(address_));
  grpc::ClientContext ctx;
  channels_->Prepare(&ctx);
  ctx.AddMetadata(kModelKey, "m");
  ctx.AddMetadata(kDeploymentKey, "42");
  ctx.AddMetadata(kStageKey, "0");
  grpc::CompletionQueue cq;
  auto call = stub.PrepareCall(&ctx, kProcessMethod, &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  std::string garbage = "\xff\xff\xff\x7f garbage";
  grpc::Slice slice(garbage.data(), garbage.size());
  grpc::ByteBuffer bb(&slice, 1);
  call->Write(bb, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(3));
  while (cq.Next(&tag, &ok) && tag != reinterpret_cast<void*>(3)) {
  }
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DATA_LOSS) << status.error_message();
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  Collector c;
  auto sub = Subscribe(&c);
  ASSERT_TRUE(sub.ok());
  auto sender = FrameSender::Create(channels_, address_, spec_.key(), 4);
  ASSERT_TRUE(sender->Send(Data(1), absl::Now() + absl::Seconds(5)).ok());
  EXPECT_TRUE(c.WaitFor(1));
}

// Regression: a stage whose incoming stream was paused (no read
// outstanding) was never freed when it was unloaded.
TEST_F(StageServiceTest, UnloadingFreesAStageWhoseReaderIsPaused) {
  std::weak_ptr<StageHost> host = core_->Find(spec_.key());
  Collector c;
  auto sub = Subscribe(&c);
  ASSERT_TRUE(sub.ok());
  gate_.Set(false);
  auto sender = FrameSender::Create(channels_, address_, spec_.key(), 1);
  // One frame held in the program, one in the queue: the reader pauses.
  for (uint64_t id = 1; id <= 4; ++id) {
    sender->Send(Data(id), absl::Now() + absl::Milliseconds(200)).IgnoreError();
  }
  ASSERT_TRUE(gate_.WaitHeld(1));
  std::thread unload([&] { EXPECT_TRUE(core_->Unload(spec_.key()).ok()); });
  absl::SleepFor(absl::Milliseconds(50));
  gate_.Set(true);  // the run in progress finishes; the stage stops
  unload.join();
  absl::Time until = absl::Now() + absl::Seconds(10);
  while (!host.expired() && absl::Now() < until) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_TRUE(host.expired()) << "something still holds the unloaded stage";
  EXPECT_EQ(core_->Find(spec_.key()), nullptr);
}

// Process and Results name the replica (pipeserve-replica metadata and
// StageKey.replica): frames for replica 1 reach replica 1 of the stage,
// and nothing reaches replica 0.
TEST_F(StageServiceTest, FramesReachTheReplicaTheirStreamNames) {
  StageSpec replica = spec_;
  replica.mutable_key()->set_replica(1);
  auto load = core_->BeginLoad(replica);
  ASSERT_TRUE(load.ok()) << load.status();
  ASSERT_TRUE((*load)->Finish().ok());
  Collector zero, one;
  auto sub0 = Subscribe(&zero);
  ASSERT_TRUE(sub0.ok()) << sub0.status();
  auto sub1 = ResultsSubscription::Start(
      channels_, address_, replica.key(), [&one](Frame f) { one.Frame_(std::move(f)); },
      [&one](const absl::Status& s) { one.Done(s); }, absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(sub1.ok()) << sub1.status();
  auto sender = FrameSender::Create(channels_, address_, replica.key(), 4);
  ASSERT_TRUE(sender->Send(Data(7), absl::Now() + absl::Seconds(5)).ok());
  ASSERT_TRUE(one.WaitFor(1));
  EXPECT_EQ(core_->Stats(replica.key())->frames_processed(), 1u);
  EXPECT_EQ(Stats().frames_processed(), 0u);
  absl::MutexLock lock(&zero.mu);
  EXPECT_TRUE(zero.ids.empty());
}

}  // namespace
}  // namespace pipeserve
