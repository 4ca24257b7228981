#include "server/coordinator/dns_launcher.h"

#include <map>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/testing/dnsmasq.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A resolver whose records the test sets.
class FakeResolver : public SrvResolver {
 public:
  explicit FakeResolver(absl::StatusOr<std::vector<SrvTarget>>* records) : records_(records) {}
  absl::StatusOr<std::vector<SrvTarget>> Lookup(const std::string&) override { return *records_; }

 private:
  absl::StatusOr<std::vector<SrvTarget>>* records_;
};

TEST(DnsLauncherTest, TakesServersInOrderOfNameAndLooksAgainEachTime) {
  absl::StatusOr<std::vector<SrvTarget>> records =
      std::vector<SrvTarget>{{"stage-1.stages.", 9000}, {"stage-0.stages.", 9000}};
  auto l = MakeDnsLauncher({"_grpc._tcp.stages", std::make_unique<FakeResolver>(&records)});
  EXPECT_EQ(l->Name(), "dns");
  EXPECT_THAT(*l->ServersFor(2), ElementsAre("stage-0.stages:9000", "stage-1.stages:9000"));
  EXPECT_THAT(l->ExistingServers(), ElementsAre("stage-0.stages:9000", "stage-1.stages:9000"));
  auto three = l->ServersFor(3);
  EXPECT_EQ(three.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(three.status().message()),
              HasSubstr("waiting for 3 stage servers: the DNS name _grpc._tcp.stages lists 2 "
                        "(stage-0.stages:9000, stage-1.stages:9000)"));
  records->push_back({"stage-2.stages.", 9000});  // scaled up
  EXPECT_THAT(*l->ServersFor(3), ElementsAre("stage-0.stages:9000", "stage-1.stages:9000",
                                             "stage-2.stages:9000"));
  records = std::vector<SrvTarget>{{"stage-10.stages.", 9000}, {"stage-2.stages.", 9000},
                                   {"stage-9.stages.", 9000}};
  EXPECT_THAT(l->ExistingServers(), ElementsAre("stage-2.stages:9000", "stage-9.stages:9000",
                                                "stage-10.stages:9000"))
      << "numbers in names are ordered by value, as a StatefulSet counts its pods";
  records = absl::NotFoundError("DNS has no SRV records for _grpc._tcp.stages");
  EXPECT_THAT(std::string(l->ServersFor(1).status().message()),
              HasSubstr("waiting for 1 stage servers: DNS has no SRV records"));
  EXPECT_TRUE(l->ExistingServers().empty());
}

TEST(SystemSrvResolverTest, ReadsTheSrvRecordsOfARealDnsServer) {
  if (!Dnsmasq::Installed()) GTEST_SKIP() << "no dnsmasq (tools/bootstrap.sh installs dnsmasq-base)";
  Dnsmasq dns({"_grpc._tcp.stages.test,stage-1.stages.test,9001",
               "_grpc._tcp.stages.test,stage-0.stages.test,9000"});
  auto resolver = MakeSystemSrvResolver(dns.address());
  absl::StatusOr<std::vector<SrvTarget>> got;
  const absl::Time end = absl::Now() + absl::Seconds(10);
  do {  // until dnsmasq answers
    got = resolver->Lookup("_grpc._tcp.stages.test");
  } while (!got.ok() && absl::Now() < end);
  ASSERT_TRUE(got.ok()) << got.status();
  std::map<std::string, int> found;
  for (const SrvTarget& t : *got) found[t.host] = t.port;
  EXPECT_EQ(found, (std::map<std::string, int>{{"stage-0.stages.test", 9000},
                                               {"stage-1.stages.test", 9001}}));
  auto none = resolver->Lookup("_grpc._tcp.nothing.test");
  EXPECT_FALSE(none.ok());
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("_grpc._tcp.nothing.test"));
  EXPECT_EQ(MakeSystemSrvResolver("not-an-ip")->Lookup("x").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pipeserve
