#include "server/stage/stage_server_core.h"

#include <unistd.h>

#include <atomic>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "absl/synchronization/notification.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "runtime/model_file.h"
#include "server/stage/stage_spec.h"
#include "server/testing/gated_backend.h"
#include "server/testing/proc_status.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// Frames dialed to another server land here.
class RecordingDialer : public Dialer {
 public:
  std::shared_ptr<FrameSink> Dial(const std::string& address, const StageKey& key) override {
    dialed.push_back(address);
    return nullptr;
  }
  std::vector<std::string> dialed;
};

struct Fixture {
  Model model;
  std::vector<StageSpec> specs;
  RecordingDialer dialer;
  StageServerCore core;

  explicit Fixture(StageServerOptions options = {}) : core(options, &dialer) {
    GraphBuilder b;
    b.Input("x", {-1, 4}).Param("w", {4, 4});
    b.Op("mm", {"x", "w"}, "h").Split().Op("relu", {"h"}, "y").Output("y");
    model = b.Build();
    Plan plan = *Partition(model.graph, {});
    specs = MakeStageSpecs(plan, "m", 7, {"next-0:9000", "next-1:9000"}, 1);
    // The CRC a stage checks weights against.
    for (StageSpec& s : specs) {
      for (TensorInfo& p : *s.mutable_stage()->mutable_graph()->mutable_params()) {
        const Tensor& t = model.weights.at(p.fqn());
        p.set_crc32(Crc32(t.data(), t.byte_size()));
      }
    }
  }

  absl::Status Load(const StageSpec& spec) {
    auto load = core.BeginLoad(spec);
    if (!load.ok()) return load.status();
    for (const TensorInfo& p : spec.stage().graph().params()) {
      const Tensor& t = model.weights.at(p.fqn());
      WeightChunk c;
      c.set_fqn(p.fqn());
      c.set_data(reinterpret_cast<const char*>(t.data()), t.byte_size());
      absl::Status s = (*load)->AddChunk(c);
      if (!s.ok()) return s;
    }
    return (*load)->Finish();
  }
};

void ExpectInvalid(const absl::Status& s, const std::string& text) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(text));
}

// Two replicas of one stage on one server are two stages: unloading one
// leaves the other, and each has its own fingerprint.
TEST(StageServerCoreTest, ReplicasOfAStageAreSeparateStages) {
  Fixture fx;
  StageSpec second = fx.specs[0];
  second.mutable_key()->set_replica(1);
  second.set_fingerprint(StageFingerprint(second));
  EXPECT_NE(second.fingerprint(), fx.specs[0].fingerprint());
  ASSERT_TRUE(fx.Load(fx.specs[0]).ok());
  ASSERT_TRUE(fx.Load(second).ok());
  EXPECT_EQ(fx.core.size(), 2u);
  EXPECT_TRUE(fx.core.Unload(fx.specs[0].key()).ok());
  EXPECT_TRUE(fx.core.Stats(second.key()).ok());
  EXPECT_EQ(fx.core.Stats(fx.specs[0].key()).status().code(), absl::StatusCode::kNotFound);
  StageSpec bad = fx.specs[0];
  bad.mutable_key()->set_replica(64);
  ExpectInvalid(fx.core.BeginLoad(bad).status(), "replica 64 is not in 0..63");
  bad.mutable_key()->set_replica(-1);
  ExpectInvalid(fx.core.BeginLoad(bad).status(), "replica -1 is not in 0..63");
}

TEST(StageServerCoreTest, LoadsStatsAndUnloads) {
  Fixture fx;
  ASSERT_TRUE(fx.Load(fx.specs[0]).ok());
  EXPECT_EQ(fx.dialer.dialed, std::vector<std::string>({"next-1:9000"}));
  auto stats = fx.core.Stats(fx.specs[0].key());
  ASSERT_TRUE(stats.ok());
  EXPECT_FALSE(stats->last_stage());
  EXPECT_TRUE(fx.core.Unload(fx.specs[0].key()).ok());
  EXPECT_EQ(fx.core.Unload(fx.specs[0].key()).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(fx.core.size(), 0u);
}

// Regression: a weight of shape [2^53, 512] claiming 0 bytes passed, and a
// CPU stage server then wrote out of bounds transposing it.
TEST(StageServerCoreTest, AWeightWhoseSizeOverflowsIsRefused) {
  Fixture fx;
  StageSpec spec = fx.specs[0];
  TensorInfo* w = spec.mutable_stage()->mutable_graph()->mutable_params(0);
  w->clear_shape();
  w->add_shape(int64_t{1} << 53);
  w->add_shape(512);
  w->set_byte_size(0);
  ExpectInvalid(fx.core.BeginLoad(spec).status(),
                "parameter \"w\": shape [9007199254740992,512] needs more than 2^62 bytes");
}

// Regression: LoadStage dialed any next_address it was given (request
// forgery), including gRPC's other schemes.
TEST(StageServerCoreTest, NextAddressMustBeAHostAndPort) {
  Fixture fx;
  for (const char* bad : {"unix:/var/run/docker.sock", "ipv4:10.0.0.1:80,10.0.0.2:80",
                          "http://evil:80", "host", "host:0", "host:99999", "a b:80"}) {
    StageSpec spec = fx.specs[0];
    spec.set_next_address(bad);
    EXPECT_EQ(fx.core.BeginLoad(spec).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  StageSpec last_with_next = fx.specs[1];
  last_with_next.set_next_address("x:1");
  ExpectInvalid(fx.core.BeginLoad(last_with_next).status(), "the last stage has a next_address");
  EXPECT_TRUE(fx.dialer.dialed.empty());
}

TEST(StageServerCoreTest, SpecFieldsAreChecked) {
  Fixture fx;
  StageSpec s = fx.specs[0];
  s.mutable_key()->set_model("../etc");
  ExpectInvalid(fx.core.BeginLoad(s).status(), "bad model name");
  s = fx.specs[0];
  s.mutable_key()->set_stage(5);
  ExpectInvalid(fx.core.BeginLoad(s).status(), "stage 5 is not in 0..1");
  s = fx.specs[0];
  s.set_threads(100000);
  ExpectInvalid(fx.core.BeginLoad(s).status(), "threads 100000");
  s = fx.specs[0];
  s.mutable_receives(0)->set_name("other");
  ExpectInvalid(fx.core.BeginLoad(s).status(), "reads \"x\" but does not receive it");
  s = fx.specs[0];
  s.mutable_stage()->mutable_graph()->mutable_nodes(0)->set_op("system");
  ExpectInvalid(fx.core.BeginLoad(s).status(), "unknown op \"system\"");
}

TEST(StageServerCoreTest, ChunksAreCheckedAgainstTheWeights) {
  Fixture fx;
  auto load = fx.core.BeginLoad(fx.specs[0]);
  ASSERT_TRUE(load.ok());
  WeightChunk c;
  c.set_fqn("w");
  c.set_offset(60);
  c.set_data(std::string(8, 'x'));
  ExpectInvalid((*load)->AddChunk(c), "runs past its 64 bytes");
  c.set_offset(uint64_t{0} - 4);  // offset + size wraps around
  ExpectInvalid((*load)->AddChunk(c), "runs past its 64 bytes");
  c.set_fqn("stranger");
  ExpectInvalid((*load)->AddChunk(c), "which the stage does not hold");
  EXPECT_EQ((*load)->Finish().code(), absl::StatusCode::kDataLoss) << "nothing arrived whole";
}

// Regression: BeginLoad allocated every weight its spec named before any
// byte arrived, so a spec alone could make a stage server reserve any
// amount of memory (and a client that then sent nothing kept it).
TEST(StageServerCoreTest, AWeightIsAllocatedWhenItsBytesStartArrivingNotBefore) {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Param("w", {4});
  b.Op("relu", {"w"}, "rw").Op("relu", {"x"}, "y").Output("y").Output("rw");
  Model m = b.Build();
  StageSpec spec = MakeStageSpecs(*Partition(m.graph, {}), "m", 7, {"s:1"}, 1)[0];
  TensorInfo* w = spec.mutable_stage()->mutable_graph()->mutable_params(0);
  w->set_shape(0, int64_t{1} << 30);  // 4 GiB of float32
  w->set_byte_size(uint64_t{4} << 30);
  RecordingDialer dialer;
  StageServerCore core({}, &dialer);
  const int64_t before = ProcStatus(::getpid(), "VmSize");  // KiB
  auto load = core.BeginLoad(spec);
  ASSERT_TRUE(load.ok()) << load.status();
  EXPECT_LT(ProcStatus(::getpid(), "VmSize") - before, 512 << 10) << "4 GiB reserved before a byte of it came";
  WeightChunk c;
  c.set_fqn("w");
  c.set_offset(1024);
  c.set_data(std::string(16, 'x'));
  ExpectInvalid((*load)->AddChunk(c), "chunk of \"w\" at offset 1024; expected 0");
}

// Loads in progress hold places too. Regression: they were not counted, so
// any number could hold their weights at once.
TEST(StageServerCoreTest, HoldsOrLoadsAtMostMaxStages) {
  RecordingDialer dialer;
  StageServerOptions o;
  o.max_stages = 1;
  StageServerCore core(o, &dialer);
  Fixture fx;
  StageSpec other = fx.specs[1];
  other.mutable_key()->set_deployment(8);
  auto first = core.BeginLoad(fx.specs[1]);
  ASSERT_TRUE(first.ok());
  auto beside = core.BeginLoad(other);
  EXPECT_EQ(beside.status().code(), absl::StatusCode::kResourceExhausted) << beside.status();
  first->reset();  // abandoned: its place frees
  first = core.BeginLoad(fx.specs[1]);
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE((*first)->Finish().ok());
  EXPECT_EQ(core.BeginLoad(other).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(core.BeginLoad(fx.specs[1]).ok()) << "reloading a held key is fine";
}

TEST(StageServerCoreTest, OnlyTheLastStageHasResults) {
  Fixture fx;
  ASSERT_TRUE(fx.Load(fx.specs[0]).ok());
  EXPECT_EQ(fx.core.SubscribeResults(fx.specs[0].key(), nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(fx.core.SubscribeResults(fx.specs[1].key(), nullptr).code(),
            absl::StatusCode::kNotFound);
}

// A graceful shutdown finishes the frames a stage holds. Regression:
// FinishQueued aimed at the frames done plus those queued, leaving out the
// one in the worker, and counted a frame done before it was sent on, so a
// stage server leaving on SIGTERM could drop its last frame (the test
// asserted only ">= 2" of 3).
TEST(StageServerCoreTest, FinishQueuedWaitsUntilEveryFrameHeldAtTheCallIsSentOn) {
  Gate gate;
  StageServerOptions options;
  options.backend = std::make_shared<GatedBackend>(&gate);
  options.queue_capacity = 4;
  Fixture fx(options);
  const StageKey& key = fx.specs[1].key();
  ASSERT_TRUE(fx.Load(fx.specs[1]).ok());
  // Takes every frame, but holds the send of microbatch 2 until released.
  struct Collect : FrameSink {
    absl::Status Send(Frame f, absl::Time) override {
      if (f.header.microbatch() == 2) release.WaitForNotification();
      ++frames;
      return absl::OkStatus();
    }
    void Close() override {}
    std::atomic<int> frames{0};
    absl::Notification release;
  };
  auto results = std::make_shared<Collect>();
  ASSERT_TRUE(fx.core.SubscribeResults(key, results).ok());
  gate.Set(false);
  std::shared_ptr<FrameSink> in = fx.core.OpenInput(key);
  for (int m = 0; m < 3; ++m) {
    Frame f;
    f.header.set_request_id(1);
    f.header.set_microbatch(m);
    f.Add(fx.specs[1].receives(0).name(), Tensor::Zeros({2, 4}));
    ASSERT_TRUE(in->Send(std::move(f), absl::Now() + absl::Seconds(5)).ok());
  }
  ASSERT_TRUE(gate.WaitHeld(1));  // frame 0 in the worker, 1 and 2 queued
  EXPECT_FALSE(fx.core.FinishQueued(absl::Now() + absl::Milliseconds(50)));
  gate.Set(true);
  // Frames 0 and 1 go through; frame 2 is computed but not yet sent on,
  // so it is still held.
  EXPECT_FALSE(fx.core.FinishQueued(absl::Now() + absl::Milliseconds(300)));
  results->release.Notify();
  EXPECT_TRUE(fx.core.FinishQueued(absl::Now() + absl::Seconds(10)));
  EXPECT_EQ(results->frames.load(), 3) << "every frame held at the call was sent on";
}

}  // namespace
}  // namespace pipeserve
