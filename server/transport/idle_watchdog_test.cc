#include "server/transport/idle_watchdog.h"

#include <atomic>

#include "gtest/gtest.h"

namespace pipeserve {
namespace {

// Waits up to `limit` for `done`.
bool WaitFor(const std::function<bool()>& done, absl::Duration limit) {
  const absl::Time until = absl::Now() + limit;
  while (!done()) {
    if (absl::Now() > until) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

TEST(IdleWatchdogTest, AQuietCallIsCancelledOnceAfterTheTimeout) {
  IdleWatchdog watchdog(absl::Milliseconds(200));
  std::atomic<int> cancels{0};
  const absl::Time start = absl::Now();
  IdleWatchdog::Watch watch(&watchdog, [&] { ++cancels; });
  ASSERT_TRUE(WaitFor([&] { return cancels > 0; }, absl::Seconds(10)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(200));
  EXPECT_TRUE(watch.cancelled());
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_EQ(cancels, 1) << "cancelled once";
}

TEST(IdleWatchdogTest, TouchesKeepACallAlive) {
  // Touches every 50 ms against a 1 s timeout: a loaded machine's late
  // wake-ups stay well inside it.
  IdleWatchdog watchdog(absl::Seconds(1));
  std::atomic<int> cancels{0};
  IdleWatchdog::Watch watch(&watchdog, [&] { ++cancels; });
  for (int i = 0; i < 40; ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    watch.Touch();
  }
  EXPECT_EQ(cancels, 0);
  EXPECT_FALSE(watch.cancelled());
}

TEST(IdleWatchdogTest, ABusyCallIsNeverIdleAndIsCancelledOnceItIsNot) {
  IdleWatchdog watchdog(absl::Milliseconds(200));
  std::atomic<bool> busy{true};
  std::atomic<int> cancels{0};
  IdleWatchdog::Watch watch(&watchdog, [&] { ++cancels; }, [&] { return busy.load(); });
  absl::SleepFor(absl::Milliseconds(600));
  EXPECT_EQ(cancels, 0) << "busy past the timeout";
  busy = false;
  EXPECT_TRUE(WaitFor([&] { return cancels > 0; }, absl::Seconds(10)));
}

TEST(IdleWatchdogTest, AnUnwatchedCallIsLeftAlone) {
  IdleWatchdog watchdog(absl::Milliseconds(100));
  std::atomic<int> cancels{0};
  { IdleWatchdog::Watch watch(&watchdog, [&] { ++cancels; }); }
  absl::SleepFor(absl::Milliseconds(400));
  EXPECT_EQ(cancels, 0);
}

}  // namespace
}  // namespace pipeserve
