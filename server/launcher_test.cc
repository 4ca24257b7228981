#include "server/launcher.h"

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

}  // namespace
}  // namespace pipeserve
