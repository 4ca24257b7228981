// Zero lost requests, end to end: a real coordinator process and its stage
// server processes under 16 concurrent clients, while a stage server is
// killed with SIGKILL or the model is uploaded again (every request must
// succeed with the right answer; each prints a table with the latencies,
// p99 during the disruption included); a coordinator restarted beside
// stage servers that kept their stages; and a SIGTERM with a request in
// flight.
#include <signal.h>
#include <sys/wait.h>

#include <cstdio>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "client/client.h"
#include "server/testing/temp_dir.h"
#include "tests/cluster.h"
#include "tests/fixtures.h"
#include "tests/load.h"

namespace pipeserve {
namespace {

constexpr int kClients = 16;

class ReliabilityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto dir = MakeFixtures({"example_code"}, 16);
    ASSERT_TRUE(dir.ok()) << dir.status();
    auto f = LoadFixture(*dir, "example_code");
    ASSERT_TRUE(f.ok()) << f.status();
    fixture_ = *std::move(f);
    auto c = CoordinatorProcess::Start({TestTempDir("reliability_repo"), {}});
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = *std::move(c);
    auto client = Client::Connect(coordinator_->address());
    ASSERT_TRUE(client.ok());
    client_ = *std::move(client);
    UploadOptions options;
    options.set_replicas(Replicas());
    auto first = UploadAndAnswer(coordinator_->address(), "m", fixture_, options);
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_EQ(client_->GetPlan("m")->stage_servers_size(), 4 * Replicas());
    want_ = *first;
    inputs_ = NamedInputs(fixture_);
  }

  virtual int Replicas() const { return 1; }

  Fixture fixture_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<Client> client_;
  std::vector<NamedTensor> inputs_;
  Tensor want_;
};

TEST_F(ReliabilityTest, KillingAStageServerUnderLoadLosesNoRequest) {
  pid_t victim = coordinator_->StageServerPid(2);
  ASSERT_GT(victim, 0);
  std::string before = client_->GetPlan("m")->stage_servers(2);
  absl::Time killed;
  auto outcomes = RunLoad(
      coordinator_->address(), "m", inputs_, want_, kClients, absl::Seconds(20), absl::Seconds(5),
      [&] { ASSERT_EQ(::kill(victim, SIGKILL), 0); }, &killed);
  Report("kill -9 stage server 2 of 4", outcomes, killed);
  EXPECT_NE(client_->GetPlan("m")->stage_servers(2), before) << "stage 2 moved to a new server";
}

// The same model in 2 replicas (2 lanes of 4 stage servers): a replica
// dying hands its lane's microbatches to the other lane at once, and only
// that lane is reloaded (same deployment).
class ReplicatedReliabilityTest : public ReliabilityTest {
 protected:
  int Replicas() const override { return 2; }
};

TEST_F(ReplicatedReliabilityTest, KillingAReplicaUnderLoadLosesNoRequestAndRedeploysNothing) {
  pid_t victim = coordinator_->StageServerPid(6);  // replica 1's stage 2
  ASSERT_GT(victim, 0);
  const GetPlanResponse before = *client_->GetPlan("m");
  ASSERT_EQ(before.ready_replicas(), 2);
  absl::Time killed;
  auto outcomes = RunLoad(
      coordinator_->address(), "m", inputs_, want_, kClients, absl::Seconds(20), absl::Seconds(5),
      [&] { ASSERT_EQ(::kill(victim, SIGKILL), 0); }, &killed);
  Report("kill -9 replica 1's stage 2 (2 x 4)", outcomes, killed);
  const GetPlanResponse after = *client_->GetPlan("m");
  EXPECT_EQ(after.deployment(), before.deployment()) << "the lane was reloaded, not the model";
  EXPECT_NE(after.stage_servers(6), before.stage_servers(6)) << "on a new server";
  for (int i : {0, 1, 2, 3, 4, 5, 7}) EXPECT_EQ(after.stage_servers(i), before.stage_servers(i));
  EXPECT_EQ(after.ready_replicas(), 2);
}

TEST_F(ReliabilityTest, ReuploadingUnderLoadLosesNoRequest) {
  absl::Time uploaded;
  absl::Status upload;
  auto outcomes = RunLoad(
      coordinator_->address(), "m", inputs_, want_, kClients, absl::Seconds(12), absl::Seconds(4),
      [&] {
        auto client = Client::Connect(coordinator_->address());
        upload = (*client)->Upload("m", fixture_.path, {}).status();
      },
      &uploaded);
  ASSERT_TRUE(upload.ok()) << upload;
  Report("re-upload of the model", outcomes, uploaded);
}

// Stage servers that outlive the coordinator (the static launcher, as on
// Kubernetes) keep their stages; a restarted coordinator adopts them and
// serves again at once, without sending a weight (same deployment id).
TEST(RestartTest, ARestartedCoordinatorAdoptsLoadedStagesAndServesAtOnce) {
  auto dir = MakeFixtures({"example_code"}, 16);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto f = LoadFixture(*dir, "example_code");
  ASSERT_TRUE(f.ok());
  const std::string token = absl::StrCat("restart-test-token-", ::getpid());
  std::vector<std::unique_ptr<StageServerProcess>> servers;
  std::string list;
  for (int i = 0; i < 4; ++i) {
    auto s = StageServerProcess::Start(token);
    ASSERT_TRUE(s.ok()) << s.status();
    absl::StrAppend(&list, i ? "," : "", (*s)->address());
    servers.push_back(*std::move(s));
  }
  const std::string repo = TestTempDir("restart_repo");
  CoordinatorFlags flags{repo, {"--launcher=static", "--stage_servers=" + list}, token};
  const std::vector<NamedTensor> in = NamedInputs(*f);
  uint64_t deployment = 0;
  Tensor want;
  {
    auto c = CoordinatorProcess::Start(flags);
    ASSERT_TRUE(c.ok()) << c.status();
    auto first = UploadAndAnswer((*c)->address(), "m", *f);
    ASSERT_TRUE(first.ok()) << first.status();
    want = *first;
    deployment = (*Client::Connect((*c)->address()))->GetPlan("m")->deployment();
    ASSERT_GE((*c)->Terminate(absl::Seconds(30)), 0);
  }
  absl::Time start = absl::Now();
  auto c = CoordinatorProcess::Start(flags);  // returns once health says SERVING
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = Client::Connect((*c)->address());
  auto out = (*client)->Infer("m", in);
  const absl::Duration serving_again = absl::Now() - start;
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(SameAnswer((*out)[0].tensor, want));
  EXPECT_EQ((*client)->GetPlan("m")->deployment(), deployment) << "adopted, not loaded again";
  std::printf("restarted coordinator answered %.2f s after it was started (deployment %llu "
              "adopted)\n",
              absl::ToDoubleSeconds(serving_again), static_cast<unsigned long long>(deployment));
  EXPECT_LT(serving_again, absl::Seconds(2));
}

// SIGTERM: health turns NOT_SERVING, the request in flight finishes, and
// the coordinator exits 0 (regression: it gave requests 5 s, whatever
// they needed).
TEST(ShutdownTest, SigtermLetsARequestInFlightFinishThenExitsZero) {
  auto c = CoordinatorProcess::Start({TestTempDir("shutdown_repo"), {"--shutdown_grace_s=60"}});
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = Client::Connect((*c)->address());
  ASSERT_TRUE(client.ok());
  UploadOptions sixteen;
  sixteen.set_microbatches(16);
  ASSERT_TRUE((*client)->Upload("deep", WriteDeepMlp(TestTempDir("deep")), sixteen).ok());
  auto plan = (*client)->GetPlan("deep");
  ASSERT_TRUE(plan.ok());
  const int64_t rows = 32768;  // seconds longer after the signal than the old 5 s grace
  absl::StatusOr<std::vector<NamedTensor>> out;
  absl::Duration took;
  std::thread request([&] {
    absl::Time start = absl::Now();
    out = (*client)->Infer("deep", {{"x", Tensor::Zeros({rows, 512})}}, absl::Seconds(120));
    took = absl::Now() - start;
  });
  // In flight: stage 0 has computed a microbatch of it.
  absl::Time until = absl::Now() + absl::Seconds(60);
  while (absl::Now() < until) {
    auto stats = StageStats(*plan, 0, (*c)->cluster_token());
    if (stats.ok() && stats->frames_processed() > 0) break;
    absl::SleepFor(absl::Milliseconds(5));
  }
  absl::Time signalled = absl::Now();
  int status = (*c)->Terminate(absl::Seconds(90));
  request.join();
  ASSERT_TRUE(out.ok()) << out.status() << " after " << took;
  EXPECT_EQ((*out)[0].tensor.dim(0), rows);
  ASSERT_NE(status, -1) << "did not exit within 90 s";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "wait status " << status;
  std::printf("request took %.1f s; the coordinator exited %.1f s after SIGTERM\n",
              absl::ToDoubleSeconds(took), absl::ToDoubleSeconds(absl::Now() - signalled));
}

}  // namespace
}  // namespace pipeserve
