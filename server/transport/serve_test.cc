#include "server/transport/serve.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

TEST(ListenHostTest, WithoutTlsTheDefaultIsLoopbackOnly) {
  EXPECT_EQ(*ListenHost("", /*tls=*/false, /*allow_insecure=*/false), "127.0.0.1");
  EXPECT_EQ(*ListenHost("", /*tls=*/true, /*allow_insecure=*/false), "0.0.0.0");
}

TEST(ListenHostTest, PlaintextOnANonLoopbackAddressNeedsTheFlag) {
  absl::StatusOr<std::string> h = ListenHost("0.0.0.0", false, false);
  EXPECT_EQ(h.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("--allow_insecure"));
  EXPECT_EQ(*ListenHost("0.0.0.0", false, true), "0.0.0.0");
  EXPECT_EQ(*ListenHost("10.1.2.3", true, false), "10.1.2.3");
  EXPECT_EQ(*ListenHost("127.0.0.5", false, false), "127.0.0.5");
  EXPECT_EQ(*ListenHost("::1", false, false), "::1");
}

TEST(IsLoopbackHostTest, KnowsLoopbackFromEverythingElse) {
  EXPECT_TRUE(IsLoopbackHost("127.0.0.1"));
  EXPECT_TRUE(IsLoopbackHost("localhost"));
  EXPECT_TRUE(IsLoopbackHost("[::1]"));
  EXPECT_FALSE(IsLoopbackHost("0.0.0.0"));
  EXPECT_FALSE(IsLoopbackHost("::"));
  EXPECT_FALSE(IsLoopbackHost("stage-0.pipeserve-stages"));
  EXPECT_FALSE(IsLoopbackHost("128.0.0.1"));
}

}  // namespace
}  // namespace pipeserve
