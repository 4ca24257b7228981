// Dynamic batching, as Triton's dynamic batcher does it: concurrent small
// requests to one deployment are merged along dim 0 into one larger
// request, run once, and the outputs split back by rows. A request is run
// at once, alone, while fewer than max_in_flight merged requests are
// running; beyond that requests queue, and each time one finishes the
// queue's front requests (with the same non-batch shapes, up to
// max_rows rows) go together. With max_queue_delay, the front request
// also waits that long for company before it goes. So a lightly loaded
// model answers as fast as without batching, and a loaded one sends fewer,
// larger requests down the pipeline (fewer frames per hop).
//
//   Batcher batcher(options, input_batched, [&](inputs, deadline, cancelled) {
//     return deployment.InferDirect(inputs, deadline, cancelled);
//   });
//   ASSIGN_OR_RETURN(std::vector<Tensor> out, batcher.Infer(inputs, deadline, cancelled));
#ifndef PIPESERVE_SERVER_COORDINATOR_BATCHER_H_
#define PIPESERVE_SERVER_COORDINATOR_BATCHER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "runtime/tensor.h"

namespace pipeserve {

struct BatcherOptions {
  // Most rows of a merged request; requests with this many rows or more
  // run alone. 0: no batching (every request runs by itself at once).
  int64_t max_rows = 64;
  // How long the front request waits for others before it goes.
  absl::Duration max_queue_delay = absl::ZeroDuration();
  // Merged requests running at once; more wait in the queue.
  int max_in_flight = 4;
};

class Batcher {
 public:
  // Runs one request; `merged` when it holds several (the pipeline is
  // then kept busy by the merged requests in flight, not by microbatches).
  using Run = std::function<absl::StatusOr<std::vector<Tensor>>(
      const std::vector<Tensor>& inputs, absl::Time deadline,
      const std::function<bool()>& cancelled, bool merged)>;

  // Whether a merged request that failed with this error may run each of
  // its members alone instead (see Infer).
  using MayRunAlone = std::function<bool(const absl::Status&)>;
  // The default: an error that may be one member's fault (a bad id, its
  // rows too many for memory), not the servers' (kUnavailable), the
  // clock's (kDeadlineExceeded) or a cancellation.
  static bool MayBeOneMembersFault(const absl::Status& s);

  // `mergeable`: every input and every output of the model follows the
  // batch (dim 0), so requests can be merged; otherwise (or with max_rows
  // 0) every request runs alone, at once. `run` runs one (merged) request.
  Batcher(BatcherOptions options, bool mergeable, Run run,
          MayRunAlone may_run_alone = &Batcher::MayBeOneMembersFault);
  // Waits for the merged requests still running.
  ~Batcher();

  // Runs `inputs` (checked already against the model's inputs), merged
  // with others when the model is busy; the outputs are this request's
  // rows. Returns at `deadline` (kDeadlineExceeded) or when `cancelled`
  // turns true (kCancelled) even if its merged request still runs. A
  // merged request that fails with kUnavailable, kDeadlineExceeded or
  // kCancelled (the pipeline's trouble, not a member's) fails every
  // member; one that fails otherwise (a member's bad value, memory for the
  // merged size) runs each member alone, so each gets its own answer or
  // error and no member sees another's values or positions.
  absl::StatusOr<std::vector<Tensor>> Infer(const std::vector<Tensor>& inputs,
                                            absl::Time deadline,
                                            const std::function<bool()>& cancelled);

  // Requests answered as part of a merged request of two or more.
  uint64_t merged_requests() const;
  // Merged requests run (of one request or more).
  uint64_t batches() const;
  // Requests waiting in the queue now.
  size_t queued() const;

 private:
  struct Waiter;
  using Group = std::vector<std::shared_ptr<Waiter>>;
  // Hands groups from the queue's front to idle workers (with a queue
  // delay, once the front has waited it out or rows enough are queued).
  void Dispatch() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // When a waiting member next looks at its deadline, its cancellation
  // (every 20 ms when it can be cancelled) and the queue delay.
  absl::Time WakeAt(const Waiter& w, bool cancellable) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A worker: runs groups until the batcher goes.
  void Work();
  // Runs `group` merged and answers each member.
  void RunGroup(const Group& group);
  // Runs `group`'s members as one request (or the one member alone).
  absl::StatusOr<std::vector<Tensor>> RunMerged(const Group& group);
  // Each member's rows of every output of the merged request `out`.
  static std::vector<absl::StatusOr<std::vector<Tensor>>> SplitAnswers(
      const Group& group, const std::vector<Tensor>& out);

  const BatcherOptions options_;
  const bool enabled_;
  const Run run_;
  const MayRunAlone may_run_alone_;

  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<Waiter>> queue_ ABSL_GUARDED_BY(mu_);
  int64_t queued_rows_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<Group> ready_ ABSL_GUARDED_BY(mu_);  // dispatched, not yet taken
  int idle_ ABSL_GUARDED_BY(mu_) = 0;             // workers waiting for a group
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
  uint64_t merged_requests_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t batches_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_BATCHER_H_
