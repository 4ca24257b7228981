// StageHost: one loaded pipeline stage on a stage server, with its own
// worker thread, a bounded queue of incoming frames and a sink for what it
// makes. Knows nothing of gRPC: the service feeds it frames and gives it a
// sink.
//
//   auto host = std::make_unique<StageHost>(spec, std::move(program), 8);
//   host->SetSink(downstream);                  // next stage or results
//   host->Push(std::move(frame), [&] { StartRead(); });
//
// Each DATA frame's tensors are the values this stage receives (by name);
// the stage runs its program on them and sends on a frame holding
// spec.forward (its outputs and values later stages still need). Frames
// whose deadline has passed or whose request was cancelled are dropped;
// a compute failure becomes an ERROR frame that carries the status on to
// the coordinator.
#ifndef PIPESERVE_SERVER_STAGE_HOST_H_
#define PIPESERVE_SERVER_STAGE_HOST_H_

#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "proto/pipeserve_service.pb.h"
#include "runtime/backend.h"
#include "server/frame_sink.h"

namespace pipeserve {

// Microseconds since the Unix epoch, the clock of FrameHeader::deadline_us.
int64_t NowMicros();

class StageHost {
 public:
  struct Stats {
    uint64_t processed = 0;
    uint64_t dropped_deadline = 0;
    uint64_t dropped_cancelled = 0;
    uint64_t queue_depth = 0;
  };

  // `queue_capacity` frames may wait; beyond that Push asks the caller to
  // stop reading. `workers` threads take frames from the queue, each
  // running the program (which must allow that many concurrent Runs: see
  // StageProgram::max_concurrent_runs). On a GPU, two workers overlap one
  // microbatch's copies with the next one's kernels. Frames may then leave
  // out of order; the coordinator reassembles by microbatch index.
  StageHost(StageSpec spec, std::unique_ptr<StageProgram> program,
            size_t queue_capacity, int workers = 1);
  // Stops the workers; frames still queued are dropped.
  ~StageHost();

  const StageSpec& spec() const { return spec_; }

  // Sets (or replaces) where made frames go. The worker waits for a sink
  // if a frame is ready before one is set.
  void SetSink(std::shared_ptr<FrameSink> sink);

  // Queues a frame. `resume` is called once the queue has room for more:
  // at once when it has, else later from the worker thread. Never blocks.
  void Push(Frame frame, std::function<void()> resume);

  Stats stats() const;

 private:
  void Work();
  void RememberCancel(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs one DATA frame through the program; returns the frame to send on.
  Frame Compute(const Frame& in);

  const StageSpec spec_;
  const std::unique_ptr<StageProgram> program_;
  const size_t capacity_;

  mutable absl::Mutex mu_;
  std::deque<Frame> queue_ ABSL_GUARDED_BY(mu_);
  std::function<void()> resume_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<FrameSink> sink_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  Stats stats_ ABSL_GUARDED_BY(mu_);
  // Recently cancelled request ids (bounded: oldest forgotten first).
  absl::flat_hash_set<uint64_t> cancelled_ ABSL_GUARDED_BY(mu_);
  std::deque<uint64_t> cancelled_order_ ABSL_GUARDED_BY(mu_);

  std::vector<std::thread> workers_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_STAGE_HOST_H_
