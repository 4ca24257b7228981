#include "server/coordinator/worker_pool.h"

#include <algorithm>

namespace pipeserve {

WorkerPool::WorkerPool(int threads) {
  for (int i = 0; i < std::max(1, threads); ++i) threads_.emplace_back([this] { Run(); });
}

WorkerPool::~WorkerPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void WorkerPool::Submit(const std::string& key, std::function<void()> work) {
  absl::MutexLock lock(&mu_);
  std::deque<std::function<void()>>& q = queues_[key];
  if (q.empty()) turns_.push_back(key);
  q.push_back(std::move(work));
  ++queued_;
}

size_t WorkerPool::queued() const {
  absl::MutexLock lock(&mu_);
  return queued_;
}

void WorkerPool::Run() {
  while (true) {
    std::function<void()> work;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !turns_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (turns_.empty()) return;  // stopping, and everything ran
      // The key whose turn it is runs its oldest work; it goes to the back
      // of the turns if it has more.
      const std::string key = std::move(turns_.front());
      turns_.pop_front();
      auto it = queues_.find(key);
      work = std::move(it->second.front());
      it->second.pop_front();
      if (it->second.empty()) {
        queues_.erase(it);
      } else {
        turns_.push_back(key);
      }
      --queued_;
    }
    work();
  }
}

}  // namespace pipeserve
