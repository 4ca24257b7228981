// A fixed set of threads running submitted work in order of arrival: the
// coordinator's bounded home for work that must not get a thread each
// (requests arriving on ModelStreamInfer streams).
//
//   WorkerPool pool(16);
//   pool.Submit([&] { Handle(request); });
#ifndef PIPESERVE_SERVER_COORDINATOR_WORKER_POOL_H_
#define PIPESERVE_SERVER_COORDINATOR_WORKER_POOL_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace pipeserve {

class WorkerPool {
 public:
  explicit WorkerPool(int threads);
  // Runs what was submitted, then joins the threads.
  ~WorkerPool();

  // Queues `work`; never blocks (callers bound how much they submit).
  // Thread-safe.
  void Submit(std::function<void()> work);

 private:
  void Run();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_WORKER_POOL_H_
