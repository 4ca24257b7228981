#include "server/coordinator/worker_pool.h"

#include <algorithm>

namespace pipeserve {

WorkerPool::WorkerPool(int threads) {
  threads = std::max(1, threads);
  per_key_ = std::max(1, threads - 1);
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
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

std::deque<std::string>::iterator WorkerPool::NextTurn() {
  return std::find_if(turns_.begin(), turns_.end(),
                      [this](const std::string& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
                        auto it = running_.find(key);
                        return it == running_.end() || it->second < per_key_;
                      });
}

void WorkerPool::Run() {
  while (true) {
    std::function<void()> work;
    std::string key;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return (stopping_ && turns_.empty()) || NextTurn() != turns_.end();
      };
      mu_.Await(absl::Condition(&ready));
      if (turns_.empty()) return;  // stopping, and everything ran
      // The first key in turn that may run one more takes this thread for
      // its oldest work; it goes to the back of the turns if it has more.
      auto turn = NextTurn();
      key = std::move(*turn);
      turns_.erase(turn);
      auto it = queues_.find(key);
      work = std::move(it->second.front());
      it->second.pop_front();
      if (it->second.empty()) {
        queues_.erase(it);
      } else {
        turns_.push_back(key);
      }
      --queued_;
      ++running_[key];
    }
    work();
    absl::MutexLock lock(&mu_);
    if (--running_[key] == 0) running_.erase(key);
  }
}

}  // namespace pipeserve
