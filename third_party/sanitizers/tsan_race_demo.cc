// Deliberate data races that TSan must still report with the Abseil shim
// linked in (the shim must add only the happens-before edges that Abseil
// really provides). Run by tsan_shim_race_test.sh, one race per process:
//
//   tsan_race_demo probe              prints "tsan" or "no-tsan"
//   tsan_race_demo unlocked           two threads, no lock
//   tsan_race_demo one_side_locked    one thread under absl::Mutex, one not
//   tsan_race_demo different_mutexes  each thread under its own absl::Mutex
//   tsan_race_demo readers_write      both threads write under ReaderLock
//   tsan_race_demo write_after_notify written after Notify, read after the wait
//   tsan_race_demo grpc_callback      a gRPC callback thread and the main
//                                     thread, with tsan.supp in effect
//
// Each racy mode exits 0 when TSan reports nothing (that is the failure the
// script looks for); with TSan and halt_on_error=1 it dies with exit code 66.
#include <cstdio>
#include <cstring>
#include <thread>

#include <chrono>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "grpcpp/alarm.h"
#include "grpcpp/grpcpp.h"

namespace {

constexpr int kIters = 1000;

// Not inlined, so the report names them.
__attribute__((noinline)) void RacyIncrement(long* counter) { ++*counter; }
__attribute__((noinline)) long RacyRead(const long* counter) { return *counter; }

int Unlocked() {
  long counter = 0;
  std::thread a([&] { for (int i = 0; i < kIters; ++i) RacyIncrement(&counter); });
  std::thread b([&] { for (int i = 0; i < kIters; ++i) RacyIncrement(&counter); });
  a.join();
  b.join();
  return counter > 0 ? 0 : 1;
}

int OneSideLocked() {
  absl::Mutex mu;
  long counter = 0;
  std::thread a([&] {
    for (int i = 0; i < kIters; ++i) {
      absl::MutexLock lock(&mu);
      RacyIncrement(&counter);
    }
  });
  std::thread b([&] { for (int i = 0; i < kIters; ++i) RacyIncrement(&counter); });
  a.join();
  b.join();
  return counter > 0 ? 0 : 1;
}

int DifferentMutexes() {
  absl::Mutex mu_a, mu_b;
  long counter = 0;
  std::thread a([&] {
    for (int i = 0; i < kIters; ++i) {
      absl::MutexLock lock(&mu_a);
      RacyIncrement(&counter);
    }
  });
  std::thread b([&] {
    for (int i = 0; i < kIters; ++i) {
      absl::MutexLock lock(&mu_b);
      RacyIncrement(&counter);
    }
  });
  a.join();
  b.join();
  return counter > 0 ? 0 : 1;
}

int ReadersWrite() {
  absl::Mutex mu;
  long counter = 0;
  auto body = [&] {
    for (int i = 0; i < kIters; ++i) {
      absl::ReaderMutexLock lock(&mu);
      RacyIncrement(&counter);  // a write under a shared lock
    }
  };
  std::thread a(body);
  std::thread b(body);
  a.join();
  b.join();
  return counter > 0 ? 0 : 1;
}

int WriteAfterNotify() {
  absl::Notification n;
  long value = 0;
  std::thread writer([&] {
    n.Notify();
    RacyIncrement(&value);  // after the release: not ordered before the read
  });
  n.WaitForNotification();
  long seen = RacyRead(&value);
  writer.join();
  return seen >= 0 ? 0 : 1;
}

// Code that gRPC runs on its own threads is instrumented and stays checked
// with the called_from_lib suppressions in tsan.supp: the callback's write
// and the main thread's write after Set() are not ordered.
int GrpcCallback() {
  long value = 0;
  absl::Notification done;
  grpc::Alarm alarm;
  alarm.Set(std::chrono::system_clock::now() + std::chrono::milliseconds(50), [&](bool) {
    RacyIncrement(&value);
    done.Notify();
  });
  RacyIncrement(&value);
  done.WaitForNotification();
  return value > 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  if (std::strcmp(mode, "probe") == 0) {
#if defined(__SANITIZE_THREAD__)
    std::puts("tsan");
#else
    std::puts("no-tsan");
#endif
    return 0;
  }
  if (std::strcmp(mode, "unlocked") == 0) return Unlocked();
  if (std::strcmp(mode, "one_side_locked") == 0) return OneSideLocked();
  if (std::strcmp(mode, "different_mutexes") == 0) return DifferentMutexes();
  if (std::strcmp(mode, "readers_write") == 0) return ReadersWrite();
  if (std::strcmp(mode, "write_after_notify") == 0) return WriteAfterNotify();
  if (std::strcmp(mode, "grpc_callback") == 0) return GrpcCallback();
  std::fprintf(stderr, "usage: %s probe|unlocked|one_side_locked|different_mutexes|"
                       "readers_write|write_after_notify|grpc_callback\n", argv[0]);
  return 2;
}
