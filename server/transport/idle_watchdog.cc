#include "server/transport/idle_watchdog.h"

#include <algorithm>
#include <utility>

namespace pipeserve {

IdleWatchdog::IdleWatchdog(absl::Duration timeout) : timeout_(timeout) {
  thread_ = std::thread([this] { Run(); });
}

IdleWatchdog::~IdleWatchdog() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void IdleWatchdog::Run() {
  absl::MutexLock lock(&mu_);
  auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
  const absl::Duration tick = std::min(absl::Milliseconds(250), timeout_ / 4);
  while (!mu_.AwaitWithTimeout(absl::Condition(&stop), tick)) {
    const absl::Time now = absl::Now();
    for (Entry& e : entries_) {
      if (e.cancelled || now - e.last_active <= timeout_ || (e.busy && e.busy())) continue;
      e.cancelled = true;
      e.cancel();
    }
  }
}

IdleWatchdog::Watch::Watch(IdleWatchdog* watchdog, std::function<void()> cancel,
                           std::function<bool()> busy)
    : watchdog_(watchdog) {
  absl::MutexLock lock(&watchdog_->mu_);
  entry_ = watchdog_->entries_.insert(watchdog_->entries_.end(),
                                      Entry{std::move(cancel), std::move(busy), absl::Now()});
}

IdleWatchdog::Watch::~Watch() {
  absl::MutexLock lock(&watchdog_->mu_);
  watchdog_->entries_.erase(entry_);
}

void IdleWatchdog::Watch::Touch() {
  absl::MutexLock lock(&watchdog_->mu_);
  entry_->last_active = absl::Now();
}

bool IdleWatchdog::Watch::cancelled() const {
  absl::MutexLock lock(&watchdog_->mu_);
  return entry_->cancelled;
}

}  // namespace pipeserve
