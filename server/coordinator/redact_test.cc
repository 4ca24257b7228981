#include "server/coordinator/redact.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(RedactAddressesTest, KnownAddressesAndHostPortsBecomeAStageServer) {
  EXPECT_EQ(RedactAddresses("stage 1 on s1:9000 failed its health check", {"s1:9000"}),
            "stage 1 on a stage server failed its health check");
  EXPECT_EQ(RedactAddresses("the results stream from the last stage (127.0.0.1:40013) ended", {}),
            "the results stream from the last stage (a stage server) ended");
  EXPECT_EQ(RedactAddresses("failed to connect to all addresses; last error: UNKNOWN: "
                            "ipv4:10.0.0.7:9000: Failed to connect to remote host",
                            {}),
            "failed to connect to all addresses; last error: UNKNOWN: a stage server: Failed to "
            "connect to remote host");
  EXPECT_EQ(RedactAddresses("peer ipv6:[::1]:9000 and [fe80::1]:81", {}),
            "peer a stage server and a stage server");
  EXPECT_EQ(RedactAddresses("dialing stage-0.pipeserve-stages:9000 or localhost:9001", {}),
            "dialing a stage server or a stage server");
  EXPECT_THAT(RedactAddresses("connect to unix:/tmp/pipeserve-1/s.sock failed", {}),
              Not(HasSubstr("/tmp/pipeserve")));
}

TEST(RedactAddressesTest, MessagesWithoutAddressesAreKept) {
  for (const char* m : {"input \"x\": shape [16,256] does not match [B,512]",
                        "stage 1: out of memory running the stage; send fewer rows",
                        "model \"m\" has no version \"2\" (it serves version 1)",
                        "missed its deadline with 3 of 4 microbatches unfinished",
                        "at flat index 16) is out of range"}) {
    EXPECT_EQ(RedactAddresses(m, {"s0:9000"}), m);
  }
}

TEST(RedactAddressesTest, AStatusKeepsItsCodeAndPayloads) {
  absl::Status s = absl::UnavailableError("stage 0 on 10.1.2.3:9000 is gone");
  s.SetPayload("type.example/x", absl::Cord("y"));
  absl::Status r = RedactAddresses(s, {});
  EXPECT_EQ(r.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(r.message(), "stage 0 on a stage server is gone");
  EXPECT_TRUE(r.GetPayload("type.example/x").has_value());
}

}  // namespace
}  // namespace pipeserve
