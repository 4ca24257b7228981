// The coordinator's core against stage servers running in this process
// (InProcessStages): the request pipeline, uploads and their limits,
// health, repair, and the failure paths (a stage that stops, a link that
// breaks, a results stream taken over, frames no stage should send).
#include "server/coordinator/core.h"

#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <tuple>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "common/status_macros.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/model_file.h"
#include "server/coordinator/in_process_stages.h"
#include "server/coordinator/trace.h"
#include "server/stage/stage_spec.h"
#include "server/testing/gated_backend.h"
#include "server/testing/temp_dir.h"
#include "server/testing/upload.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// x -> [mm w_i, relu] per stage -> ... -> h - y   (y rides to the end)
Model Mlp(int stages, int width = 8, uint32_t seed = 1) {
  GraphBuilder b(seed);
  b.Input("x", {-1, width}).Input("y", {-1, width});
  std::string h = "x";
  for (int i = 0; i < stages; ++i) {
    if (i > 0) b.Split();
    std::string w = absl::StrCat("w", i);
    b.Param(w, {width, width});
    b.Op("mm", {h, w}, absl::StrCat("m", i)).Op("relu", {absl::StrCat("m", i)}, absl::StrCat("h", i));
    h = absl::StrCat("h", i);
  }
  b.Op("sub", {h, "y"}, "out").Output("out");
  return b.Build();
}

Tensor Ramp(Shape shape, float scale) {
  Tensor t = Tensor::Empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = scale * static_cast<float>(i % 17 - 8);
  return t;
}

class CoordinatorTest : public ::testing::Test {
 protected:
  static constexpr int kServers = 4;

  void SetUp() override { Start(); }

  // Stage servers computing on `backend` (null: a GatedBackend on gate_)
  // and a coordinator over a new store.
  void Start(CoordinatorOptions options = Options(),
             std::shared_ptr<ComputeBackend> backend = nullptr) {
    StageServerOptions so;
    so.queue_capacity = 1;
    so.backend = backend != nullptr ? std::move(backend) : std::make_shared<GatedBackend>(&gate_);
    stages_ = std::make_unique<InProcessStages>(so);
    for (const std::string& address : Addresses()) stages_->AddServer(address);
    repo_ = TestTempDir("repo");
    Restart(options);
  }

  // A new coordinator over the same store and stage servers (the old one,
  // if any, goes first).
  void Restart(CoordinatorOptions options) {
    coordinator_.reset();
    coordinator_ = std::make_unique<Coordinator>(options, *OpenFileModelStore(repo_),
                                                 MakeStaticLauncher(Addresses()), stages_.get());
    coordinator_->LoadStoredModels();
  }

  static std::vector<std::string> Addresses() {
    std::vector<std::string> addresses;
    for (int i = 0; i < kServers; ++i) addresses.push_back(absl::StrCat("s", i, ":9000"));
    return addresses;
  }

  void TearDown() override {
    gate_.Set(true);
    coordinator_.reset();
    stages_.reset();
  }

  static CoordinatorOptions Options() {
    CoordinatorOptions o;
    o.health_interval = absl::Milliseconds(50);
    o.default_timeout = absl::Seconds(20);
    return o;
  }

  std::string Write(const Model& m) {
    std::string path = TestTempDir("model") + "/model.psm";
    EXPECT_TRUE(WriteModelFile(path, m.graph, m.weights).ok());
    return path;
  }

  absl::StatusOr<UploadResponse> Upload(const std::string& name, const Model& m,
                                        UploadOptions options = {}) {
    return UploadModel(*coordinator_, name, m, options);
  }

  absl::StatusOr<std::vector<Tensor>> Infer(const std::string& name, std::vector<Tensor> in,
                                            absl::Duration timeout = absl::Seconds(20)) {
    auto d = coordinator_->Find(name);
    if (!d.ok()) return d.status();
    return (*d)->Infer(in, RequestOptions{absl::Now() + timeout});
  }

  // What the model computes: its whole graph as one CPU program, cut
  // nowhere (its split markers ignored) and in one batch, as seed_test's
  // oracle. (It was the same cuts and microbatches as the system under
  // test, run by LocalPipeline.)
  static std::vector<Tensor> Expected(const Model& m, const std::vector<Tensor>& in) {
    auto program = MakeCpuBackend({})->Compile(m.graph, m.weights);
    EXPECT_TRUE(program.ok()) << program.status();
    absl::StatusOr<std::vector<Tensor>> out = (*program)->Run(in);
    EXPECT_TRUE(out.ok()) << out.status();
    return *std::move(out);
  }

  static void ExpectEqual(const Tensor& a, const Tensor& b) {
    ASSERT_EQ(a.shape(), b.shape());
    for (int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(a.data()[i], b.data()[i]) << i;
  }

  // Loaded stages across every server.
  int StagesLoaded() {
    int n = 0;
    for (int i = 0; i < kServers; ++i) {
      if (auto s = stages_->Server(absl::StrCat("s", i, ":9000"))) n += static_cast<int>(s->size());
    }
    return n;
  }

  // Polls until the model is READY again (after a repair).
  bool WaitReady(const std::string& name, absl::Duration limit = absl::Seconds(20)) {
    absl::Time until = absl::Now() + limit;
    while (absl::Now() < until) {
      auto info = coordinator_->GetModel(name);
      if (info.ok() && info->state == ModelState::kReady) return true;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return false;
  }

  // Uploads `m` to a coordinator that keeps its stages on exit, restarts
  // it, and expects the stages adopted: same deployment, no weight sent
  // again, every replica serving, the right answer.
  void ExpectAdoptedAfterRestart(const Model& m, const UploadOptions& options) {
    CoordinatorOptions o = Options();
    o.keep_stages_on_exit = true;
    TearDown();
    Start(o);
    ASSERT_TRUE(Upload("mlp", m, options).ok());
    const ModelInfo before = *coordinator_->GetModel("mlp");
    const int stages = static_cast<int>(before.servers.size());
    coordinator_.reset();
    EXPECT_EQ(StagesLoaded(), stages) << "kept for the next coordinator";
    const int loads = stages_->load_calls();
    Restart(o);
    EXPECT_EQ(coordinator_->adopted_models(), 1);
    EXPECT_EQ(stages_->load_calls(), loads) << "no weight was sent again";
    const ModelInfo after = *coordinator_->GetModel("mlp");
    EXPECT_EQ(after.deployment, before.deployment);
    EXPECT_EQ(after.ready_replicas, before.replicas);
    EXPECT_EQ(StagesLoaded(), stages);
    std::vector<Tensor> in = {Ramp({5, 8}, 1), Ramp({5, 8}, 2)};
    auto out = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(20));
    ASSERT_TRUE(out.ok()) << out.status();
    ExpectEqual((*out)[0], Expected(m, in)[0]);
  }

  bool RepairedDuringAnUpload(const std::vector<std::string>& first, const std::string& uploading,
                              const std::string& watched);

  Gate gate_;
  std::unique_ptr<InProcessStages> stages_;
  std::string repo_;
  std::unique_ptr<Coordinator> coordinator_;
};

// Lane 0 of a 2-stage model in 2 lanes broke; the launcher's list shifted
// (a DNS name lost b, and c moved up): lane 0 must not take lane 1's c.
TEST(ServersForBrokenLanesTest, ABrokenLaneNeverTakesAServingLanesServers) {
  ModelInfo info;
  info.servers = {"a", "b", "c", "d"};
  auto free = ServersForBrokenLanes(info, {0}, 2, {"a", "c", "d", "e"});
  ASSERT_TRUE(free.ok()) << free.status();
  EXPECT_THAT(*free, ElementsAre("a", "e"));
  auto short_of = ServersForBrokenLanes(info, {0}, 2, {"a", "c", "d"});
  EXPECT_THAT(std::string(short_of.status().message()),
              HasSubstr("waiting for 2 stage servers no serving lane uses (1 now)"));
  // The static launcher's wrap (4 servers for 8 stages): by position.
  info.servers = {"a", "b", "c", "d", "a", "b", "c", "d"};
  auto wrapped = ServersForBrokenLanes(info, {1}, 4, {"a", "b", "c", "d", "a", "b", "c", "d"});
  ASSERT_TRUE(wrapped.ok());
  EXPECT_THAT(*wrapped, ElementsAre("a", "b", "c", "d"));
}

TEST_F(CoordinatorTest, RequestsThroughFourStagesMatchTheUnsplitModel) {
  Model m = Mlp(4);
  auto up = Upload("mlp", m);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(up->num_stages(), 4);
  std::vector<Tensor> in = {Ramp({37, 8}, 0.25f), Ramp({37, 8}, -0.5f)};
  auto out = Infer("mlp", in);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
  EXPECT_EQ(StagesLoaded(), 4);
}

// Regression: a batch of 0 rows sent no microbatch, so nothing ever
// completed the request and it waited out its whole deadline.
TEST_F(CoordinatorTest, BatchOfZeroRowsAnswersAtOnceWithEmptyOutputs) {
  ASSERT_TRUE(Upload("mlp", Mlp(2)).ok());
  absl::Time start = absl::Now();
  auto out = Infer("mlp", {Tensor::Zeros({0, 8}), Tensor::Zeros({0, 8})}, absl::Seconds(30));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  ASSERT_EQ(out->size(), 1u);
  EXPECT_EQ((*out)[0].shape(), (Shape{0, 8}));
}

// Regression: Send blocked with no deadline while stage 0 was full, so a
// request outlived its deadline behind a wedged stage.
TEST_F(CoordinatorTest, DeadlinePassingWhileStageZeroIsFullIsDeadlineExceeded) {
  UploadOptions eight;
  eight.set_microbatches(8);
  ASSERT_TRUE(Upload("mlp", Mlp(2), eight).ok());
  gate_.Set(false);  // every stage stops computing
  absl::Time start = absl::Now();
  auto out = Infer("mlp", {Ramp({64, 8}, 1), Ramp({64, 8}, 1)}, absl::Seconds(1));
  absl::Duration took = absl::Now() - start;
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded) << out.status();
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("while stage 0 was full"));
  EXPECT_LT(took, absl::Seconds(4));
  gate_.Set(true);
  auto again = Infer("mlp", {Ramp({4, 8}, 1), Ramp({4, 8}, 1)});
  EXPECT_TRUE(again.ok()) << again.status();
}

// The last stage's results sink, as a stranger with access to the stage
// server would reach it.
std::shared_ptr<FrameSink> ResultsSink(InProcessStages& stages, const ModelInfo& info) {
  StageKey key;
  key.set_model(info.name);
  key.set_deployment(info.deployment);
  key.set_stage(static_cast<int>(info.servers.size()) - 1);
  std::shared_ptr<StageHost> host = stages.Server(info.servers.back())->Find(key);
  std::shared_ptr<FrameSink> sink = host->SetSink(nullptr);
  host->SetSink(sink);
  return sink;
}

// Regression: an ERROR frame with error_code 0 built an OK status, and the
// coordinator then merged microbatches that never arrived (a crash).
TEST_F(CoordinatorTest, FramesNoStageShouldSendFailTheRequestNotTheCoordinator) {
  ASSERT_TRUE(Upload("mlp", Mlp(2)).ok());
  auto info = coordinator_->GetModel("mlp");
  std::shared_ptr<FrameSink> results = ResultsSink(*stages_, *info);
  gate_.Set(false);
  auto run = [&](absl::StatusOr<std::vector<Tensor>>* out) {
    *out = Infer("mlp", {Ramp({8, 8}, 1), Ramp({8, 8}, 1)});
  };
  struct Case {
    FrameHeader header;
    std::vector<std::pair<std::string, Tensor>> tensors;
    const char* expect;
  };
  std::vector<Case> cases(3);
  cases[0].header.set_kind(FrameHeader::ERROR);  // error_code 0
  cases[0].expect = "without an error code";
  cases[1].header.set_kind(FrameHeader::DATA);  // no tensors at all
  cases[1].expect = "came back with 0 tensors, the model has 1 outputs";
  cases[2].header.set_kind(FrameHeader::DATA);
  cases[2].tensors = {{"out", Tensor::Zeros({3, 8})}};  // 3 rows where 2 were due
  cases[2].expect = "came back with \"out\" [3,8] where output \"out\" [B,8] was due (2 rows)";
  uint64_t id = 1;
  for (const Case& c : cases) {
    absl::StatusOr<std::vector<Tensor>> out;
    std::thread t(run, &out);
    ASSERT_TRUE(gate_.WaitHeld(1));  // the request is in flight
    Frame f;
    f.header = c.header;
    f.header.set_request_id(id++);
    f.header.set_attempt(1);  // microbatch 0's first (and only) attempt
    for (const auto& [name, tensor] : c.tensors) f.Add(name, tensor);
    ASSERT_TRUE(results->Send(std::move(f), absl::InfiniteFuture()).ok());
    t.join();
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInternal) << out.status();
    EXPECT_THAT(std::string(out.status().message()), HasSubstr(c.expect));
    // Drain the request's real frames: a request behind them completes
    // only once they have passed (each stage is first in, first out).
    gate_.Set(true);
    ASSERT_TRUE(Infer("mlp", {Ramp({8, 8}, 1), Ramp({8, 8}, 1)}).ok());
    ++id;
    gate_.Set(false);
  }
  gate_.Set(true);
  // A frame for a request that is not in flight is counted and dropped.
  Frame stray;
  stray.header.set_request_id(999);
  ASSERT_TRUE(results->Send(std::move(stray), absl::InfiniteFuture()).ok());
  EXPECT_GE((*coordinator_->Find("mlp"))->stray_frames(), 1u);
  auto again = Infer("mlp", {Ramp({4, 8}, 1), Ramp({4, 8}, 1)});
  EXPECT_TRUE(again.ok()) << again.status();
}

// Regression (results takeover): a stranger subscribing to the last
// stage's results took every user's outputs, and when it hung up the stage
// wedged. Now the coordinator sees its subscription end, fails what was in
// flight, and redeploys.
TEST_F(CoordinatorTest, LosingTheResultsSubscriptionIsRepaired) {
  ASSERT_TRUE(Upload("mlp", Mlp(2)).ok());
  auto info = coordinator_->GetModel("mlp");
  StageKey key;
  key.set_model("mlp");
  key.set_deployment(info->deployment);
  key.set_stage(1);
  struct Stranger : FrameSink {
    absl::Status Send(Frame, absl::Time) override { return absl::OkStatus(); }
    void Close() override {}
  };
  ASSERT_TRUE(stages_->Server(info->servers[1])->SubscribeResults(key, std::make_shared<Stranger>()).ok());
  ASSERT_TRUE(WaitReady("mlp"));
  EXPECT_NE(coordinator_->GetModel("mlp")->deployment, info->deployment);
  Model m = Mlp(2);
  std::vector<Tensor> in = {Ramp({4, 8}, 1), Ramp({4, 8}, 2)};
  auto out = Infer("mlp", in);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
  // The repair serves the new deployment first, then unloads the old one.
  absl::Time until = absl::Now() + absl::Seconds(10);
  while (StagesLoaded() != 2 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(StagesLoaded(), 2) << "the old deployment's stages are unloaded";
}

TEST_F(CoordinatorTest, AStageServerThatDiesFailsRequestsFastAndTheModelComesBack) {
  ASSERT_TRUE(Upload("mlp", Mlp(4)).ok());
  gate_.Set(false);
  absl::StatusOr<std::vector<Tensor>> out;
  std::thread t([&] { out = Infer("mlp", {Ramp({8, 8}, 1), Ramp({8, 8}, 1)}, absl::Seconds(30)); });
  ASSERT_TRUE(gate_.WaitHeld(1));
  absl::Time killed = absl::Now();
  stages_->KillServer("s2:9000");
  t.join();
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable) << out.status();
  EXPECT_LT(absl::Now() - killed, absl::Seconds(5));
  gate_.Set(true);
  stages_->AddServer("s2:9000");  // the pod comes back, empty
  ASSERT_TRUE(WaitReady("mlp"));
  auto again = Infer("mlp", {Ramp({4, 8}, 1), Ramp({4, 8}, 1)});
  EXPECT_TRUE(again.ok()) << again.status();
}

// Regression: a failed send left a stage without a sink, waiting forever,
// while the model stayed READY.
TEST_F(CoordinatorTest, ABrokenLinkBetweenStagesIsReportedAndRepaired) {
  ASSERT_TRUE(Upload("mlp", Mlp(3)).ok());
  ModelInfo before = *coordinator_->GetModel("mlp");
  // Stage 1's downstream (s2) goes away; stage 1 reports it cannot send.
  stages_->KillServer("s2:9000");
  auto out = Infer("mlp", {Ramp({4, 8}, 1), Ramp({4, 8}, 1)}, absl::Seconds(10));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable) << out.status();
  stages_->AddServer("s2:9000");
  ASSERT_TRUE(WaitReady("mlp"));
  EXPECT_NE(coordinator_->GetModel("mlp")->deployment, before.deployment);
  auto again = Infer("mlp", {Ramp({4, 8}, 1), Ramp({4, 8}, 1)});
  EXPECT_TRUE(again.ok()) << again.status();
}

// Regression: KServe ModelInfer looked the model up twice, so a re-upload
// in between could check inputs against one plan and run another. A
// request now holds one deployment throughout.
TEST_F(CoordinatorTest, ARequestKeepsTheDeploymentItStartedWithAcrossAReupload) {
  ASSERT_TRUE(Upload("m", Mlp(2, 8, /*seed=*/1)).ok());
  auto old = coordinator_->Find("m");
  ASSERT_TRUE(old.ok());
  // A different model under the same name: other width, other stages.
  ASSERT_TRUE(Upload("m", Mlp(3, 16, /*seed=*/2)).ok());
  EXPECT_EQ((*old)->plan().inputs(0).shape(1), 8) << "the handle's plan does not change";
  auto stale =
      (*old)->Infer({Ramp({2, 8}, 1), Ramp({2, 8}, 1)}, RequestOptions{absl::Now() + absl::Seconds(5)});
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(stale.status().message()), HasSubstr("replaced by a new upload"));
  auto fresh = Infer("m", {Ramp({2, 16}, 1), Ramp({2, 16}, 1)});
  EXPECT_TRUE(fresh.ok()) << fresh.status();
}

// Regression: nothing unloaded the stages of a replaced upload, so a
// re-upload with fewer stages left the old ones loaded for good.
TEST_F(CoordinatorTest, AReuploadWithFewerStagesUnloadsTheOldOnes) {
  ASSERT_TRUE(Upload("m", Mlp(4)).ok());
  EXPECT_EQ(StagesLoaded(), 4);
  ASSERT_TRUE(Upload("m", Mlp(2)).ok());
  EXPECT_EQ(StagesLoaded(), 2);
  ASSERT_TRUE(coordinator_->Unload("m").ok());
  EXPECT_EQ(StagesLoaded(), 0);
  EXPECT_EQ(coordinator_->GetModel("m").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(coordinator_->Unload("m").code(), absl::StatusCode::kNotFound);
}

// Regression: 5000 pipe_split markers were taken as 5001 stages.
TEST_F(CoordinatorTest, AModelCutIntoTooManyStagesIsRefused) {
  auto up = Upload("deep", Mlp(65));
  EXPECT_EQ(up.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(up.status().message()),
              HasSubstr("cuts into 65 stages; this coordinator serves at most 64 (--max_stages)"));
  EXPECT_EQ(StagesLoaded(), 0);
}

// Regression: uploads had no size or concurrency limit.
TEST_F(CoordinatorTest, UploadsAreLimitedInSizeAndNumber) {
  CoordinatorOptions o = Options();
  o.max_upload_bytes = 1000;
  o.max_concurrent_uploads = 2;
  TearDown();
  Start(o);
  auto a = coordinator_->StartUpload("a");
  auto b = coordinator_->StartUpload("b");
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = coordinator_->StartUpload("c");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("--max_concurrent_uploads"));
  EXPECT_TRUE((*a)->Append(std::string(600, 'x')).ok());
  absl::Status big = (*a)->Append(std::string(600, 'x'));
  EXPECT_EQ(big.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(big.message()), HasSubstr("--max_upload_mb"));
  a->reset();  // a finished upload frees its slot
  EXPECT_TRUE(coordinator_->StartUpload("c").ok());
  EXPECT_EQ(coordinator_->StartUpload("../x").status().code(), absl::StatusCode::kInvalidArgument);
}

// Regression: readiness always said SERVING whatever the models' state.
TEST_F(CoordinatorTest, ServingTellsWhetherAnyModelCanServe) {
  EXPECT_TRUE(coordinator_->Serving()) << "no models: nothing is down";
  ASSERT_TRUE(Upload("mlp", Mlp(2)).ok());
  EXPECT_TRUE(coordinator_->Serving());
  stages_->KillServer("s1:9000");
  absl::Time until = absl::Now() + absl::Seconds(10);
  while (coordinator_->Serving() && absl::Now() < until) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_FALSE(coordinator_->Serving()) << "the only model is down";
  stages_->AddServer("s1:9000");
  ASSERT_TRUE(WaitReady("mlp"));
  EXPECT_TRUE(coordinator_->Serving());
}

TEST_F(CoordinatorTest, NotServingUntilTheStoredModelsAreLoaded) {
  ASSERT_TRUE(Upload("kept", Mlp(2)).ok());
  ASSERT_TRUE(Upload("other", Mlp(2)).ok());
  // A restart: a new coordinator over the same repository.
  coordinator_.reset();
  coordinator_ = std::make_unique<Coordinator>(Options(), *OpenFileModelStore(repo_),
                                               MakeStaticLauncher({"s0:9000", "s1:9000"}), stages_.get());
  EXPECT_FALSE(coordinator_->Serving());
  coordinator_->LoadStoredModels();
  EXPECT_TRUE(coordinator_->Serving());
  EXPECT_TRUE(Infer("kept", {Ramp({2, 8}, 1), Ramp({2, 8}, 1)}).ok());
}

// A coordinator that crashed (no clean shutdown) leaves its stages loaded
// on static stage servers; the next one clears them before deploying.
TEST_F(CoordinatorTest, ARestartClearsStagesAPredecessorLeftBehind) {
  // What a killed predecessor left: a 4-stage deployment nobody knows.
  std::vector<std::string> servers;
  for (int i = 0; i < kServers; ++i) servers.push_back(absl::StrCat("s", i, ":9000"));
  auto file = ModelFileReader::Open(Write(Mlp(4)));
  ASSERT_TRUE(file.ok());
  Plan plan = *Partition((*file)->graph(), {});
  WeightReader read = [&](const std::string& fqn, uint64_t off, size_t n, char* out) {
    return (*file)->Read(fqn, off, n, out);
  };
  std::vector<StageSpec> specs = MakeStageSpecs(plan, "ghost", 12345, servers, 0);
  for (int i = 3; i >= 0; --i) {
    ASSERT_TRUE(stages_->LoadStage(servers[i], specs[i], read, absl::InfiniteFuture()).ok());
  }
  EXPECT_EQ(StagesLoaded(), 4);
  auto fresh = std::make_unique<Coordinator>(Options(), *OpenFileModelStore(TestTempDir("repo2")),
                                             MakeStaticLauncher(servers), stages_.get());
  fresh->LoadStoredModels();
  EXPECT_EQ(StagesLoaded(), 0);
  fresh.reset();
}

// Issue 9: stage servers keep their stages when the coordinator goes away;
// the next one adopts them (same fingerprints) without sending a weight.
TEST_F(CoordinatorTest, ARestartedCoordinatorAdoptsTheStagesItsPredecessorLeft) {
  ExpectAdoptedAfterRestart(Mlp(4), {});
}

// A predecessor's deployment missing a stage is not adopted: its stages
// are unloaded and the model is loaded afresh.
TEST_F(CoordinatorTest, AnIncompleteLeftoverDeploymentIsReloadedNotAdopted) {
  CoordinatorOptions o = Options();
  o.keep_stages_on_exit = true;
  TearDown();
  Start(o);
  ASSERT_TRUE(Upload("mlp", Mlp(4)).ok());
  ModelInfo before = *coordinator_->GetModel("mlp");
  coordinator_.reset();
  StageKey lost;
  lost.set_model("mlp");
  lost.set_deployment(before.deployment);
  lost.set_stage(2);
  ASSERT_TRUE(stages_->Server(before.servers[2])->Unload(lost).ok());
  Restart(o);
  EXPECT_EQ(coordinator_->adopted_models(), 0);
  ASSERT_EQ(coordinator_->GetModel("mlp")->state, ModelState::kReady);
  EXPECT_NE(coordinator_->GetModel("mlp")->deployment, before.deployment);
  EXPECT_EQ(StagesLoaded(), 4) << "the leftover stages were unloaded";
}

// Found by fuzzing: an upload whose model returns one of its weights
// crashed the coordinator (an exception in Partition).
TEST_F(CoordinatorTest, AModelThatReturnsAWeightIsServed) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("w0", {8, 8}).Param("w1", {8, 8});
  b.Op("mm", {"x", "w0"}, "h0").Split().Op("mm", {"h0", "w1"}, "h1");
  b.Output("h1").Output("w1");
  Model m = b.Build();
  ASSERT_TRUE(Upload("weights", m).ok());
  auto out = Infer("weights", {Ramp({3, 8}, 1)});
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 2u);
  ExpectEqual((*out)[1], m.weights.at("w1"));
}

TEST_F(CoordinatorTest, ManyConcurrentRequestsAllGetTheirOwnAnswers) {
  Model m = Mlp(4);
  ASSERT_TRUE(Upload("mlp", m).ok());
  std::vector<std::thread> clients;
  std::atomic<int> good{0};
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&, c] {
      std::vector<Tensor> in = {Ramp({5 + c, 8}, 0.1f * (c + 1)), Ramp({5 + c, 8}, 1)};
      std::vector<Tensor> want = Expected(m, in);
      for (int r = 0; r < 5; ++r) {
        auto out = Infer("mlp", in);
        if (!out.ok() || (*out)[0].shape() != want[0].shape()) return;
        for (int64_t i = 0; i < want[0].numel(); ++i) {
          if ((*out)[0].data()[i] != want[0].data()[i]) return;
        }
        ++good;
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(good.load(), 40);
}

// Zero lost requests (issue 9): a request in flight when a stage server
// dies waits for the repair and runs again, within its deadline.
TEST_F(CoordinatorTest, ARequestInFlightWhenAStageServerDiesIsRunAgainAndAnswered) {
  Model m = Mlp(4);
  ASSERT_TRUE(Upload("mlp", m).ok());
  const uint64_t first = coordinator_->GetModel("mlp")->deployment;
  std::vector<Tensor> in = {Ramp({8, 8}, 1), Ramp({8, 8}, 2)};
  gate_.Set(false);
  absl::StatusOr<std::vector<Tensor>> out;
  std::thread t([&] { out = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(30)); });
  ASSERT_TRUE(gate_.WaitHeld(1));
  stages_->KillServer("s2:9000");
  gate_.Set(true);
  stages_->AddServer("s2:9000");  // the pod comes back, empty
  t.join();
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
  EXPECT_NE(coordinator_->GetModel("mlp")->deployment, first) << "it was redeployed";
  EXPECT_GE(coordinator_->retried_requests(), 1u);
}

// A request that arrives while the model is being repaired waits for it.
TEST_F(CoordinatorTest, ARequestArrivingWhileTheModelIsRepairedWaitsForIt) {
  Model m = Mlp(2);
  ASSERT_TRUE(Upload("mlp", m).ok());
  stages_->KillServer("s1:9000");
  absl::Time until = absl::Now() + absl::Seconds(10);
  while (coordinator_->GetModel("mlp")->state == ModelState::kReady && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_NE(coordinator_->GetModel("mlp")->state, ModelState::kReady);
  std::vector<Tensor> in = {Ramp({3, 8}, 1), Ramp({3, 8}, 1)};
  absl::StatusOr<std::vector<Tensor>> out;
  std::thread t([&] { out = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(30)); });
  stages_->AddServer("s1:9000");
  t.join();
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
}

// Only the request's own deadline ends the wait, as DEADLINE_EXCEEDED
// naming what it waited out.
TEST_F(CoordinatorTest, ARequestWaitingForARepairThatNeverComesMissesItsDeadline) {
  ASSERT_TRUE(Upload("mlp", Mlp(3)).ok());
  stages_->KillServer("s1:9000");
  absl::Time start = absl::Now();
  auto out = coordinator_->Infer("mlp", {Ramp({4, 8}, 1), Ramp({4, 8}, 1)},
                                 absl::Now() + absl::Milliseconds(800));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded) << out.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3)) << "no wait past the deadline";
  stages_->AddServer("s1:9000");
  ASSERT_TRUE(WaitReady("mlp"));
}

// A re-upload under load: the old version finishes what it has in flight
// (with its own weights), new requests go to the new one, and the old
// stages are unloaded once drained.
TEST_F(CoordinatorTest, AReuploadLetsTheOldVersionFinishItsRequestsThenUnloadsIt) {
  Model v1 = Mlp(2, 8, /*seed=*/1), v2 = Mlp(2, 8, /*seed=*/2);
  ASSERT_TRUE(Upload("m", v1).ok());
  std::vector<Tensor> in = {Ramp({6, 8}, 1), Ramp({6, 8}, 2)};
  gate_.Set(false);
  absl::StatusOr<std::vector<Tensor>> old_out;
  std::thread t([&] { old_out = coordinator_->Infer("m", in, absl::Now() + absl::Seconds(30)); });
  ASSERT_TRUE(gate_.WaitHeld(1));
  ASSERT_TRUE(Upload("m", v2).ok());
  EXPECT_EQ(StagesLoaded(), 4) << "both versions are loaded while the old one drains";
  gate_.Set(true);
  t.join();
  ASSERT_TRUE(old_out.ok()) << old_out.status();
  ExpectEqual((*old_out)[0], Expected(v1, in)[0]);
  auto new_out = coordinator_->Infer("m", in, absl::Now() + absl::Seconds(20));
  ASSERT_TRUE(new_out.ok()) << new_out.status();
  ExpectEqual((*new_out)[0], Expected(v2, in)[0]);
  absl::Time until = absl::Now() + absl::Seconds(10);
  while (StagesLoaded() != 2 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(StagesLoaded(), 2) << "the drained version's stages are unloaded";
}

// A request on a handle to a replaced version runs on the new one when it
// takes the same inputs and outputs.
TEST_F(CoordinatorTest, ARequestOnAReplacedVersionMovesToTheNewOne) {
  ASSERT_TRUE(Upload("m", Mlp(2, 8, /*seed=*/1)).ok());
  auto old = coordinator_->Find("m");
  ASSERT_TRUE(old.ok());
  Model v2 = Mlp(3, 8, /*seed=*/2);
  ASSERT_TRUE(Upload("m", v2).ok());
  std::vector<Tensor> in = {Ramp({2, 8}, 1), Ramp({2, 8}, 1)};
  auto out = coordinator_->InferOn(*old, in, RequestOptions{absl::Now() + absl::Seconds(20)});
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(v2, in)[0]);
}

// A request that named its version does not move to another one.
TEST_F(CoordinatorTest, ARequestPinnedToAVersionDoesNotMoveToTheNextOne) {
  ASSERT_TRUE(Upload("m", Mlp(2, 8, /*seed=*/1)).ok());
  auto old = coordinator_->Find("m");
  ASSERT_TRUE(old.ok());
  EXPECT_EQ((*old)->version(), 1);
  ASSERT_TRUE(Upload("m", Mlp(2, 8, /*seed=*/2)).ok());
  EXPECT_EQ(coordinator_->GetModel("m")->version, 2);
  RequestOptions pinned;
  pinned.deadline = absl::Now() + absl::Seconds(5);
  pinned.pinned_version = 1;
  auto out = coordinator_->InferOn(*old, {Ramp({2, 8}, 1), Ramp({2, 8}, 1)}, pinned);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable) << out.status();
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("named version 1"));
}

TEST_F(CoordinatorTest, RequestsBeyondTheModelsQueueAreResourceExhaustedAtOnce) {
  CoordinatorOptions o = Options();
  o.max_queued_requests = 2;
  TearDown();
  Start(o);
  Model m = Mlp(2);
  ASSERT_TRUE(Upload("mlp", m).ok());
  std::vector<Tensor> in = {Ramp({2, 8}, 1), Ramp({2, 8}, 1)};
  gate_.Set(false);
  absl::StatusOr<std::vector<Tensor>> a, b;
  std::thread ta([&] { a = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(30)); });
  std::thread tb([&] { b = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(30)); });
  auto d = coordinator_->Find("mlp");
  absl::Time until = absl::Now() + absl::Seconds(10);
  while ((*d)->InFlight() < 2 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_EQ((*d)->InFlight(), 2);
  absl::Time start = absl::Now();
  auto c = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(30));
  EXPECT_LT(absl::Now() - start, absl::Seconds(1)) << "refused at once, not queued";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << c.status();
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("2 requests queued or running"));
  gate_.Set(true);
  ta.join();
  tb.join();
  EXPECT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(b.ok()) << b.status();
  auto again = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(20));
  EXPECT_TRUE(again.ok()) << again.status();
}

UploadOptions Replicas(int r) {
  UploadOptions o;
  o.set_replicas(r);
  return o;
}

// Frames stage 0 of each lane has taken so far.
std::vector<uint64_t> LaneFrames(InProcessStages& stages, const ModelInfo& info) {
  const int n = info.plan->stages_size();
  std::vector<uint64_t> out;
  for (int lane = 0; lane < info.replicas; ++lane) {
    StageKey key;
    key.set_model(info.name);
    key.set_deployment(info.deployment);
    key.set_stage(0);
    key.set_replica(lane);
    auto stats = stages.Server(info.servers[lane * n])->Stats(key);
    out.push_back(stats.ok() ? stats->frames_processed() : 0);
  }
  return out;
}

TEST_F(CoordinatorTest, ReplicasSpreadMicrobatchesOverLanesAndMatchTheUnsplitModel) {
  Model m = Mlp(2);
  ASSERT_TRUE(Upload("mlp", m, Replicas(2)).ok());
  ModelInfo info = *coordinator_->GetModel("mlp");
  EXPECT_EQ(info.replicas, 2);
  EXPECT_EQ(info.ready_replicas, 2);
  EXPECT_THAT(info.servers, ::testing::ElementsAre("s0:9000", "s1:9000", "s2:9000", "s3:9000"));
  EXPECT_EQ(StagesLoaded(), 4);
  std::vector<Tensor> in = {Ramp({37, 8}, 0.25f), Ramp({37, 8}, -0.5f)};
  auto out = Infer("mlp", in);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
  // 4 microbatches, 2 on each lane.
  EXPECT_THAT(LaneFrames(*stages_, info), ::testing::ElementsAre(2, 2));
}

// A request bound to a lane (a generation step, whose sequences' caches
// that lane holds) sends every microbatch there, and runs on another lane
// once its own is out of service.
TEST_F(CoordinatorTest, ARequestBoundToALaneRunsOnItUntilTheLaneIsGone) {
  Model m = Mlp(2);
  ASSERT_TRUE(Upload("mlp", m, Replicas(2)).ok());
  const ModelInfo info = *coordinator_->GetModel("mlp");
  std::vector<Tensor> in = {Ramp({37, 8}, 0.25f), Ramp({37, 8}, -0.5f)};
  RequestOptions on_lane_1;
  on_lane_1.deadline = absl::Now() + absl::Seconds(20);
  on_lane_1.lane = 1;
  auto out = coordinator_->Infer("mlp", in, on_lane_1);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
  EXPECT_THAT(LaneFrames(*stages_, info), ::testing::ElementsAre(0, 4));
  stages_->KillServer("s3:9000");  // lane 1's last stage
  absl::Time until = absl::Now() + absl::Seconds(20);
  while (coordinator_->GetModel("mlp")->ready_replicas > 1 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_EQ(coordinator_->GetModel("mlp")->ready_replicas, 1);
  on_lane_1.deadline = absl::Now() + absl::Seconds(20);
  auto moved = coordinator_->Infer("mlp", in, on_lane_1);
  ASSERT_TRUE(moved.ok()) << moved.status();
  ExpectEqual((*moved)[0], Expected(m, in)[0]);
  EXPECT_EQ(LaneFrames(*stages_, info)[0], 4u) << "lane 0 took it";
}

TEST_F(CoordinatorTest, ReplicasBeyondTheLimitOrNegativeAreRefused) {
  auto many = Upload("mlp", Mlp(1), Replicas(kMaxReplicas + 1));
  EXPECT_EQ(many.status().code(), absl::StatusCode::kInvalidArgument) << many.status();
  EXPECT_THAT(std::string(many.status().message()),
              HasSubstr("replicas 65 is more than a stage may have (64)"));
  auto negative = Upload("mlp", Mlp(1), Replicas(-1));
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument) << negative.status();
  EXPECT_EQ(StagesLoaded(), 0);
}

// A replica dying moves its lane's unfinished microbatches to the other
// lane at once: the request is answered without waiting for a redeploy,
// and the lane comes back on its own, reloading only its stages.
TEST_F(CoordinatorTest, WhenAReplicaDiesItsMicrobatchesRunOnTheOtherLaneAtOnce) {
  Model m = Mlp(2);
  ASSERT_TRUE(Upload("mlp", m, Replicas(2)).ok());
  const ModelInfo before = *coordinator_->GetModel("mlp");
  std::vector<Tensor> in = {Ramp({8, 8}, 1), Ramp({8, 8}, 2)};
  gate_.Set(false);
  absl::StatusOr<std::vector<Tensor>> out;
  std::thread t([&] { out = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(30)); });
  ASSERT_TRUE(gate_.WaitHeld(2));  // both lanes hold a microbatch
  const int loads = stages_->load_calls();
  const absl::Time killed = absl::Now();
  stages_->KillServer("s3:9000");  // lane 1's last stage
  gate_.Set(true);
  t.join();
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
  EXPECT_LT(absl::Now() - killed, absl::Seconds(5));
  EXPECT_EQ(coordinator_->retried_requests(), 0u) << "no request had to start over";
  auto d = *coordinator_->Find("mlp");
  EXPECT_GE(d->replayed_microbatches(), 1u);
  ModelInfo during = *coordinator_->GetModel("mlp");
  EXPECT_EQ(during.state, ModelState::kReady);
  EXPECT_EQ(during.deployment, before.deployment) << "not redeployed";
  EXPECT_EQ(during.ready_replicas, 1);
  // Served by lane 0 alone meanwhile.
  auto alone = Infer("mlp", in);
  ASSERT_TRUE(alone.ok()) << alone.status();
  ExpectEqual((*alone)[0], Expected(m, in)[0]);
  stages_->AddServer("s3:9000");  // the pod comes back, empty
  // The repair counts a reloaded lane just after the lane is back, so
  // wait for both.
  absl::Time until = absl::Now() + absl::Seconds(20);
  while ((coordinator_->GetModel("mlp")->ready_replicas < 2 ||
          coordinator_->reloaded_lanes() < 1) &&
         absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ModelInfo after = *coordinator_->GetModel("mlp");
  EXPECT_EQ(after.ready_replicas, 2);
  EXPECT_EQ(after.deployment, before.deployment);
  EXPECT_EQ(coordinator_->reloaded_lanes(), 1u);
  EXPECT_EQ(stages_->load_calls() - loads, 2) << "only the lane's two stages were loaded";
  std::vector<uint64_t> frames = LaneFrames(*stages_, after);
  auto again = Infer("mlp", in);
  ASSERT_TRUE(again.ok()) << again.status();
  ExpectEqual((*again)[0], Expected(m, in)[0]);
  std::vector<uint64_t> now = LaneFrames(*stages_, after);
  EXPECT_GT(now[1], frames[1]) << "the reloaded lane serves again";
}

// A frame of an earlier attempt of a microbatch (from a lane that broke)
// is dropped, not taken as the answer or as an error.
TEST_F(CoordinatorTest, FramesOfAnEarlierAttemptAreDropped) {
  Model m = Mlp(2);
  ASSERT_TRUE(Upload("mlp", m).ok());
  auto info = coordinator_->GetModel("mlp");
  std::shared_ptr<FrameSink> results = ResultsSink(*stages_, *info);
  std::vector<Tensor> in = {Ramp({8, 8}, 1), Ramp({8, 8}, 2)};
  gate_.Set(false);
  absl::StatusOr<std::vector<Tensor>> out;
  std::thread t([&] { out = Infer("mlp", in); });
  ASSERT_TRUE(gate_.WaitHeld(1));
  auto d = *coordinator_->Find("mlp");
  const uint64_t strays = d->stray_frames();
  for (int attempt : {0, 2}) {
    Frame f;
    f.header.set_request_id(1);
    f.header.set_microbatch(0);
    f.header.set_attempt(attempt);
    f.Add("out", Tensor::Zeros({2, 8}));  // would fit, but is not the answer
    ASSERT_TRUE(results->Send(std::move(f), absl::InfiniteFuture()).ok());
    Frame e;
    e.header.set_kind(FrameHeader::ERROR);
    e.header.set_request_id(1);
    e.header.set_microbatch(1);
    e.header.set_attempt(attempt);
    e.header.set_error_code(static_cast<int>(absl::StatusCode::kUnavailable));
    e.header.set_error_message("a stage of a lane that broke");
    ASSERT_TRUE(results->Send(std::move(e), absl::InfiniteFuture()).ok());
  }
  EXPECT_EQ(d->stray_frames(), strays + 4);
  gate_.Set(true);
  t.join();
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
}

TEST_F(CoordinatorTest, ARestartedCoordinatorAdoptsEveryReplica) {
  ExpectAdoptedAfterRestart(Mlp(2), Replicas(2));
}

// A traced request's timeline: every microbatch's send, then on every
// stage its transfer, queue and compute, then its transfer back, in order
// on one clock; and the Chrome JSON of it.
TEST_F(CoordinatorTest, ATracedRequestGetsEveryMicrobatchsTimelineOnEveryStage) {
  Model m = Mlp(3);
  ASSERT_TRUE(Upload("mlp", m).ok());
  std::vector<Tensor> in = {Ramp({8, 8}, 1), Ramp({8, 8}, 2)};
  std::vector<TraceSpan> spans;
  auto d = *coordinator_->Find("mlp");
  RequestOptions traced;
  traced.deadline = absl::Now() + absl::Seconds(20);
  traced.trace = &spans;
  auto out = coordinator_->InferOn(d, in, traced);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
  const ModelInfo info = d->Info();
  // (stage, what, microbatch) -> span
  std::map<std::tuple<int, std::string, int>, TraceSpan> by;
  for (const TraceSpan& s : spans) {
    EXPECT_GE(s.duration_us(), 0);
    EXPECT_TRUE(by.emplace(std::make_tuple(s.stage(), s.what(), s.microbatch()), s).second)
        << "one " << s.what() << " per stage and microbatch";
  }
  ASSERT_EQ(spans.size(), 1u + 4 * (2 + 3 * 3)) << "request; per microbatch send, receive and "
                                                    "3 spans on each of 3 stages";
  auto end = [](const TraceSpan& s) { return s.start_us() + s.duration_us(); };
  const TraceSpan& request = by.at({-1, "request", -1});
  for (int mb = 0; mb < 4; ++mb) {
    SCOPED_TRACE(mb);
    int64_t t = by.at({-1, "send", mb}).start_us();
    EXPECT_GE(t, request.start_us());
    for (int stage = 0; stage < 3; ++stage) {
      const TraceSpan& transfer = by.at({stage, "transfer", mb});
      const TraceSpan& queue = by.at({stage, "queue", mb});
      const TraceSpan& compute = by.at({stage, "compute", mb});
      EXPECT_GE(transfer.start_us(), t);
      EXPECT_EQ(end(transfer), queue.start_us());
      EXPECT_EQ(end(queue), compute.start_us());
      t = end(compute);
    }
    const TraceSpan& back = by.at({-1, "receive", mb});
    EXPECT_GE(back.start_us(), t);
    EXPECT_LE(end(back), end(request));
  }
  const std::string json = TraceToChromeJson(spans, info);
  EXPECT_THAT(json, HasSubstr("\"traceEvents\":["));
  EXPECT_THAT(json, HasSubstr("\"args\":{\"name\":\"stage 2 @ s2:9000\"}"));
  EXPECT_THAT(json, HasSubstr("\"args\":{\"name\":\"coordinator\"}"));
  EXPECT_THAT(json, HasSubstr("{\"name\":\"compute 3\",\"cat\":\"compute\",\"ph\":\"X\",\"ts\":"));
  EXPECT_THAT(json, HasSubstr("{\"name\":\"request\",\"cat\":\"request\",\"ph\":\"X\",\"ts\":0,"));
}

// Small requests that arrive while the model is busy are merged into one
// pipeline request, and each gets exactly the unsplit model's answer for
// its own rows.
TEST_F(CoordinatorTest, SmallRequestsArrivingWhileTheModelIsBusyAreMergedAndAnsweredRowByRow) {
  Model m = Mlp(2);
  UploadOptions one_at_a_time;
  one_at_a_time.set_max_batches_in_flight(1);
  ASSERT_TRUE(Upload("mlp", m, one_at_a_time).ok());
  EXPECT_EQ(coordinator_->GetModel("mlp")->batching.max_rows, 64);
  gate_.Set(false);
  std::vector<std::thread> threads;
  std::vector<absl::StatusOr<std::vector<Tensor>>> out(7);
  std::vector<std::vector<Tensor>> in(7);
  for (int i = 0; i < 7; ++i) {
    in[i] = {Ramp({1 + i % 3, 8}, 0.5f + i), Ramp({1 + i % 3, 8}, -1.0f * i)};
    threads.emplace_back([&, i] { out[i] = Infer("mlp", in[i]); });
    if (i == 0) {
      ASSERT_TRUE(gate_.WaitHeld(1));  // the first one runs, the rest queue
    }
  }
  auto busy = *coordinator_->Find("mlp");
  absl::Time until = absl::Now() + absl::Seconds(30);
  while (busy->queued_requests() < 6 && absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(busy->queued_requests(), 6u) << "the six requests behind the first never queued";
  gate_.Set(true);
  for (auto& t : threads) t.join();
  for (int i = 0; i < 7; ++i) {
    ASSERT_TRUE(out[i].ok()) << i << ": " << out[i].status();
    ExpectEqual((*out[i])[0], Expected(m, in[i])[0]);
  }
  auto d = *coordinator_->Find("mlp");
  EXPECT_EQ(d->merged_requests(), 6u);
  EXPECT_EQ(d->batches(), 2u);
  // Batching off: every request alone.
  UploadOptions off;
  off.set_max_batch_rows(-1);
  ASSERT_TRUE(Upload("alone", m, off).ok());
  EXPECT_EQ(coordinator_->GetModel("alone")->batching.max_rows, 0);
  // Stages join a request's queued microbatches under the same licence
  // and limit.
  auto merge_rows = [&](const std::string& model) {
    std::set<int64_t> seen;
    for (const std::string& a : Addresses()) {
      std::shared_ptr<StageServerCore> server = stages_->Server(a);
      for (const StageKey& k : server->Keys()) {
        if (k.model() == model) seen.insert(server->Find(k)->spec().merge_rows());
      }
    }
    return seen;
  };
  EXPECT_EQ(merge_rows("mlp"), std::set<int64_t>{64});
  EXPECT_EQ(merge_rows("alone"), std::set<int64_t>{0});
  UploadOptions bad;
  bad.set_max_batch_rows(-2);
  auto refused = Upload("bad", m, bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
}

int ThreadsOfThisProcess() {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    (void)e;
    ++n;
  }
  return n;
}

// Each redeployment makes a new deployment (its batcher's workers
// included) and the one it replaces goes with its threads.
// x -> 8 wide -> 256 wide -> 256 wide -> 8 wide - y, with no cut points:
// layers of very different cost for automatic cutting.
Model NarrowAndWide() {
  GraphBuilder b(3);
  b.Input("x", {-1, 8}).Input("y", {-1, 8});
  b.Param("w0", {8, 8}).Param("w1", {8, 256}).Param("w2", {256, 256}).Param("w3", {256, 8});
  b.Op("mm", {"x", "w0"}, "m0").Op("relu", {"m0"}, "h0");
  b.Op("mm", {"h0", "w1"}, "m1").Op("relu", {"m1"}, "h1");
  b.Op("mm", {"h1", "w2"}, "m2").Op("relu", {"m2"}, "h2");
  b.Op("mm", {"h2", "w3"}, "m3").Op("sub", {"m3", "y"}, "out").Output("out");
  return b.Build();
}

// A calibration backend that cannot compile anything: a coordinator that
// measured again with it would fall back to the estimate.
class NoCompileBackend : public ComputeBackend {
 public:
  std::string Name() const override { return "broken"; }
  absl::StatusOr<std::unique_ptr<StageProgram>> Compile(const Graph&, const WeightMap&) override {
    return absl::InternalError("this backend compiles nothing");
  }
};

UploadOptions Stages(int n, UploadOptions::Balance balance = UploadOptions::BALANCE_DEFAULT) {
  UploadOptions o;
  o.set_num_stages(n);
  o.set_balance(balance);
  return o;
}

// A loaded stage computes up to max_batch_rows rows of a request's queued
// microbatches in one run: node times are measured at that size and
// charged per microbatch, where the model lets stages join.
TEST_F(CoordinatorTest, NodeTimesAreMeasuredAtTheRowsALoadedStageJoins) {
  auto cpu = MakeCpuBackend({});
  CoordinatorOptions o = Options();
  o.calibration_backend = cpu.get();
  TearDown();
  Start(o);
  const Model m = NarrowAndWide();
  UploadOptions wide = Stages(2);
  wide.set_max_batch_rows(128);
  ASSERT_TRUE(Upload("joined", m, wide).ok());
  EXPECT_THAT(coordinator_->GetModel("joined")->plan->balance(),
              HasSubstr("measured on cpu at 128 rows joined, per 16-row microbatch"));
  UploadOptions alone = Stages(2);
  alone.set_max_batch_rows(-1);  // no joining: times at the microbatch's rows
  ASSERT_TRUE(Upload("alone", m, alone).ok());
  EXPECT_THAT(coordinator_->GetModel("alone")->plan->balance(),
              HasSubstr("measured on cpu at 16 rows (8 nodes run)"));
}

TEST_F(CoordinatorTest, AutomaticCutsAreBalancedByMeasuredTimesKeptWithTheModel) {
  auto cpu = MakeCpuBackend({});
  CoordinatorOptions o = Options();
  o.keep_stages_on_exit = true;
  o.calibration_backend = cpu.get();
  TearDown();
  Start(o);
  const Model m = NarrowAndWide();
  auto up = Upload("mlp", m, Stages(2));
  ASSERT_TRUE(up.ok()) << up.status();
  const ModelInfo before = *coordinator_->GetModel("mlp");
  const Plan& plan = *before.plan;
  ASSERT_EQ(plan.stages_size(), 2);
  EXPECT_THAT(plan.balance(),
              HasSubstr("measured on cpu at 64 rows joined, per 16-row microbatch (8 nodes run); "
                        "link 1 GB/s"));
  for (const Stage& s : plan.stages()) EXPECT_GT(s.predicted_compute_us(), 0);

  std::vector<Tensor> in = {Ramp({32, 8}, 0.25f), Ramp({32, 8}, -0.5f)};
  auto out = Infer("mlp", in);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
  std::vector<double> measured = coordinator_->MeasuredComputeSeconds("mlp");
  ASSERT_EQ(measured.size(), 2u);
  EXPECT_GT(measured[0], 0);
  EXPECT_GT(measured[1], 0);

  // The times are kept with the upload ...
  auto stored = OpenFileModelStore(repo_).value()->List();
  ASSERT_TRUE(stored.ok());
  ASSERT_EQ(stored->size(), 1u);
  EXPECT_EQ((*stored)[0].options.profile().seconds_size(), 8);
  EXPECT_EQ((*stored)[0].options.profile().rows(), 16);
  // ... so a restarted coordinator cuts the same way without measuring (its
  // calibration backend is broken) and adopts the stages left loaded.
  NoCompileBackend broken;
  o.calibration_backend = &broken;
  coordinator_.reset();
  Restart(o);
  EXPECT_EQ(coordinator_->adopted_models(), 1);
  const ModelInfo after = *coordinator_->GetModel("mlp");
  EXPECT_EQ(after.deployment, before.deployment);
  EXPECT_EQ(after.plan->balance(), plan.balance());
  EXPECT_EQ(after.plan->stages(0).predicted_compute_us(), plan.stages(0).predicted_compute_us());
  // A new upload measures again, fails, and falls back to the estimate.
  up = Upload("mlp2", m, Stages(2));
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_THAT(coordinator_->GetModel("mlp2")->plan->balance(),
              HasSubstr("estimated cost (FLOPs + parameter bytes); measuring failed: "
                        "calibrating node"));
}

TEST_F(CoordinatorTest, BalanceOptionsAndProfilesAreChecked) {
  const Model m = NarrowAndWide();
  // This coordinator has no calibration backend.
  ASSERT_TRUE(Upload("a", m, Stages(2)).ok());
  EXPECT_EQ(coordinator_->GetModel("a")->plan->balance(), kEstimatedBalance);
  auto up = Upload("b", m, Stages(2, UploadOptions::BALANCE_MEASURED));
  EXPECT_EQ(up.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(up.status().message()), HasSubstr("no calibration backend"));

  // A profile sent with the upload: the first node is slow, so it is a
  // stage of its own.
  UploadOptions o = Stages(2);
  for (int i = 0; i < 8; ++i) o.mutable_profile()->add_seconds(i == 0 ? 1.0 : 1e-3);
  o.mutable_profile()->set_rows(16);
  o.set_link_gb_per_s(2);
  ASSERT_TRUE(Upload("c", m, o).ok());
  const Plan c = *coordinator_->GetModel("c")->plan;
  EXPECT_EQ(c.balance(), "profile sent with the upload; link 2 GB/s");
  EXPECT_EQ(c.stages(0).predicted_compute_us(), 1e6);
  EXPECT_NEAR(c.stages(1).predicted_compute_us(), 7e3, 1e-6);
  std::vector<Tensor> in = {Ramp({8, 8}, 0.25f), Ramp({8, 8}, -0.5f)};
  auto out = Infer("c", in);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);

  struct Bad {
    std::function<void(UploadOptions&)> change;
    std::string error;
  };
  for (const Bad& bad : std::vector<Bad>{
           {[](UploadOptions& u) { u.mutable_profile()->mutable_seconds()->Truncate(2); },
            "profile: node_seconds has 2 entries for 8 compute nodes"},
           {[](UploadOptions& u) { u.mutable_profile()->set_seconds(3, -1); },
            "profile: node times must be finite seconds >= 0, got -1"},
           {[](UploadOptions& u) { u.mutable_profile()->set_rows(0); },
            "profile: rows must be >= 1, got 0"},
           {[](UploadOptions& u) { u.set_link_gb_per_s(-1); },
            "link_gb_per_s must be a finite number >= 0, got -1"},
       }) {
    UploadOptions u = o;
    bad.change(u);
    auto r = Upload("d", m, u);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad.error;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(bad.error));
  }
  // Asking for the estimate skips the profile.
  o.set_balance(UploadOptions::BALANCE_ESTIMATED);
  ASSERT_TRUE(Upload("e", m, o).ok());
  EXPECT_EQ(coordinator_->GetModel("e")->plan->balance(), kEstimatedBalance);
}

TEST_F(CoordinatorTest, RepairsLeaveNoThreadsBehind) {
  Model m = Mlp(2);
  ASSERT_TRUE(Upload("mlp", m).ok());
  std::vector<Tensor> in = {Ramp({2, 8}, 1), Ramp({2, 8}, 2)};
  auto repair = [&] {
    const uint64_t before = coordinator_->GetModel("mlp")->deployment;
    stages_->KillServer("s1:9000");
    stages_->AddServer("s1:9000");
    absl::Time until = absl::Now() + absl::Seconds(20);
    while (absl::Now() < until) {
      auto info = coordinator_->GetModel("mlp");
      if (info->state == ModelState::kReady && info->deployment != before) break;
      absl::SleepFor(absl::Milliseconds(10));
    }
    auto out = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(20));
    ASSERT_TRUE(out.ok()) << out.status();
  };
  repair();
  const int threads = ThreadsOfThisProcess();
  for (int i = 0; i < 5; ++i) repair();
  EXPECT_LE(ThreadsOfThisProcess(), threads + 2) << "5 redeployments left threads behind";
}

// A backend whose programs call `crash` before they run an input whose
// first value is 666: a request that brings a stage server down.
class CrashingBackend : public ComputeBackend {
 public:
  explicit CrashingBackend(std::function<void()> crash) : crash_(std::move(crash)) {}
  std::string Name() const override { return "crashing-cpu"; }
  absl::StatusOr<std::unique_ptr<StageProgram>> Compile(const Graph& graph,
                                                        const WeightMap& weights) override {
    ASSIGN_OR_RETURN(std::unique_ptr<StageProgram> inner, cpu_->Compile(graph, weights));
    return std::unique_ptr<StageProgram>(new Program(std::move(inner), crash_));
  }

 private:
  class Program : public StageProgram {
   public:
    Program(std::unique_ptr<StageProgram> inner, std::function<void()> crash)
        : inner_(std::move(inner)), crash_(std::move(crash)) {}
    absl::StatusOr<std::vector<Tensor>> Run(absl::Span<const Tensor> in) override {
      if (!in.empty() && in[0].dtype() == DT_FLOAT32 && in[0].numel() > 0 &&
          in[0].data()[0] == 666.0f) {
        crash_();
      }
      return inner_->Run(in);
    }

   private:
    std::unique_ptr<StageProgram> inner_;
    std::function<void()> crash_;
  };
  std::function<void()> crash_;
  std::unique_ptr<ComputeBackend> cpu_ = MakeCpuBackend({});
};

// Regression: a request that brought its stage server down was replayed on
// every redeployment until its deadline (35 deaths in 60 s in the attack),
// and with replicas on every lane. A request lost with a stage server is
// now run again once; lost again, it fails with INTERNAL.
TEST_F(CoordinatorTest, ARequestLostWithItsStageServerTwiceIsNotRunAThirdTime) {
  TearDown();
  std::atomic<int> crashes{0};
  Start(Options(), std::make_shared<CrashingBackend>([&] {
          ++crashes;
          // Stage 1's server dies with the microbatch on its way there, and
          // its pod comes back empty.
          stages_->KillServer("s1:9000");
          stages_->AddServer("s1:9000");
        }));
  Model m = Mlp(2);
  ASSERT_TRUE(Upload("mlp", m).ok());
  Tensor poison = Ramp({4, 8}, 1);
  poison.data()[0] = 666.0f;
  absl::Time start = absl::Now();
  auto out = coordinator_->Infer("mlp", {poison, Ramp({4, 8}, 1)}, absl::Now() + absl::Seconds(15));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInternal) << out.status();
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("failed twice"));
  EXPECT_EQ(crashes.load(), 2) << "run once, and once again";
  EXPECT_LT(absl::Now() - start, absl::Seconds(10)) << "not retried until the deadline";
  ASSERT_TRUE(WaitReady("mlp"));
  std::vector<Tensor> in = {Ramp({4, 8}, 1), Ramp({4, 8}, 2)};
  auto good = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(20));
  ASSERT_TRUE(good.ok()) << good.status();
  ExpectEqual((*good)[0], Expected(m, in)[0]);
}

// Regression: a request caught twice by a link that failed between two
// live stage servers ("stage 0 cannot send on: the stage ended the
// stream") failed as lost twice, though no server died: in a netns run a
// 4 s cut lost 4 requests so, once before the repair and once after it,
// while the new stage 0's channel to stage 1 still backed off. Only every
// third link failure counts against a request: this one runs a third
// time, and succeeds.
TEST_F(CoordinatorTest, ARequestCaughtTwiceByALinkBetweenLiveServersRunsAgain) {
  TearDown();
  std::atomic<int> runs{0};
  Start(Options(), std::make_shared<CrashingBackend>([&] {
          // Stage 0 runs it; its two sends to stage 1 (one and the
          // host's retry) fail, the first two times.
          if (runs++ < 2) stages_->FailLinkSends("s1:9000", 2);
        }));
  Model m = Mlp(2);
  ASSERT_TRUE(Upload("mlp", m).ok());
  // One row, one microbatch: no other send clears stage 0's error first.
  std::vector<Tensor> in = {Ramp({1, 8}, 1), Ramp({1, 8}, 1)};
  in[0].data()[0] = 666.0f;
  auto out = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(20));
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);
  EXPECT_EQ(runs.load(), 3) << "cut twice, then through";
}

// A request whose every run ends in a link failure (a live receiver may
// end a stream over what it was sent) is not run until its deadline: every
// third loss to a link counts as a loss in flight, and two of those fail
// it.
TEST_F(CoordinatorTest, ARequestThatEveryLinkFailsStopsAfterSixRuns) {
  TearDown();
  std::atomic<int> runs{0};
  Start(Options(), std::make_shared<CrashingBackend>([&] {
          ++runs;
          stages_->FailLinkSends("s1:9000", 2);
        }));
  ASSERT_TRUE(Upload("mlp", Mlp(2)).ok());
  std::vector<Tensor> in = {Ramp({1, 8}, 1), Ramp({1, 8}, 1)};
  in[0].data()[0] = 666.0f;
  auto out = coordinator_->Infer("mlp", in, absl::Now() + absl::Seconds(30));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInternal) << out.status();
  EXPECT_THAT(std::string(out.status().message()),
              HasSubstr("links between live stage servers failed 6 times"));
  EXPECT_EQ(runs.load(), 6);
}

// Uploads `first` (2-stage MLPs), then uploads `uploading` (automatic cuts,
// so it calibrates) with its calibration held at a gate, kills a stage
// server every model uses, and waits up to 10 s for `watched` to be
// redeployed; then lets the upload finish. Whether `watched` came back
// while the upload was held.
bool CoordinatorTest::RepairedDuringAnUpload(const std::vector<std::string>& first,
                                             const std::string& uploading,
                                             const std::string& watched) {
  Gate calibration_gate;
  GatedBackend calibration(&calibration_gate);
  CoordinatorOptions o = Options();
  o.calibration_backend = &calibration;
  TearDown();
  Start(o);
  for (const std::string& name : first) EXPECT_TRUE(Upload(name, Mlp(2)).ok()) << name;
  const uint64_t before = coordinator_->GetModel(watched)->deployment;
  calibration_gate.Set(false);
  absl::StatusOr<UploadResponse> up;
  std::thread upload([&] { up = Upload(uploading, NarrowAndWide(), Stages(2)); });
  EXPECT_TRUE(calibration_gate.WaitHeld(1)) << uploading << "'s upload is measuring its nodes";
  stages_->KillServer("s1:9000");
  stages_->AddServer("s1:9000");
  bool repaired = false;
  for (absl::Time until = absl::Now() + absl::Seconds(10); !repaired && absl::Now() < until;) {
    auto info = coordinator_->GetModel(watched);
    repaired = info.ok() && info->state == ModelState::kReady && info->deployment != before;
    if (!repaired) absl::SleepFor(absl::Milliseconds(10));
  }
  calibration_gate.Set(true);
  upload.join();
  EXPECT_TRUE(up.ok()) << up.status();
  return repaired;
}

// Regression: one lock serialised every upload, unload and repair, so a
// model whose stage server died stayed down for as long as an unrelated
// upload took (its calibration, its loads).
TEST_F(CoordinatorTest, ARepairDoesNotWaitForAnotherModelsUpload) {
  EXPECT_TRUE(RepairedDuringAnUpload({"a"}, "b", "a")) << "model a stayed down while b uploaded";
}

// The one repair thread never waits for a model's lock: while a model is
// being uploaded again (its lock held through calibration), its own repair
// comes back later, and another model's repair goes ahead.
TEST_F(CoordinatorTest, ARepairOfAModelBeingUploadedHoldsUpNoOtherRepair) {
  EXPECT_TRUE(RepairedDuringAnUpload({"a", "x"}, "a", "x"))
      << "x waited behind a's repair, which waited for a's upload";
  EXPECT_TRUE(WaitReady("a"));
}

// Regression: an upload acknowledged while the coordinator was still
// loading its stored models was then replaced by the loader's older
// version. Model calls now answer UNAVAILABLE until the store is loaded.
TEST_F(CoordinatorTest, ModelCallsAreUnavailableUntilTheStoredModelsAreLoaded) {
  ASSERT_TRUE(Upload("mlp", Mlp(2)).ok());
  coordinator_.reset();
  coordinator_ = std::make_unique<Coordinator>(Options(), *OpenFileModelStore(repo_),
                                               MakeStaticLauncher(Addresses()), stages_.get());
  auto upload = coordinator_->StartUpload("mlp");
  EXPECT_EQ(upload.status().code(), absl::StatusCode::kUnavailable) << upload.status();
  EXPECT_THAT(std::string(upload.status().message()), HasSubstr("loading its stored models"));
  EXPECT_EQ(coordinator_->Unload("mlp").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(coordinator_->Find("mlp").status().code(), absl::StatusCode::kUnavailable)
      << "a stored model is not unknown while it loads";
  coordinator_->LoadStoredModels();
  ASSERT_TRUE(Upload("mlp", Mlp(2, 8, /*seed=*/2)).ok());
  EXPECT_EQ(coordinator_->GetModel("mlp")->version, 2);
}

// A launcher whose first ServersFor waits at a gate: a stored model whose
// deploy is slow at a restart.
class FirstCallGatedLauncher : public Launcher {
 public:
  FirstCallGatedLauncher(std::unique_ptr<Launcher> inner, Gate* gate)
      : inner_(std::move(inner)), gate_(gate) {}
  std::string Name() const override { return inner_->Name(); }
  absl::StatusOr<std::vector<std::string>> ServersFor(int n) override {
    if (calls_++ == 0) gate_->Pass();
    return inner_->ServersFor(n);
  }
  int ThreadsPerStage(bool turns) const override { return inner_->ThreadsPerStage(turns); }
  bool StagesShareCores() const override { return inner_->StagesShareCores(); }
  std::vector<std::string> ExistingServers() const override { return inner_->ExistingServers(); }

 private:
  std::unique_ptr<Launcher> inner_;
  Gate* gate_;
  std::atomic<int> calls_{0};
};

// Only the stored models wait for the loader: another name can be uploaded
// while a slow stored model loads.
TEST_F(CoordinatorTest, WhileAStoredModelLoadsOtherNamesAreServed) {
  ASSERT_TRUE(Upload("mlp", Mlp(2)).ok());
  coordinator_.reset();
  Gate first_load;
  first_load.Set(false);
  coordinator_ = std::make_unique<Coordinator>(
      Options(), *OpenFileModelStore(repo_),
      std::make_unique<FirstCallGatedLauncher>(MakeStaticLauncher(Addresses()), &first_load),
      stages_.get());
  std::thread loader([&] { coordinator_->LoadStoredModels(); });
  ASSERT_TRUE(first_load.WaitHeld(1)) << "mlp's deploy waits for its servers";
  EXPECT_EQ(coordinator_->StartUpload("mlp").status().code(), absl::StatusCode::kUnavailable);
  auto other = Upload("other", Mlp(2));
  EXPECT_TRUE(other.ok()) << other.status();
  EXPECT_FALSE(coordinator_->Serving()) << "not ready until every stored model is loaded";
  first_load.Set(true);
  loader.join();
  EXPECT_TRUE(WaitReady("mlp"));
  EXPECT_TRUE(WaitReady("other"));
  EXPECT_TRUE(coordinator_->Serving());
}

// A store whose List() can be held at a gate, as a slow disk would.
class GatedStore : public ModelStore {
 public:
  GatedStore(std::unique_ptr<ModelStore> inner, Gate* gate) : inner_(std::move(inner)), gate_(gate) {}
  absl::StatusOr<std::unique_ptr<PendingUpload>> StartUpload(const std::string& name) override {
    return inner_->StartUpload(name);
  }
  absl::Status Remove(const std::string& name) override { return inner_->Remove(name); }
  // Held after reading, so what it returns may be out of date.
  absl::StatusOr<std::vector<StoredModel>> List() override {
    absl::StatusOr<std::vector<StoredModel>> models = inner_->List();
    gate_->Pass();
    return models;
  }

 private:
  std::unique_ptr<ModelStore> inner_;
  Gate* gate_;
};

// Regression: a repair read the store, then took the lock; an unload in
// between left the repair deploying (or listing as failed) a model no
// longer stored: it could not be unloaded, and health said NOT_SERVING.
TEST_F(CoordinatorTest, AnUnloadDuringARepairLeavesNothingBehind) {
  ASSERT_TRUE(Upload("mlp", Mlp(2)).ok());
  coordinator_.reset();
  stages_->KillServer("s1:9000");  // the model cannot deploy at the restart
  Gate list_gate;
  coordinator_ = std::make_unique<Coordinator>(
      Options(), std::make_unique<GatedStore>(*OpenFileModelStore(repo_), &list_gate),
      MakeStaticLauncher(Addresses()), stages_.get());
  coordinator_->LoadStoredModels();
  ASSERT_EQ(coordinator_->GetModel("mlp")->state, ModelState::kUnavailable);
  list_gate.Set(false);
  ASSERT_TRUE(list_gate.WaitHeld(1)) << "a repair is reading the store";
  stages_->AddServer("s1:9000");
  std::thread release([&] {
    absl::SleepFor(absl::Milliseconds(200));
    list_gate.Set(true);
  });
  absl::Status unloaded = coordinator_->Unload("mlp");
  release.join();
  EXPECT_TRUE(unloaded.ok()) << unloaded;
  absl::SleepFor(absl::Milliseconds(500));  // repairs that were due have run
  EXPECT_EQ(coordinator_->GetModel("mlp").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(coordinator_->Serving());
  EXPECT_EQ(StagesLoaded(), 0);
}

// A launcher like the dns one: too few servers now, more later.
class ComeLaterLauncher : public Launcher {
 public:
  explicit ComeLaterLauncher(std::vector<std::string> servers) : servers_(std::move(servers)) {}
  std::string Name() const override { return "come-later"; }
  absl::StatusOr<std::vector<std::string>> ServersFor(int n) override {
    if (!enough.load()) {
      return absl::UnavailableError(absl::StrCat("waiting for ", n, " stage servers: 1 listed"));
    }
    return std::vector<std::string>(servers_.begin(), servers_.begin() + n);
  }
  int ThreadsPerStage(bool) const override { return 0; }
  bool ServersComeLater() const override { return true; }
  std::atomic<bool> enough{false};

 private:
  std::vector<std::string> servers_;
};

// Issue 24: with a launcher whose servers come later, an upload made
// before there are enough is stored and waits, saying for what, and
// deploys by itself once they answer; a re-upload of a model that serves
// fails instead, and the old version keeps serving.
TEST_F(CoordinatorTest, AnUploadWithTooFewServersWaitsForThemStored) {
  auto owned = std::make_unique<ComeLaterLauncher>(Addresses());
  ComeLaterLauncher* launcher = owned.get();
  coordinator_ = std::make_unique<Coordinator>(Options(), *OpenFileModelStore(repo_),
                                               std::move(owned), stages_.get());
  coordinator_->LoadStoredModels();
  const Model m = Mlp(2);
  auto up = Upload("mlp", m);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(up->waiting(), "waiting for 2 stage servers: 1 listed");
  EXPECT_EQ(up->num_stages(), 0);
  auto info = coordinator_->GetModel("mlp");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->state, ModelState::kUnavailable);
  EXPECT_THAT(info->reason, HasSubstr("waiting for 2 stage servers"));
  EXPECT_EQ(info->version, 1);
  EXPECT_THAT(std::string(coordinator_->Find("mlp").status().message()),
              HasSubstr("waiting for 2 stage servers"));

  launcher->enough = true;
  ASSERT_TRUE(WaitReady("mlp"));
  const std::vector<Tensor> in = {Ramp({4, 8}, 1), Ramp({4, 8}, 2)};
  auto out = Infer("mlp", in);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectEqual((*out)[0], Expected(m, in)[0]);

  launcher->enough = false;
  auto again = Upload("mlp", Mlp(2, 8, /*seed=*/2));
  EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable) << again.status();
  EXPECT_EQ(coordinator_->GetModel("mlp")->version, 1);
  EXPECT_TRUE(Infer("mlp", in).ok()) << "the old version serves on";
}

// Item 1's cap: a request's rows are bounded, as Triton bounds a batch.
TEST_F(CoordinatorTest, ARequestOfMoreRowsThanTheLimitIsRefusedNamingIt) {
  CoordinatorOptions o = Options();
  o.max_request_rows = 16;
  TearDown();
  Start(o);
  ASSERT_TRUE(Upload("mlp", Mlp(2)).ok());
  auto out = Infer("mlp", {Ramp({17, 8}, 1), Ramp({17, 8}, 1)});
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << out.status();
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("17 rows"));
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("--max_request_rows"));
  EXPECT_TRUE(Infer("mlp", {Ramp({16, 8}, 1), Ramp({16, 8}, 1)}).ok());
}

}  // namespace
}  // namespace pipeserve
