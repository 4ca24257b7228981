// Real network faults on one machine: this test moves itself into a new
// network namespace (before any thread starts), where it runs the
// coordinator (static launcher) and the clients, and puts each of four
// stage servers in a namespace of its own, linked by veth pairs to a
// bridge. Under load from 8 clients it cuts one stage's link (ip link set
// down) and restores it, then throttles another (tc tbf; these kernels
// have no netem) and lifts it. Every request must succeed with the right
// answer; the cut must be noticed within about 2 s; a request with a short
// deadline must come back by its deadline while the link is down. Traffic
// goes only to addresses inside the namespaces the test creates. Skips,
// saying why, where namespaces cannot be made (not root, no iproute2).
//
// The same with two replicas of every stage (eight stage servers): a cut
// link of one replica moves its work to the other at once, so no request
// waits for the link to come back.
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "client/client.h"
#include "common/status_macros.h"
#include "server/testing/temp_dir.h"
#include "tests/cluster.h"
#include "tests/fixtures.h"
#include "tests/load.h"
#include "tests/test_network.h"

namespace pipeserve {
namespace {

constexpr int kStages = 4;

class NetnsTest : public ::testing::Test {
 protected:
  static std::string Ns(int i) { return TestNetwork::Ns(i); }
  static std::string Veth(int i) { return TestNetwork::Veth(i); }
  static std::string Ip(int i) { return TestNetwork::Ip(i); }

  void SetUp() override {
    if (std::string why = TestNetwork::Unsupported(); !why.empty()) GTEST_SKIP() << why;
    if (absl::Status s = net_.Enter(); !s.ok()) {
      if (s.code() == absl::StatusCode::kFailedPrecondition) GTEST_SKIP() << s.message();
      FAIL() << s;
    }
    for (int i = 0; i < kStages * Replicas(); ++i) ASSERT_TRUE(net_.AddHost(i).ok()) << i;
  }

  void TearDown() override { servers_.clear(); }

  virtual int Replicas() const { return 1; }

  // Starts a stage server in each namespace, a coordinator (static
  // launcher) over them, and uploads the example as "m" in Replicas();
  // returns its first answer.
  absl::StatusOr<Tensor> StartCluster(const Fixture& f) {
    const std::string token = absl::StrCat("netns-test-token-", ::getpid());
    std::vector<std::string> addresses;
    for (int i = 0; i < kStages * Replicas(); ++i) {
      ASSIGN_OR_RETURN(std::unique_ptr<StageServerProcess> s,
                       StageServerProcess::Start(
                           token, {"--host=" + Ip(i), "--port=9000", "--allow_insecure"},
                           {"ip", "netns", "exec", Ns(i)}));
      addresses.push_back(Ip(i) + ":9000");
      servers_.push_back(std::move(s));
    }
    CoordinatorFlags flags{TestTempDir("netns_repo"),
                           {"--launcher=static",
                            "--stage_servers=" + absl::StrJoin(addresses, ",")},
                           token};
    ASSIGN_OR_RETURN(coordinator_, CoordinatorProcess::Start(flags));
    ASSIGN_OR_RETURN(client_, Client::Connect(coordinator_->address()));
    UploadOptions options;
    options.set_replicas(Replicas());
    return UploadAndAnswer(coordinator_->address(), "m", f, options);
  }

  // The seed's ExampleCode at batch 16.
  static absl::StatusOr<Fixture> Example() {
    ASSIGN_OR_RETURN(std::string dir, MakeFixtures({"example_code"}, 16));
    return LoadFixture(dir, "example_code");
  }

  GetPlanResponse Plan() {
    auto plan = client_->GetPlan("m");
    return plan.ok() ? *plan : GetPlanResponse();
  }

  static bool WaitFor(const std::function<bool()>& done, absl::Duration limit) {
    absl::Time until = absl::Now() + limit;
    while (!done() && absl::Now() < until) absl::SleepFor(absl::Milliseconds(20));
    return done();
  }

  TestNetwork net_;  // destroyed last: after the servers in it
  std::vector<std::unique_ptr<StageServerProcess>> servers_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<Client> client_;
};

TEST_F(NetnsTest, ACutAndAThrottledLinkLoseNoRequest) {
  auto f = Example();
  ASSERT_TRUE(f.ok()) << f.status();
  auto first = StartCluster(*f);
  ASSERT_TRUE(first.ok()) << first.status();
  const Tensor want = *first;
  const std::vector<NamedTensor> in = NamedInputs(*f);
  auto state = [&] { return Plan().state(); };
  auto& client = client_;
  auto& wait_for = WaitFor;
  absl::Duration noticed = absl::InfiniteDuration(), short_took;
  absl::Status short_status;
  absl::Time disrupted;
  auto outcomes = RunLoad(
      coordinator_->address(), "m", in, want, 8, absl::Seconds(20), absl::Seconds(3),
      [&] {
        // 1. Stage 2's link goes down for 4 s.
        absl::Time cut = absl::Now();
        ASSERT_EQ(Sh(absl::StrCat("ip link set ", Veth(2), " down")), 0);
        auto quick = client->Infer("m", in, absl::Milliseconds(500));
        short_took = absl::Now() - cut;
        short_status = quick.status();
        if (wait_for([&] { return state() != "READY"; }, absl::Seconds(10))) {
          noticed = absl::Now() - cut;
        }
        absl::SleepFor(cut + absl::Seconds(4) - absl::Now());
        ASSERT_EQ(Sh(absl::StrCat("ip link set ", Veth(2), " up")), 0);
        EXPECT_TRUE(wait_for([&] { return state() == "READY"; }, absl::Seconds(20)))
            << "the model came back once the link did";
        // 2. Stage 1's link throttled to 8 Mbit/s for 3 s.
        ASSERT_EQ(Sh(absl::StrCat("tc qdisc add dev ", Veth(1),
                                  " root tbf rate 8mbit burst 64kb latency 200ms")),
                  0);
        absl::SleepFor(absl::Seconds(3));
        ASSERT_EQ(Sh(absl::StrCat("tc qdisc del dev ", Veth(1), " root")), 0);
      },
      &disrupted);
  Report("link cut 4 s, then throttled", outcomes, disrupted, absl::Seconds(10));
  std::printf("cut noticed after %.2f s; a 500 ms request during the cut ended after %.2f s "
              "with %s\n",
              absl::ToDoubleSeconds(noticed), absl::ToDoubleSeconds(short_took),
              short_status.ToString().c_str());
  EXPECT_LT(noticed, absl::Seconds(3)) << "the cut was noticed within about 2 s";
  EXPECT_EQ(short_status.code(), absl::StatusCode::kDeadlineExceeded) << short_status;
  EXPECT_LT(short_took, absl::Milliseconds(1500)) << "no wait past the deadline";
}

class ReplicatedNetnsTest : public NetnsTest {
 protected:
  int Replicas() const override { return 2; }
};

// Replica 1's stage 2 loses its link for 4 s: its lane is taken out (the
// model stays READY on the other), no request waits for the link, and
// the lane is loaded again once the link is back.
TEST_F(ReplicatedNetnsTest, ACutLinkOfOneReplicaMovesItsWorkToTheOther) {
  auto f = Example();
  ASSERT_TRUE(f.ok()) << f.status();
  auto first = StartCluster(*f);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(Plan().ready_replicas(), 2);
  const uint64_t deployment = Plan().deployment();
  const int victim = kStages + 2;  // replica 1's stage 2
  absl::Duration noticed = absl::InfiniteDuration();
  bool stayed_ready = true, came_back = false;
  absl::Time disrupted;
  auto outcomes = RunLoad(
      coordinator_->address(), "m", NamedInputs(*f), *first, 8, absl::Seconds(16),
      absl::Seconds(3),
      [&] {
        absl::Time cut = absl::Now();
        ASSERT_EQ(Sh(absl::StrCat("ip link set ", Veth(victim), " down")), 0);
        if (WaitFor([&] { return Plan().ready_replicas() < 2; }, absl::Seconds(10))) {
          noticed = absl::Now() - cut;
        }
        stayed_ready = Plan().state() == "READY";
        absl::SleepFor(cut + absl::Seconds(4) - absl::Now());
        ASSERT_EQ(Sh(absl::StrCat("ip link set ", Veth(victim), " up")), 0);
        came_back = WaitFor([&] { return Plan().ready_replicas() == 2; }, absl::Seconds(30));
      },
      &disrupted);
  Report("replica link cut 4 s (2 x 4)", outcomes, disrupted, absl::Seconds(5));
  double slowest = 0;
  for (const Outcome& o : outcomes) {
    slowest = std::max(slowest, absl::ToDoubleSeconds(o.latency));
  }
  std::printf("cut noticed after %.2f s; slowest request %.2f s (the link was down 4 s)\n",
              absl::ToDoubleSeconds(noticed), slowest);
  EXPECT_LT(noticed, absl::Seconds(3)) << "the cut was noticed within about 2 s";
  EXPECT_TRUE(stayed_ready) << "the other replica kept the model READY";
  EXPECT_LT(slowest, 3.5) << "no request waited for the link to come back";
  EXPECT_TRUE(came_back) << "the lane was loaded again once its link was back";
  EXPECT_EQ(Plan().deployment(), deployment) << "the lane was reloaded, not the model";
}

}  // namespace
}  // namespace pipeserve
