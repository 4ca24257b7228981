// A fixed set of threads running submitted work: the coordinator's bounded
// home for work that must not get a thread each (requests arriving on
// ModelStreamInfer streams). Work is queued per key (a model's name) and
// the keys take turns, so a model whose requests are slow, or many, does
// not hold up another's behind it: each key's work runs in order of
// arrival, a free thread takes the next key in turn, and one key runs on
// at most all threads but one, so another key's work always finds a
// thread soon even while the first key's tasks wait (a model being
// repaired holds its requests for their whole deadline).
//
//   WorkerPool pool(16);
//   pool.Submit("gpt2", [&] { Handle(request); });
#ifndef PIPESERVE_SERVER_COORDINATOR_WORKER_POOL_H_
#define PIPESERVE_SERVER_COORDINATOR_WORKER_POOL_H_

#include <deque>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace pipeserve {

class WorkerPool {
 public:
  // `threads` >= 2 keep one for other keys; 1 runs everything on it.
  explicit WorkerPool(int threads);
  // Runs what was submitted, then joins the threads.
  ~WorkerPool();

  // Queues `work` under `key`; never blocks (callers bound how much they
  // submit). Thread-safe.
  void Submit(const std::string& key, std::function<void()> work);

  // Work queued and not yet started.
  size_t queued() const;

 private:
  void Run();
  // The first key in turn that may run another task, or turns_.end().
  std::deque<std::string>::iterator NextTurn() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::map<std::string, std::deque<std::function<void()>>> queues_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> turns_ ABSL_GUARDED_BY(mu_);  // keys with work queued, in turn
  std::map<std::string, int> running_ ABSL_GUARDED_BY(mu_);  // tasks running per key
  int per_key_ = 1;  // most tasks of one key running at once
  size_t queued_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_WORKER_POOL_H_
