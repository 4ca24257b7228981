// Zero lost requests, end to end: a real coordinator process and its stage
// server processes under 16 concurrent clients, while a stage server is
// killed with SIGKILL or the model is uploaded again. Every request must
// succeed with the right answer; each test prints a table with the
// latencies, p99 during the disruption included.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <functional>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "client/client.h"
#include "tests/cluster.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

constexpr int kClients = 16;

struct Outcome {
  absl::Time start;
  absl::Duration latency;
  absl::Status status;
  bool right = false;
};

// Whether `got` is `want` (the answer before any disruption) up to float
// rounding.
bool SameAnswer(const Tensor& got, const Tensor& want) {
  if (got.shape() != want.shape()) return false;
  for (int64_t i = 0; i < want.numel(); ++i) {
    float a = got.data()[i], b = want.data()[i];
    if (!(std::fabs(a - b) <= 1e-5f * (1 + std::fabs(b)))) return false;
  }
  return true;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

// Runs kClients clients sending `inputs` to `model` for `length`, calling
// `disrupt` once from another thread after `after`; returns every request's
// outcome and the time `disrupt` was called.
std::vector<Outcome> RunLoad(const std::string& address, const std::string& model,
                             const std::vector<NamedTensor>& inputs, const Tensor& want,
                             absl::Duration length, absl::Duration after,
                             const std::function<void()>& disrupt, absl::Time* disrupted) {
  absl::Mutex mu;
  std::vector<Outcome> outcomes;
  const absl::Time start = absl::Now(), end = start + length;
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&] {
      auto client = Client::Connect(address);
      if (!client.ok()) {
        absl::MutexLock lock(&mu);
        outcomes.push_back({absl::Now(), absl::ZeroDuration(), client.status(), false});
        return;
      }
      while (absl::Now() < end) {
        Outcome o;
        o.start = absl::Now();
        auto out = (*client)->Infer(model, inputs, absl::Seconds(30));
        o.latency = absl::Now() - o.start;
        o.status = out.status();
        o.right = out.ok() && !out->empty() && SameAnswer((*out)[0].tensor, want);
        absl::MutexLock lock(&mu);
        outcomes.push_back(o);
      }
    });
  }
  absl::SleepFor(after);
  *disrupted = absl::Now();
  disrupt();
  for (std::thread& t : clients) t.join();
  return outcomes;
}

// Prints the table (p99 and max latency of the requests started from 1 s
// before the disruption to 5 s after) and checks: no request failed, no answer was wrong.
void Report(const std::string& what, const std::vector<Outcome>& outcomes, absl::Time disrupted) {
  int failed = 0, wrong = 0;
  std::vector<double> all, during;
  absl::Status first_error;
  for (const Outcome& o : outcomes) {
    if (!o.status.ok()) {
      ++failed;
      if (first_error.ok()) first_error = o.status;
    } else if (!o.right) {
      ++wrong;
    }
    double ms = absl::ToDoubleMilliseconds(o.latency);
    all.push_back(ms);
    if (o.start >= disrupted - absl::Seconds(1) && o.start < disrupted + absl::Seconds(5)) {
      during.push_back(ms);
    }
  }
  std::printf("\n%-30s %9s %7s %6s %8s %8s %15s %15s\n", what.c_str(), "requests", "failed",
              "wrong", "p50 ms", "p99 ms", "p99 disrupt ms", "max disrupt ms");
  std::printf("%-30s %9zu %7d %6d %8.1f %8.1f %15.1f %15.1f\n", "", outcomes.size(), failed,
              wrong, Percentile(all, 0.5), Percentile(all, 0.99), Percentile(during, 0.99),
              Percentile(during, 1.0));
  EXPECT_GT(outcomes.size(), static_cast<size_t>(kClients));
  EXPECT_EQ(failed, 0) << "first failure: " << first_error;
  EXPECT_EQ(wrong, 0);
}

class ReliabilityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto dir = MakeFixtures({"example_code"}, 16);
    ASSERT_TRUE(dir.ok()) << dir.status();
    auto f = LoadFixture(*dir, "example_code");
    ASSERT_TRUE(f.ok()) << f.status();
    fixture_ = *std::move(f);
    auto c = CoordinatorProcess::Start({TempDir("reliability_repo"), {}});
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = *std::move(c);
    auto client = Client::Connect(coordinator_->address());
    ASSERT_TRUE(client.ok());
    client_ = *std::move(client);
    auto up = client_->Upload("m", fixture_.path, {});
    ASSERT_TRUE(up.ok()) << up.status();
    ASSERT_EQ(up->num_stages, 4);
    for (int i = 0; i < fixture_.model.graph.inputs_size(); ++i) {
      inputs_.push_back({fixture_.model.graph.inputs(i).name(), fixture_.inputs[i]});
    }
    auto out = client_->Infer("m", inputs_);
    ASSERT_TRUE(out.ok()) << out.status();
    want_ = (*out)[0].tensor;
  }

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
      coordinator_->address(), "m", inputs_, want_, absl::Seconds(20), absl::Seconds(5),
      [&] { ASSERT_EQ(::kill(victim, SIGKILL), 0); }, &killed);
  Report("kill -9 stage server 2 of 4", outcomes, killed);
  EXPECT_NE(client_->GetPlan("m")->stage_servers(2), before) << "stage 2 moved to a new server";
}

TEST_F(ReliabilityTest, ReuploadingUnderLoadLosesNoRequest) {
  absl::Time uploaded;
  absl::Status upload;
  auto outcomes = RunLoad(
      coordinator_->address(), "m", inputs_, want_, absl::Seconds(12), absl::Seconds(4),
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
  const std::string repo = TempDir("restart_repo");
  CoordinatorFlags flags{repo, {"--launcher=static", "--stage_servers=" + list}, token};
  std::vector<NamedTensor> in;
  for (int i = 0; i < f->model.graph.inputs_size(); ++i) {
    in.push_back({f->model.graph.inputs(i).name(), f->inputs[i]});
  }
  uint64_t deployment = 0;
  Tensor want;
  {
    auto c = CoordinatorProcess::Start(flags);
    ASSERT_TRUE(c.ok()) << c.status();
    auto client = Client::Connect((*c)->address());
    ASSERT_TRUE((*client)->Upload("m", f->path, {}).ok());
    deployment = (*client)->GetPlan("m")->deployment();
    auto out = (*client)->Infer("m", in);
    ASSERT_TRUE(out.ok()) << out.status();
    want = (*out)[0].tensor;
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
  auto c = CoordinatorProcess::Start({TempDir("shutdown_repo"), {"--shutdown_grace_s=60"}});
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = Client::Connect((*c)->address());
  ASSERT_TRUE(client.ok());
  UploadOptions sixteen;
  sixteen.set_microbatches(16);
  ASSERT_TRUE((*client)->Upload("deep", WriteDeepMlp(TempDir("deep")), sixteen).ok());
  auto plan = (*client)->GetPlan("deep");
  ASSERT_TRUE(plan.ok());
  const int64_t rows = 16384;  // longer after the signal than the old 5 s grace
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
