// ThreadSanitizer annotations for Debian's Abseil synchronization library.
//
// Debian's libabsl_synchronization.so (20220623, inline namespace
// absl::debian3) is not built with -fsanitize=thread, so TSan cannot see
// that absl::Mutex, absl::CondVar and absl::Notification order memory
// accesses: everything guarded by an absl::Mutex is reported as a race.
// This file defines the non-inline member functions that synchronize (the
// ones declared in absl/synchronization/{mutex,notification}.h without a
// body), forwards each to the real one found with dlsym(RTLD_NEXT), and
// tells TSan about the happens-before edges with __tsan_acquire and
// __tsan_release:
//
//   - a lock acquires, an unlock releases, on the Mutex's address. Reader
//     unlocks release on a second sync object (the Mutex's address + 1)
//     that only exclusive lockers acquire, so two readers are not ordered
//     with each other (TSan's own rwlock model);
//   - waits (CondVar::Wait*, Mutex::Await*) release before the real call
//     gives up the lock and acquire after it returns holding it again;
//   - an absl::Condition is evaluated by Abseil with the lock held, either
//     by the waiting thread inside LockWhen/Await or by whichever thread is
//     unlocking; each one is wrapped so its evaluation acquires before and
//     releases after, like the body of a critical section;
//   - Notification::Notify releases on the Notification and on its
//     notified_yet_ flag; WaitForNotification* acquire on return (when
//     notified); the inline HasBeenNotified() is an instrumented atomic
//     acquire load of notified_yet_, which pairs with that release;
//   - ~Mutex tells TSan the sync objects are gone (as Abseil does when it
//     is built with TSan), so a later Mutex at the same stack address does
//     not inherit stale happens-before edges;
//   - Abseil's own deadlock detector is switched off (see
//     DisableAbseilDeadlockGraph below).
//
// Linked into every cc_binary/cc_test only under --config=tsan (see
// .bazelrc: --custom_malloc). Definitions in the executable also interpose
// the calls that gRPC and Abseil itself make (GNU ld exports them because
// those shared libraries reference them), so gRPC's own absl::Mutex /
// gpr_mu locking becomes visible to TSan too; see README.md.
//
// In a build without -fsanitize=thread this file compiles to nothing.

#if defined(__SANITIZE_THREAD__)

#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

// The mangled names below spell the inline namespace; refuse to build
// against an Abseil with another one rather than fail at run time.
#define PIPESERVE_STR2(x) #x
#define PIPESERVE_STR(x) PIPESERVE_STR2(x)
static_assert(sizeof(PIPESERVE_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME)) == sizeof("debian3") &&
                  __builtin_memcmp(PIPESERVE_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME), "debian3",
                                   sizeof("debian3")) == 0,
              "tsan_absl_annotations.cc hard-codes absl::debian3 mangled names");

namespace {

// The real function `name`: the next definition after this one in the
// lookup order (libabsl_synchronization.so). Looked up once per function;
// two threads racing to look it up store the same value. Relaxed on
// purpose: an acquire load here would be a happens-before edge from the
// first caller to every later one, hiding real races from TSan.
void* Lookup(std::atomic<void*>* cache, const char* name) {
  void* p = cache->load(std::memory_order_relaxed);
  if (p != nullptr) return p;
  p = dlsym(RTLD_NEXT, name);
  if (p == nullptr) p = dlsym(RTLD_DEFAULT, name);  // only for Condition::Eval
  if (p == nullptr) {
    std::fprintf(stderr, "tsan_absl_annotations: dlsym(%s) failed: %s\n", name, dlerror());
    std::abort();
  }
  cache->store(p, std::memory_order_relaxed);
  return p;
}

#define REAL(type, mangled)                             \
  static std::atomic<void*> real_cache_{nullptr};       \
  auto real = reinterpret_cast<type>(Lookup(&real_cache_, mangled))

// Sync objects: writers' clock on the Mutex, readers' clock next to it.
void* WriterSync(const absl::Mutex* mu) { return const_cast<absl::Mutex*>(mu); }
void* ReaderSync(const absl::Mutex* mu) {
  return reinterpret_cast<char*>(const_cast<absl::Mutex*>(mu)) + 1;
}

void AcquireExclusive(const absl::Mutex* mu) {
  __tsan_acquire(WriterSync(mu));
  __tsan_acquire(ReaderSync(mu));
}
void AcquireShared(const absl::Mutex* mu) { __tsan_acquire(WriterSync(mu)); }
void ReleaseExclusive(const absl::Mutex* mu) { __tsan_release(WriterSync(mu)); }
void ReleaseShared(const absl::Mutex* mu) { __tsan_release(ReaderSync(mu)); }

bool RealEval(const absl::Condition* cond) {
  REAL(bool (*)(const absl::Condition*), "_ZNK4absl7debian39Condition4EvalEv");
  return real(cond);
}

// A Condition that evaluates `cond` as a critical section of `mu`.
struct WrappedCondition {
  const absl::Condition* cond;
  const absl::Mutex* mu;
};

bool EvalWrapped(WrappedCondition* w) {
  AcquireExclusive(w->mu);
  bool result = RealEval(w->cond);
  ReleaseExclusive(w->mu);
  return result;
}

// Abseil's debug-mode deadlock detector (on in Debian's build) keeps a
// global lock graph (GraphCycles) guarded by an internal SpinLock that TSan
// cannot see, while TSan's memmove interceptor does see the graph's memory
// being copied from every thread that locks a Mutex: a false race in every
// program that locks from two threads. Turned off for TSan builds only,
// before main() and before any thread exists (TSan has its own checks).
__attribute__((constructor)) void DisableAbseilDeadlockGraph() {
  void* set = dlsym(RTLD_DEFAULT,
                    "_ZN4absl7debian329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE");
  if (set == nullptr) return;  // a program without libabsl_synchronization
  reinterpret_cast<void (*)(absl::OnDeadlockCycle)>(set)(absl::OnDeadlockCycle::kIgnore);
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

// ---- Mutex: exclusive ------------------------------------------------------

void Mutex::Lock() {
  REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex4LockEv");
  real(this);
  AcquireExclusive(this);
}

void Mutex::Unlock() {
  REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex6UnlockEv");
  ReleaseExclusive(this);
  real(this);
}

bool Mutex::TryLock() {
  REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex7TryLockEv");
  bool locked = real(this);
  if (locked) AcquireExclusive(this);
  return locked;
}

void Mutex::LockWhen(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE");
  WrappedCondition w{&cond, this};
  real(this, Condition(&EvalWrapped, &w));
  AcquireExclusive(this);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  REAL(bool (*)(Mutex*, const Condition&, Duration),
       "_ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  WrappedCondition w{&cond, this};
  bool result = real(this, Condition(&EvalWrapped, &w), timeout);
  AcquireExclusive(this);  // held on return either way
  return result;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, Time),
       "_ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  WrappedCondition w{&cond, this};
  bool result = real(this, Condition(&EvalWrapped, &w), deadline);
  AcquireExclusive(this);
  return result;
}

// ---- Mutex: shared ---------------------------------------------------------

void Mutex::ReaderLock() {
  REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex10ReaderLockEv");
  real(this);
  AcquireShared(this);
}

void Mutex::ReaderUnlock() {
  REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex12ReaderUnlockEv");
  ReleaseShared(this);
  real(this);
}

bool Mutex::ReaderTryLock() {
  REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex13ReaderTryLockEv");
  bool locked = real(this);
  if (locked) AcquireShared(this);
  return locked;
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&),
       "_ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE");
  WrappedCondition w{&cond, this};
  real(this, Condition(&EvalWrapped, &w));
  AcquireShared(this);
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  REAL(bool (*)(Mutex*, const Condition&, Duration),
       "_ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  WrappedCondition w{&cond, this};
  bool result = real(this, Condition(&EvalWrapped, &w), timeout);
  AcquireShared(this);
  return result;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, Time),
       "_ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  WrappedCondition w{&cond, this};
  bool result = real(this, Condition(&EvalWrapped, &w), deadline);
  AcquireShared(this);
  return result;
}

// ---- Mutex: waiting with the lock held ---------------------------------------
// The caller may hold the lock exclusively or shared; the edges below are
// those of the exclusive case (a shared holder is over-synchronized, never
// under-synchronized).

void Mutex::Await(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE");
  WrappedCondition w{&cond, this};
  ReleaseExclusive(this);
  real(this, Condition(&EvalWrapped, &w));
  AcquireExclusive(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  REAL(bool (*)(Mutex*, const Condition&, Duration),
       "_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  WrappedCondition w{&cond, this};
  ReleaseExclusive(this);
  bool result = real(this, Condition(&EvalWrapped, &w), timeout);
  AcquireExclusive(this);
  return result;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, Time),
       "_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  WrappedCondition w{&cond, this};
  ReleaseExclusive(this);
  bool result = real(this, Condition(&EvalWrapped, &w), deadline);
  AcquireExclusive(this);
  return result;
}

// ---- Mutex: destruction ------------------------------------------------------
// Both the complete-object (D1) and base-object (D2) destructor symbols
// exist in the library; the compiler emits one or both here from one body.

Mutex::~Mutex() {
  REAL(void (*)(Mutex*), "_ZN4absl7debian35MutexD2Ev");
  real(this);
  __tsan_mutex_destroy(WriterSync(this), 0);
  __tsan_mutex_destroy(ReaderSync(this), 0);
}

// ---- CondVar -------------------------------------------------------------------

void CondVar::Wait(Mutex* mu) {
  REAL(void (*)(CondVar*, Mutex*), "_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE");
  ReleaseExclusive(mu);
  real(this, mu);
  AcquireExclusive(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  REAL(bool (*)(CondVar*, Mutex*, Duration),
       "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  ReleaseExclusive(mu);
  bool result = real(this, mu, timeout);
  AcquireExclusive(mu);
  return result;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  REAL(bool (*)(CondVar*, Mutex*, Time),
       "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  ReleaseExclusive(mu);
  bool result = real(this, mu, deadline);
  AcquireExclusive(mu);
  return result;
}

// ---- Notification --------------------------------------------------------------

void Notification::Notify() {
  REAL(void (*)(Notification*), "_ZN4absl7debian312Notification6NotifyEv");
  __tsan_release(this);
  __tsan_release(&notified_yet_);  // pairs with HasBeenNotified()'s acquire load
  real(this);
}

void Notification::WaitForNotification() const {
  REAL(void (*)(const Notification*), "_ZNK4absl7debian312Notification19WaitForNotificationEv");
  real(this);
  __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(Duration timeout) const {
  REAL(bool (*)(const Notification*, Duration),
       "_ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  bool notified = real(this, timeout);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(Time deadline) const {
  REAL(bool (*)(const Notification*, Time),
       "_ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  bool notified = real(this, deadline);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl

#endif  // __SANITIZE_THREAD__
