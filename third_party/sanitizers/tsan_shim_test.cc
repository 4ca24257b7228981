// Correctly synchronized absl::Mutex / CondVar / Notification handoffs of
// plain (non-atomic) data. Under --config=tsan these must be race-free,
// which they are only with //third_party/sanitizers:tsan_absl_shim linked
// in (Debian's Abseil is not instrumented). In other builds it is an
// ordinary test of the same code.
#include <dlfcn.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace {

constexpr int kThreads = 4;
constexpr int kIters = 2000;

#if defined(__SANITIZE_THREAD__)
TEST(TsanShimTest, ShimIsLinkedIntoThisBinary) {
  // Mutex::Lock as this program resolves it must be the shim's, defined in
  // the executable itself, not libabsl_synchronization.so's.
  void* lock = dlsym(RTLD_DEFAULT, "_ZN4absl7debian35Mutex4LockEv");
  ASSERT_NE(lock, nullptr);
  Dl_info info;
  ASSERT_NE(dladdr(lock, &info), 0);
  EXPECT_EQ(std::string(info.dli_fname).find("libabsl_synchronization"), std::string::npos)
      << "absl::Mutex::Lock resolves to " << info.dli_fname
      << ": the TSan shim is not linked in (build with --config=tsan)";
}
#endif

TEST(TsanShimTest, CounterUnderMutexLock) {
  absl::Mutex mu;
  long counter = 0;  // guarded by mu
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kIters; ++i) {
        absl::MutexLock lock(&mu);
        ++counter;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(counter, kThreads * kIters);
}

TEST(TsanShimTest, TryLockAndReaderLock) {
  absl::Mutex mu;
  long counter = 0;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIters; ++i) {
        if (t % 2 == 0) {
          while (!mu.TryLock()) std::this_thread::yield();
          ++counter;
          mu.Unlock();
        } else {
          absl::ReaderMutexLock lock(&mu);
          volatile long seen = counter;  // a read under a shared lock
          (void)seen;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(counter, (kThreads / 2) * kIters);
}

TEST(TsanShimTest, CondVarHandoff) {
  absl::Mutex mu;
  absl::CondVar cv;
  std::vector<int> queue;  // guarded by mu
  bool done = false;       // guarded by mu
  std::string payload;     // written before the handoff, read after it
  std::thread producer([&] {
    payload = "written by the producer";
    for (int i = 0; i < kIters; ++i) {
      absl::MutexLock lock(&mu);
      queue.push_back(i);
      cv.Signal();
    }
    absl::MutexLock lock(&mu);
    done = true;
    cv.SignalAll();
  });
  long sum = 0;
  {
    absl::MutexLock lock(&mu);
    for (;;) {
      while (queue.empty() && !done) cv.Wait(&mu);
      for (int v : queue) sum += v;
      queue.clear();
      if (done) break;
    }
  }
  EXPECT_EQ(payload, "written by the producer");
  producer.join();
  EXPECT_EQ(sum, static_cast<long>(kIters) * (kIters - 1) / 2);
}

TEST(TsanShimTest, CondVarWaitWithTimeout) {
  absl::Mutex mu;
  absl::CondVar cv;
  int value = 0;  // guarded by mu
  std::thread writer([&] {
    absl::SleepFor(absl::Milliseconds(20));
    absl::MutexLock lock(&mu);
    value = 42;
    cv.Signal();
  });
  {
    absl::MutexLock lock(&mu);
    absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (value == 0) {
      cv.WaitWithTimeout(&mu, absl::Milliseconds(5));
      ASSERT_LT(absl::Now(), deadline);
    }
    EXPECT_EQ(value, 42);
  }
  writer.join();
}

// The condition reads plain data; Abseil evaluates it in the waiter (inside
// LockWhen/Await) and in whichever thread unlocks.
TEST(TsanShimTest, LockWhenAndAwaitConditions) {
  absl::Mutex mu;
  int stage = 0;  // guarded by mu
  std::vector<std::thread> threads;
  for (int t = 1; t <= kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto my_turn = [&] { return stage == t - 1; };
      mu.LockWhen(absl::Condition(&my_turn));
      ++stage;
      mu.Unlock();
    });
  }
  {
    absl::MutexLock lock(&mu);
    auto all_done = [&] { return stage == kThreads; };
    mu.Await(absl::Condition(&all_done));
    EXPECT_EQ(stage, kThreads);
  }
  for (auto& t : threads) t.join();

  // With a timeout, shared mode, and a deadline.
  bool ready = false;  // guarded by mu
  std::thread setter([&] {
    absl::SleepFor(absl::Milliseconds(10));
    absl::MutexLock lock(&mu);
    ready = true;
  });
  EXPECT_TRUE(mu.ReaderLockWhenWithTimeout(absl::Condition(&ready), absl::Seconds(30)));
  EXPECT_TRUE(ready);
  mu.ReaderUnlock();
  EXPECT_TRUE(mu.LockWhenWithDeadline(absl::Condition(&ready), absl::Now() + absl::Seconds(30)));
  mu.Unlock();
  {
    absl::MutexLock lock(&mu);
    EXPECT_TRUE(mu.AwaitWithTimeout(absl::Condition(&ready), absl::Seconds(30)));
  }
  setter.join();
}

TEST(TsanShimTest, NotificationHandoff) {
  for (int round = 0; round < 50; ++round) {
    absl::Notification ready;
    std::vector<double> data;  // written before Notify, read after the wait
    std::thread writer([&] {
      data.assign(100, 1.5);
      ready.Notify();
    });
    std::thread spinner([&] {
      while (!ready.HasBeenNotified()) std::this_thread::yield();
      EXPECT_EQ(data.size(), 100u);
    });
    std::thread timed([&] {
      ASSERT_TRUE(ready.WaitForNotificationWithTimeout(absl::Seconds(30)));
      EXPECT_EQ(data[99], 1.5);
    });
    ready.WaitForNotification();
    EXPECT_EQ(data[0], 1.5);
    writer.join();
    spinner.join();
    timed.join();
  }
}

// Mutexes on the stack at the same addresses round after round: each
// round's accesses are ordered only by that round's mutex.
TEST(TsanShimTest, ShortLivedMutexes) {
  for (int round = 0; round < 200; ++round) {
    absl::Mutex mu;
    int value = 0;
    std::thread other([&] {
      absl::MutexLock lock(&mu);
      ++value;
    });
    {
      absl::MutexLock lock(&mu);
      ++value;
    }
    other.join();
    EXPECT_EQ(value, 2);
  }
}

}  // namespace
