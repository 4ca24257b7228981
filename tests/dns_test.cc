// The coordinator's dns launcher (--launcher=dns) for real: stage servers
// found in the SRV records of a DNS server (dnsmasq, on a loopback port,
// its records changed by the test as a headless Service's change when pods
// come and go). DnsTest runs the servers on this machine's loopback (each
// record names 127.0.0.1 and a server's port); DnsNetnsTest (its own
// process: //tests:dns_netns_test) puts each in a network namespace of its
// own on port 9000, as pods are, its record naming a host name whose A
// record is its address (dnsmasq on the namespaces' bridge, and every
// process's /etc/resolv.conf pointing there). A model needing more servers
// than are listed is refused naming what it waits for; a scale-up is used
// without a restart; a server that goes away and one that replaces it are
// followed; a stored model waits, saying so in its status, until enough
// servers answer, then serves; and (in namespaces) a server replaced under
// the same name at a new address, as a StatefulSet replaces a pod, is
// followed too.
#include <iostream>
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
constexpr char kBridge[] = "10.77.0.1";  // TestNetwork's

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
      // Host names need every process to resolve through dnsmasq; where a
      // mount namespace is refused, records name addresses, and only the
      // replaced-under-its-name part is skipped.
      absl::Status dns = net_.UseNameserver(kBridge);
      names_in_dns_ = dns.ok();
      if (!dns.ok()) std::cerr << "no host names in DNS: " << dns.message() << "\n";
    }
    auto dir = MakeFixtures({"example_code"}, 16);
    ASSERT_TRUE(dir.ok()) << dir.status();
    auto f = LoadFixture(*dir, "example_code");
    ASSERT_TRUE(f.ok()) << f.status();
    fixture_ = *std::move(f);
    token_ = absl::StrCat("dns-test-token-", ::getpid());
  }

  // Starts one more stage server; its SRV record is added by Publish. In
  // namespaces its host name is `name` (default s<i>.stages.test).
  StageServerProcess* AddServer(std::string name = "") {
    const int i = static_cast<int>(servers_.size());
    names_.push_back(name.empty() ? absl::StrCat("s", i, ".stages.test") : name);
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

  // The DNS name lists exactly `servers`: on loopback each as its address
  // and port (a target name gRPC reads as an address), in namespaces as its
  // host name, port 9000, and an A record.
  void Publish(const std::vector<StageServerProcess*>& servers) {
    std::vector<std::string> srv, hosts;
    for (StageServerProcess* s : servers) {
      const size_t colon = s->address().rfind(':');
      const std::string ip = s->address().substr(0, colon);
      const std::string target = names_in_dns_ ? NameOf(s) : ip;
      srv.push_back(absl::StrCat(kName, ",", target, ",", s->address().substr(colon + 1)));
      if (names_in_dns_) hosts.push_back(absl::StrCat(target, ",", ip));
    }
    if (dns_ == nullptr) {
      dns_ = std::make_unique<Dnsmasq>(DnsRecords{
          .srv_hosts = srv, .host_records = hosts, .listen = InNamespaces() ? kBridge : ""});
    } else {
      dns_->Restart(srv, hosts);
    }
  }

  std::string NameOf(StageServerProcess* s) const {
    for (size_t i = 0; i < servers_.size(); ++i) {
      if (servers_[i].get() == s) return names_[i];
    }
    return "";
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

  // Until the model is READY (the repair loop's next try), up to a minute.
  void WaitReady(const std::string& address) {
    const absl::Time end = absl::Now() + absl::Seconds(60);
    while (Status(address).state() != "READY" && absl::Now() < end) {
      absl::SleepFor(absl::Milliseconds(200));
    }
    EXPECT_EQ(Status(address).state(), "READY") << Status(address).reason();
  }

  // The model's status, as `pipeserve models` shows it.
  ModelSummary Status(const std::string& address) {
    auto client = Client::Connect(address);
    EXPECT_TRUE(client.ok());
    auto models = (*client)->ListModels();
    EXPECT_TRUE(models.ok() && models->size() == 1);
    return models.ok() && !models->empty() ? (*models)[0] : ModelSummary();
  }

  // ExampleCode has 4 stages: `listed` servers are not enough. The upload
  // is stored and waits, saying for what, in its answer and its status.
  void ExpectUploadWaitsFor(const std::string& address, int listed) {
    auto client = Client::Connect(address);
    ASSERT_TRUE(client.ok());
    auto early = (*client)->Upload("m", fixture_.path, UploadOptions());
    ASSERT_TRUE(early.ok()) << early.status();
    const std::string waits =
        absl::StrCat("waiting for 4 stage servers: the DNS name ", kName, " lists ", listed);
    EXPECT_THAT(early->waiting, HasSubstr(waits));
    EXPECT_EQ(early->num_stages, 0);
    EXPECT_EQ(Status(address).state(), "UNAVAILABLE");
    EXPECT_THAT(Status(address).reason(), HasSubstr(waits));
    auto refused = (*client)->Infer("m", NamedInputs(fixture_), absl::Seconds(5));
    EXPECT_FALSE(refused.ok());
    EXPECT_THAT(std::string(refused.status().message()), HasSubstr(waits));
  }

  // Each pod replaced under its name at a new address (a StatefulSet's
  // stage-1 recreated elsewhere), one at a time: the name now leads to a
  // server that has never loaded the stage, and the model is repaired onto
  // it, whichever stage it held (the coordinator's stream into stage 0,
  // links between stages, the results stream from the last).
  void ReplaceEachUnderItsName(const std::string& address, std::vector<StageServerProcess*> now) {
    for (StageServerProcess*& old : now) {
      const std::string name = NameOf(old);
      old->Terminate(absl::Seconds(30));
      old = AddServer(name);
      Publish(now);
      ExpectAnswers(address);
      EXPECT_EQ(Status(address).state(), "READY") << name;
    }
  }

  // An upload waiting with 2 of 4 servers listed, scaled up, one
  // replaced, one gone and the model waiting, then one more, then (with
  // names in DNS) each replaced under its name: the whole test.
  void Scenario();

  TestNetwork net_;  // destroyed last: after the servers in it
  Fixture fixture_;
  std::string token_, repo_ = TestTempDir("dns_repo");
  std::vector<std::unique_ptr<StageServerProcess>> servers_;
  std::vector<std::string> names_;  // servers_[i]'s host name in namespaces
  bool names_in_dns_ = false;        // SRV targets are names with A records
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

  ExpectUploadWaitsFor(c->address(), 2);
  if (HasFatalFailure()) return;

  // Scaled up to 4: the same coordinator deploys it, with no new upload.
  StageServerProcess* d3 = AddServer();
  StageServerProcess* d4 = AddServer();
  Publish({a, b, d3, d4});
  WaitReady(c->address());
  ExpectAnswers(c->address());

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
  WaitReady(c->address());
  ExpectAnswers(c->address());
  if (!names_in_dns_) return;  // (the loopback test names addresses)

  ReplaceEachUnderItsName(c->address(), {a, e, d3, f});
}

}  // namespace
}  // namespace pipeserve
