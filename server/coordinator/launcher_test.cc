#include "server/coordinator/launcher.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(StaticLauncherTest, StagesGoToServersInOrderWrappingAround) {
  auto l = MakeStaticLauncher({"a:1", "b:1", "c:1"});
  EXPECT_THAT(*l->ServersFor(2), ElementsAre("a:1", "b:1"));
  EXPECT_THAT(*l->ServersFor(5), ElementsAre("a:1", "b:1", "c:1", "a:1", "b:1"));
  EXPECT_EQ(l->ThreadsPerStage(), 0);
}

TEST(StaticLauncherTest, NoServersIsAFailedPreconditionSayingWhich) {
  auto r = MakeStaticLauncher({})->ServersFor(2);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("--stage_servers is empty"));
}

TEST(LocalLauncherTest, AMissingBinaryIsUnavailableNamingItsLog) {
  LocalLauncherOptions o;
  o.binary = "/nonexistent/stage_server";
  o.work_dir = std::getenv("TEST_TMPDIR");
  o.gpus = 0;
  o.start_timeout = absl::Seconds(10);
  auto r = MakeLocalLauncher(o)->ServersFor(1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("exited at start"));
}

// Regression: a model with 5000 pipe_split markers made the local launcher
// fork 5000 stage servers.
TEST(LocalLauncherTest, AModelNeedingMoreServersThanTheLimitIsRefusedBeforeAnyFork) {
  LocalLauncherOptions o;
  o.binary = "/nonexistent/stage_server";  // would fail if it were started
  o.work_dir = std::getenv("TEST_TMPDIR");
  o.gpus = 0;
  o.max_servers = 8;
  auto r = MakeLocalLauncher(o)->ServersFor(5001);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("needs 5001 stage servers; the local launcher starts at most 8"));
}

}  // namespace
}  // namespace pipeserve
