#include "server/coordinator/worker_pool.h"

#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;

// Regression: one queue for every model, first come first served, so a
// model's request waited behind every request queued before it for any
// other model (head-of-line blocking on ModelStreamInfer).
TEST(WorkerPoolTest, KeysTakeTurnsSoOneKeysBacklogDoesNotHoldUpAnother) {
  std::vector<std::string> ran;
  absl::Mutex mu;
  absl::Notification started, release;
  auto record = [&](std::string what) {
    return [&, what] {
      absl::MutexLock lock(&mu);
      ran.push_back(what);
    };
  };
  {
    WorkerPool pool(1);
    pool.Submit("a", [&] {
      started.Notify();
      release.WaitForNotification();
      record("a1")();
    });
    started.WaitForNotification();
    pool.Submit("a", record("a2"));
    pool.Submit("a", record("a3"));
    pool.Submit("a", record("a4"));
    pool.Submit("b", record("b1"));
    pool.Submit("b", record("b2"));
    EXPECT_EQ(pool.queued(), 5u);
    release.Notify();
  }  // runs what is queued, then joins
  EXPECT_THAT(ran, ElementsAre("a1", "a2", "b1", "a3", "b2", "a4"));
}

}  // namespace
}  // namespace pipeserve
