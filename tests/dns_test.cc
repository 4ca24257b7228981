// The coordinator's dns launcher (--launcher=dns) for real: stage servers
// found in the SRV records of a DNS server (dnsmasq, on a loopback port,
// its records changed by the test as a headless Service's change when pods
// come and go). DnsTest runs the servers on this machine's loopback (each
// record names 127.0.0.1 and a server's port); DnsNetnsTest (its own
// process: //tests:dns_netns_test) puts each in a network namespace of its
// own on port 9000, as pods are, its record naming its address. A model
// needing more servers than are listed is refused naming what it waits
// for; a scale-up is used without a restart; a server that goes away and
// one that replaces it are followed; and a stored model waits, saying so
// in its status, until enough servers answer, then serves.
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/testing/dnsmasq.h"
#include "server/testing/temp_dir.h"
#include "tests/cluster.h"
#include "tests/compare.h"
#include "tests/fixtures.h"
#include "tests/load.h"
#include "tests/test_network.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

constexpr char kName[] = "_grpc._tcp.stages.test";

class DnsTest : public ::testing::Test {
 protected:
  virtual bool InNamespaces() const { return false; }

  void SetUp() override {
    if (!Dnsmasq::Installed()) GTEST_SKIP() << "no dnsmasq (tools/bootstrap.sh installs dnsmasq-base)";
    if (InNamespaces()) {
      if (std::string why = TestNetwork::Unsupported(); !why.empty()) GTEST_SKIP() << why;
      if (absl::Status s = net_.Enter(); !s.ok()) {
        if (s.code() == absl::StatusCode::kFailedPrecondition) GTEST_SKIP() << s.message();
        FAIL() << s;
      }
    }
    auto dir = MakeFixtures({"example_code"}, 16);
    ASSERT_TRUE(dir.ok()) << dir.status();
    auto f = LoadFixture(*dir, "example_code");
    ASSERT_TRUE(f.ok()) << f.status();
    fixture_ = *std::move(f);
    token_ = absl::StrCat("dns-test-token-", ::getpid());
  }

  // Starts one more stage server; its SRV record is added by Publish.
  StageServerProcess* AddServer() {
    const int i = static_cast<int>(servers_.size());
    absl::StatusOr<std::unique_ptr<StageServerProcess>> s;
    if (InNamespaces()) {
      EXPECT_TRUE(net_.AddHost(i).ok());
      s = StageServerProcess::Start(
          token_, {"--host=" + TestNetwork::Ip(i), "--port=9000", "--allow_insecure"},
          TestNetwork::Prefix(i));
    } else {
      s = StageServerProcess::Start(token_);
    }
    EXPECT_TRUE(s.ok()) << s.status();
    servers_.push_back(*std::move(s));
    return servers_.back().get();
  }

  // The DNS name lists exactly `servers`, each as its address and port (a
  // target name gRPC reads as an address: no second lookup, whose c-ares
  // leaks 10 bytes LeakSanitizer would count).
  void Publish(const std::vector<StageServerProcess*>& servers) {
    std::vector<std::string> records;
    for (StageServerProcess* s : servers) {
      const size_t colon = s->address().rfind(':');
      records.push_back(absl::StrCat(kName, ",", s->address().substr(0, colon), ",",
                                     s->address().substr(colon + 1)));
    }
    if (dns_ == nullptr) {
      dns_ = std::make_unique<Dnsmasq>(records);
    } else {
      dns_->Restart(records);
    }
  }

  std::unique_ptr<CoordinatorProcess> StartCoordinator() {
    auto c = CoordinatorProcess::Start(
        {repo_, {"--launcher=dns", absl::StrCat("--stage_dns=", kName),
                 "--stage_dns_server=" + dns_->address()}, token_});
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }

  void ExpectAnswers(const std::string& address) {
    auto client = Client::Connect(address);
    ASSERT_TRUE(client.ok());
    auto out = (*client)->Infer("m", NamedInputs(fixture_), absl::Seconds(60));
    ASSERT_TRUE(out.ok()) << out.status();
    ExpectMatchesPyTorch((*out)[0].tensor, fixture_.expected[0], fixture_.exact[0]);
  }

  // The model's status, as `pipeserve models` shows it.
  ModelSummary Status(const std::string& address) {
    auto client = Client::Connect(address);
    EXPECT_TRUE(client.ok());
    auto models = (*client)->ListModels();
    EXPECT_TRUE(models.ok() && models->size() == 1);
    return models.ok() && !models->empty() ? (*models)[0] : ModelSummary();
  }

  // Refused with 2 of 4 servers listed, scaled up, one replaced, one gone
  // and the model waiting, then one more: the whole test.
  void Scenario();

  TestNetwork net_;  // destroyed last: after the servers in it
  Fixture fixture_;
  std::string token_, repo_ = TestTempDir("dns_repo");
  std::vector<std::unique_ptr<StageServerProcess>> servers_;
  std::unique_ptr<Dnsmasq> dns_;
};

class DnsNetnsTest : public DnsTest {
 protected:
  bool InNamespaces() const override { return true; }
};

TEST_F(DnsTest, StageServersAreFoundInDnsAsTheyComeAndGo) { Scenario(); }
TEST_F(DnsNetnsTest, StageServersInNamespacesAreFoundInDnsAsTheyComeAndGo) { Scenario(); }

void DnsTest::Scenario() {
  StageServerProcess* a = AddServer();
  StageServerProcess* b = AddServer();
  Publish({a, b});
  auto c = StartCoordinator();
  ASSERT_NE(c, nullptr);

  // ExampleCode has 4 stages: 2 listed servers are not enough.
  auto early = UploadAndAnswer(c->address(), "m", fixture_);
  ASSERT_FALSE(early.ok());
  EXPECT_EQ(early.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(early.status().message()),
              HasSubstr(absl::StrCat("waiting for 4 stage servers: the DNS name ", kName,
                                     " lists 2")));

  // Scaled up to 4: the same coordinator uses them.
  StageServerProcess* d3 = AddServer();
  StageServerProcess* d4 = AddServer();
  Publish({a, b, d3, d4});
  auto answer = UploadAndAnswer(c->address(), "m", fixture_);
  ASSERT_TRUE(answer.ok()) << answer.status();
  ExpectMatchesPyTorch(*answer, fixture_.expected[0], fixture_.exact[0]);

  // A server goes away and another takes its place (a pod replaced): the
  // model is repaired onto what DNS lists now.
  servers_[1]->Terminate(absl::Seconds(30));
  StageServerProcess* e = AddServer();
  Publish({a, e, d3, d4});
  ExpectAnswers(c->address());

  // A server gone with none in its place: the model waits, and says for
  // what, then serves once a fourth is listed again.
  servers_[3]->Terminate(absl::Seconds(30));
  Publish({a, e, d3});
  absl::Time end = absl::Now() + absl::Seconds(60);
  ModelSummary waiting = Status(c->address());
  while (waiting.reason().find("waiting for") == std::string::npos && absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(200));  // until a request or a probe finds it gone
    auto client = Client::Connect(c->address());
    if (client.ok()) (void)(*client)->Infer("m", NamedInputs(fixture_), absl::Seconds(2));
    waiting = Status(c->address());
  }
  EXPECT_NE(waiting.state(), "READY");
  EXPECT_THAT(waiting.reason(), HasSubstr(absl::StrCat("waiting for 4 stage servers: the DNS name ",
                                                       kName, " lists 3")));
  StageServerProcess* f = AddServer();
  Publish({a, e, d3, f});
  end = absl::Now() + absl::Seconds(60);
  while (Status(c->address()).state() != "READY" && absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(200));  // the repair loop's next try
  }
  EXPECT_EQ(Status(c->address()).state(), "READY");
  ExpectAnswers(c->address());
}

}  // namespace
}  // namespace pipeserve
