#include "server/coordinator/worker_pool.h"

#include <atomic>
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

// Turns alone do not help while every thread runs one key's slow work (a
// model waiting for its repair holds its requests up to their deadline):
// one key runs on all threads but one.
TEST(WorkerPoolTest, OneKeyNeverTakesTheLastThread) {
  absl::Notification release, b_ran;
  std::atomic<int> a_running{0};
  {
    WorkerPool pool(3);
    for (int i = 0; i < 5; ++i) {
      pool.Submit("a", [&] {
        ++a_running;
        release.WaitForNotification();
      });
    }
    pool.Submit("b", [&] { b_ran.Notify(); });
    EXPECT_TRUE(b_ran.WaitForNotificationWithTimeout(absl::Seconds(10)))
        << "b waited behind a's stuck work";
    for (absl::Time until = absl::Now() + absl::Seconds(10); a_running < 2 && absl::Now() < until;) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    absl::SleepFor(absl::Milliseconds(20));  // a third would start now if it could
    EXPECT_EQ(a_running.load(), 2) << "a runs on 2 of the 3 threads";
    release.Notify();
  }
}

}  // namespace
}  // namespace pipeserve
