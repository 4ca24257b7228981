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
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "client/client.h"
#include "tests/cluster.h"
#include "tests/fixtures.h"
#include "tests/load.h"

namespace pipeserve {
namespace {

constexpr int kStages = 4;

// Runs a shell command; its exit status (0: success).
int Sh(const std::string& cmd) {
  int rc = std::system(("(" + cmd + ") >/dev/null 2>&1").c_str());
  return rc == -1 ? -1 : WEXITSTATUS(rc);
}

class NetnsTest : public ::testing::Test {
 protected:
  // Names unique to this run: namespaces psn<pid>s<i>, host-side veths
  // psv<pid>s<i> (at most 15 characters), addresses 10.77.0.10+i.
  static std::string Ns(int i) { return absl::StrCat("psn", ::getpid() % 100000, "s", i); }
  static std::string Veth(int i) { return absl::StrCat("psv", ::getpid() % 100000, "s", i); }
  static std::string Ip(int i) { return absl::StrCat("10.77.0.", 10 + i); }

  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root to create network namespaces";
    if (Sh("command -v ip && command -v tc") != 0) {
      GTEST_SKIP() << "needs iproute2 (ip, tc)";
    }
    // This process, and every process and thread it starts from here on,
    // lives in a namespace of its own: nothing it does reaches the host's
    // network.
    if (::unshare(CLONE_NEWNET) != 0) {
      GTEST_SKIP() << "cannot create a network namespace (unshare: " << std::strerror(errno)
                   << ")";
    }
    ASSERT_EQ(Sh("ip link set lo up"), 0);
    ASSERT_EQ(Sh("ip link add psbr type bridge && ip addr add 10.77.0.1/24 dev psbr && "
                 "ip link set psbr up"),
              0);
    for (int i = 0; i < kStages; ++i) {
      made_.push_back(Ns(i));
      ASSERT_EQ(Sh(absl::StrCat("ip netns add ", Ns(i))), 0) << "ip netns add " << Ns(i);
      ASSERT_EQ(Sh(absl::StrCat("ip link add ", Veth(i), " type veth peer name eth0 netns ",
                                Ns(i), " && ip link set ", Veth(i),
                                " master psbr up && ip -n ", Ns(i), " addr add ", Ip(i),
                                "/24 dev eth0 && ip -n ", Ns(i), " link set eth0 up && ip -n ",
                                Ns(i), " link set lo up")),
                0);
    }
  }

  void TearDown() override {
    servers_.clear();
    for (const std::string& ns : made_) Sh("ip netns del " + ns);
  }

  std::vector<std::string> made_;
  std::vector<std::unique_ptr<StageServerProcess>> servers_;
};

TEST_F(NetnsTest, ACutAndAThrottledLinkLoseNoRequest) {
  auto dir = MakeFixtures({"example_code"}, 16);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto f = LoadFixture(*dir, "example_code");
  ASSERT_TRUE(f.ok());
  const std::string token = absl::StrCat("netns-test-token-", ::getpid());
  std::vector<std::string> addresses;
  for (int i = 0; i < kStages; ++i) {
    auto s = StageServerProcess::Start(
        token, {"--host=" + Ip(i), "--port=9000", "--allow_insecure"},
        {"ip", "netns", "exec", Ns(i)});
    ASSERT_TRUE(s.ok()) << s.status();
    addresses.push_back(Ip(i) + ":9000");
    servers_.push_back(*std::move(s));
  }
  CoordinatorFlags flags{TempDir("netns_repo"),
                         {"--launcher=static",
                          "--stage_servers=" + absl::StrJoin(addresses, ",")},
                         token};
  auto c = CoordinatorProcess::Start(flags);
  ASSERT_TRUE(c.ok()) << c.status();
  auto client = Client::Connect((*c)->address());
  auto first = UploadAndAnswer((*c)->address(), "m", *f);
  ASSERT_TRUE(first.ok()) << first.status();
  const Tensor want = *first;
  const std::vector<NamedTensor> in = NamedInputs(*f);

  auto state = [&] {
    auto plan = (*client)->GetPlan("m");
    return plan.ok() ? plan->state() : std::string("?");
  };
  auto wait_for = [&](const std::function<bool()>& done, absl::Duration limit) {
    absl::Time until = absl::Now() + limit;
    while (!done() && absl::Now() < until) absl::SleepFor(absl::Milliseconds(20));
    return done();
  };
  absl::Duration noticed = absl::InfiniteDuration(), short_took;
  absl::Status short_status;
  absl::Time disrupted;
  auto outcomes = RunLoad(
      (*c)->address(), "m", in, want, 8, absl::Seconds(20), absl::Seconds(3),
      [&] {
        // 1. Stage 2's link goes down for 4 s.
        absl::Time cut = absl::Now();
        ASSERT_EQ(Sh(absl::StrCat("ip link set ", Veth(2), " down")), 0);
        auto quick = (*client)->Infer("m", in, absl::Milliseconds(500));
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

}  // namespace
}  // namespace pipeserve
