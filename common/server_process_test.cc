#include "common/server_process.h"

#include <cstdlib>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

// Takes two locks in one order, then in the other: a potential deadlock
// that Abseil's lock graph reports (aborting, in Debian's build).
void LockInBothOrders() {
  absl::Mutex a, b;
  {
    absl::MutexLock la(&a);
    absl::MutexLock lb(&b);
  }
  {
    absl::MutexLock lb(&b);
    absl::MutexLock la(&a);
  }
}

TEST(ServerProcess, TurnsOffTheLockGraph) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // In a test the lock graph is on, and the inversion is caught (Debian's
  // Abseil, the one tools/bootstrap.sh installs, is built with it on).
  EXPECT_DEATH(LockInBothOrders(), "deadlock");
  // A server process does not pay for it. (PIPESERVE_HUGE_PAGES=0: no
  // second start of this test binary.)
  ::setenv("PIPESERVE_HUGE_PAGES", "0", 1);
  char name[] = "server_process_test";
  char* argv[] = {name, nullptr};
  StartServerProcess(argv);
  ::unsetenv("PIPESERVE_HUGE_PAGES");
  LockInBothOrders();
}

}  // namespace
}  // namespace pipeserve
