#include "server/coordinator/launcher.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/testing/temp_dir.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(StaticLauncherTest, StagesGoToServersInOrderWrappingAround) {
  auto l = MakeStaticLauncher({"a:1", "b:1", "c:1"});
  EXPECT_THAT(*l->ServersFor(2), ElementsAre("a:1", "b:1"));
  EXPECT_THAT(*l->ServersFor(5), ElementsAre("a:1", "b:1", "c:1", "a:1", "b:1"));
  EXPECT_EQ(l->ThreadsPerStage(/*stages_take_turns=*/false), 0);
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

// A stand-in stage server: a Python script that listens on a free port,
// writes it where --port_file says, records its arguments in
// `<port_file>.args` and then waits to be stopped.
std::string FakeStageServer() {
  const std::string path = TestTempDir("fake_stage_server") + "/fake_stage_server";
  std::ofstream(path) << R"(#!/usr/bin/env python3
import os, signal, socket, sys
args = sys.argv[1:]
port_file = next(a.split("=", 1)[1] for a in args if a.startswith("--port_file="))
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(16)
with open(port_file + ".args", "w") as f:
    f.write(" ".join(args) + " GOMP_SPINCOUNT=" + os.environ.get("GOMP_SPINCOUNT", "-"))
with open(port_file + ".tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
import os
os.rename(port_file + ".tmp", port_file)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    c, _ = s.accept()
    c.close()
)";
  std::filesystem::permissions(path, std::filesystem::perms::owner_all);
  return path;
}

// The per-GPU path had no test: with GPUs, the local launcher starts one
// server per GPU, each with --device=cuda:<its index>, and places stage i
// on GPU i mod N.
TEST(LocalLauncherTest, WithGpusItStartsOneServerPerGpuEachOnItsDevice) {
  LocalLauncherOptions o;
  o.binary = FakeStageServer();
  o.work_dir = TestTempDir("gpus");
  o.gpus = 2;
  auto l = MakeLocalLauncher(o);
  auto servers = l->ServersFor(3);
  ASSERT_TRUE(servers.ok()) << servers.status();
  ASSERT_EQ(servers->size(), 3u);
  EXPECT_NE((*servers)[0], (*servers)[1]);
  EXPECT_EQ((*servers)[2], (*servers)[0]) << "stage 2 goes to GPU 0's server";
  EXPECT_EQ(l->ThreadsPerStage(/*stages_take_turns=*/false), 1);
  EXPECT_EQ(l->ThreadsPerStage(/*stages_take_turns=*/true), 1);
  EXPECT_FALSE(l->StagesShareCores());
  std::vector<std::string> devices;
  for (const auto& e : std::filesystem::directory_iterator(o.work_dir)) {
    if (e.path().extension() != ".args") continue;
    std::ifstream in(e.path());
    std::string word;
    while (in >> word) {
      if (word.rfind("--device=", 0) == 0) devices.push_back(word);
    }
  }
  std::sort(devices.begin(), devices.end());
  EXPECT_THAT(devices, ElementsAre("--device=cuda:0", "--device=cuda:1"));
  for (const auto& e : std::filesystem::directory_iterator(o.work_dir)) {
    if (e.path().extension() != ".args") continue;
    std::stringstream args;
    args << std::ifstream(e.path()).rdbuf();
    EXPECT_THAT(args.str(), HasSubstr("GOMP_SPINCOUNT=-")) << e.path();
  }
}

// On CPUs the stages divide the cores, unless they take turns (a
// generation model's, one step in flight): then each may use them all.
TEST(LocalLauncherTest, CpuStagesDivideTheCoresUnlessTheyTakeTurns) {
  LocalLauncherOptions o;
  o.binary = FakeStageServer();
  o.work_dir = TestTempDir("cores");
  o.gpus = 0;
  o.cores = 8;
  auto l = MakeLocalLauncher(o);
  ASSERT_TRUE(l->ServersFor(4).ok());
  EXPECT_TRUE(l->StagesShareCores());
  // Their OpenMP threads stop spinning soon after a run, leaving the cores
  // to the next stage (the GPU servers' keep OpenMP's default).
  for (const auto& e : std::filesystem::directory_iterator(o.work_dir)) {
    if (e.path().extension() != ".args") continue;
    std::stringstream args;
    args << std::ifstream(e.path()).rdbuf();
    EXPECT_THAT(args.str(), HasSubstr("GOMP_SPINCOUNT=10000")) << e.path();
  }
  EXPECT_EQ(l->ThreadsPerStage(/*stages_take_turns=*/false), 2);
  EXPECT_EQ(l->ThreadsPerStage(/*stages_take_turns=*/true), 8);
}

}  // namespace
}  // namespace pipeserve
