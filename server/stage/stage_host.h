// StageHost: one loaded pipeline stage on a stage server, with its worker
// threads, a bounded queue of incoming frames and a sink for what it makes.
// Knows nothing of gRPC: streams (or in-process callers) feed it frames as
// Producers and give it a sink.
//
//   auto host = std::make_shared<StageHost>(spec, std::move(program), options);
//   host->SetSink(downstream);                    // next stage or results
//   if (host->Push(std::move(frame), producer)) { /* read the next frame */ }
//
// Every frame is checked on arrival: a DATA frame must carry exactly the
// values in spec.receives (names, shapes, one batch size); one that does not
// becomes an ERROR frame (kInvalidArgument, naming the value) that travels
// on to the coordinator, so the request fails at once. Each good DATA
// frame's tensors are the values this stage receives; the stage runs its
// program on them and sends on a frame holding spec.forward. Frames whose
// deadline has passed or whose request was cancelled are dropped; a compute
// failure becomes an ERROR frame. A frame that cannot be sent on (no sink,
// or the link failed twice in a row) is dropped and counted, and the link's
// error is reported in stats() until a send succeeds again: the stage never
// waits for a sink and never stops sending because one send failed.
//
// With spec.merge_rows > 0 (and every received value following the batch),
// a worker taking a DATA frame also takes the frames of the same request
// that wait right behind it, while their rows fit merge_rows, their other
// dimensions agree and they hold at most 1 MiB (larger frames gain
// nothing); it runs the program once on their rows joined and sends each
// frame's rows on in its own frame, all in one message. A joined run that
// fails is done again one frame at a time; so is one whose outputs do not
// follow the batch (dim 0), and the stage then stops joining. For a
// program that prefers few shapes (StageProgram::prefers_few_shapes) only
// frames of equal rows join, a power of two of them.
#ifndef PIPESERVE_SERVER_STAGE_STAGE_HOST_H_
#define PIPESERVE_SERVER_STAGE_STAGE_HOST_H_

#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "proto/pipeserve_service.pb.h"
#include "runtime/backend.h"
#include "server/transport/frame_sink.h"

namespace pipeserve {

// Microseconds since the Unix epoch, the clock of FrameHeader::deadline_us.
int64_t NowMicros();

class StageHost {
 public:
  struct Options {
    // Frames that may wait; beyond that Push asks producers to pause.
    size_t queue_capacity = 8;
    // Threads taking frames from the queue, each running the program (which
    // must allow that many concurrent Runs: see
    // StageProgram::max_concurrent_runs). On a GPU, two workers overlap one
    // microbatch's copies with the next one's kernels; frames may then leave
    // out of order (the coordinator reassembles by microbatch index).
    int workers = 1;
  };

  struct Stats {
    // DATA frames that arrived and fit the stage, and their tensor bytes.
    uint64_t frames_in = 0;
    uint64_t bytes_in = 0;
    // DATA frames sent on (to the next stage or the results subscriber).
    uint64_t frames_out = 0;
    uint64_t bytes_out = 0;
    // Seconds spent computing, waiting in the queue (frames taken by a
    // worker), and sending on (blocked by a slow or full downstream).
    double compute_seconds = 0;
    double queue_seconds = 0;
    double send_seconds = 0;
    uint64_t processed = 0;
    uint64_t runs = 0;  // program runs for the processed frames
    uint64_t dropped_deadline = 0;
    uint64_t dropped_cancelled = 0;
    uint64_t rejected = 0;       // frames that did not match the stage
    uint64_t undeliverable = 0;  // frames that could not be sent on
    uint64_t queue_depth = 0;
    bool has_sink = false;
    std::string downstream_error;  // "" while sends succeed
    KvCacheUsage kv_cache;         // the program's (generation models)
  };

  // One source of frames (an incoming stream). The host keeps it weakly and
  // calls it from worker threads or from Stop, never with its lock held.
  class Producer {
   public:
    virtual ~Producer() = default;
    // The queue has room again after Push returned false: read on.
    virtual void Resume() = 0;
    // The host stopped (unloaded or replaced): end the stream. At most once.
    virtual void Stopped() = 0;
  };

  StageHost(StageSpec spec, std::unique_ptr<StageProgram> program, Options options);
  // Stop()s first.
  ~StageHost();

  const StageSpec& spec() const { return spec_; }
  bool last_stage() const { return spec_.next_address().empty(); }

  // Sets where made frames go; returns the sink it replaces (the caller
  // closes it, outside any lock of its own).
  std::shared_ptr<FrameSink> SetSink(std::shared_ptr<FrameSink> sink);
  // Removes the sink if it is still `sink` (a results subscriber leaving).
  void ClearSink(const FrameSink* sink);

  // Registers a producer; false once the host has stopped.
  bool AddProducer(const std::shared_ptr<Producer>& producer);

  // Queues a frame from `from` (null for a caller that never pauses).
  // Returns true when the producer may go on, false when the queue is now
  // full: the producer then gets Resume() once there is room. Never blocks.
  // After Stop, frames are dropped.
  bool Push(Frame frame, const std::shared_ptr<Producer>& from);

  // Stops the workers (waiting for them), closes the sink, drops queued
  // frames and tells every producer. Idempotent; thread-safe.
  void Stop();

  Stats stats() const;

  // For a graceful shutdown: waits until every frame queued or being
  // computed at the call has been sent on (or dropped), or `deadline`.
  // True if they were, or the host stopped.
  bool FinishHeld(absl::Time deadline);

 private:
  void Work();
  // What a worker took off the queue: one frame, or DATA frames of one
  // request joined (StageSpec.merge_rows); whether they are dropped
  // (cancelled, past their deadline); producers to resume; the group's
  // first sequence number (in_hand_).
  struct Taken {
    std::vector<Frame> group;
    std::vector<absl::Time> arrived;
    std::vector<std::weak_ptr<Producer>> resume;
    bool drop = false;
    uint64_t first = 0;
  };
  // Waits for frames and takes them; false once the host stops.
  bool Take(Taken* t);
  // Runs a group of DATA frames (one run, or joined) and sends them on.
  void ComputeAndDeliver(std::vector<Frame> group, const std::vector<absl::Time>& arrived);
  void RememberCancel(uint64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Checks an arriving frame; a DATA frame that does not match the stage
  // becomes an ERROR frame.
  Frame Admit(Frame frame);
  // Runs one DATA frame through the program; returns the frame to send on.
  Frame Compute(const Frame& in);
  // Runs DATA frames of one request through the program as one run on
  // their rows joined; returns a frame to send on per frame, in order.
  // `runs` counts the program runs it took.
  std::vector<Frame> ComputeJoined(const std::vector<Frame>& in, uint64_t* runs);
  // The frame to send on for `in`: the program's `outs` for it, and the
  // values passed through from `in` itself.
  Frame Forward(const Frame& in, const std::vector<Tensor>& outs);
  // Whether `next` (queued right behind `first`) may join its run, with
  // `rows` rows taken so far.
  bool CanJoin(const Frame& first, const Frame& next, int64_t rows) const;
  // How many of the frames queued right behind `first` (just taken) join
  // its run: within merge_rows, 64 frames and 1 MiB of input. For a
  // program that prefers few shapes, only microbatches of `first`'s rows,
  // a power of two of them in all (run sizes: rows x 1, 2, 4, ... 64).
  size_t JoinableBehind(const Frame& first) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // For a traced frame: `out` (made from `in`) carries `in`'s spans and
  // this stage's transfer (from `in`'s sent_us to `arrived`), queue and
  // compute (`start` to `end`) spans.
  void AddSpans(const FrameHeader& in, absl::Time arrived, absl::Time start, absl::Time end,
                FrameHeader* out) const;
  // Sends `outs` (one frame, or a joined run's frames, which go together)
  // downstream, retrying once on a broken link.
  void Deliver(std::vector<Frame> outs);
  // Rows of a DATA frame that fits the stage (dim 0 of its first value).
  static int64_t Rows(const Frame& f);

  const StageSpec spec_;
  const std::unique_ptr<StageProgram> program_;
  const Options options_;
  const int64_t merge_rows_;  // most rows a joined run takes; 0: none joins
  const bool few_shapes_;     // the program's prefers_few_shapes()

  mutable absl::Mutex mu_;
  std::deque<Frame> queue_ ABSL_GUARDED_BY(mu_);
  std::deque<absl::Time> queued_at_ ABSL_GUARDED_BY(mu_);  // per frame in queue_
  std::vector<std::weak_ptr<Producer>> producers_ ABSL_GUARDED_BY(mu_);
  std::vector<std::weak_ptr<Producer>> paused_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<FrameSink> sink_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Whether queued microbatches are joined: merge_rows_ > 0, until a joined
  // run's outputs did not keep the rows.
  bool joining_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
  // Frames workers took off the queue, numbered in the order taken (the
  // next number), and the first number of each group taken and not yet
  // sent on or dropped: FinishHeld waits on these.
  uint64_t taken_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<uint64_t> in_hand_ ABSL_GUARDED_BY(mu_);  // one per busy worker
  // Recently cancelled request ids (bounded: oldest forgotten first).
  absl::flat_hash_set<uint64_t> cancelled_ ABSL_GUARDED_BY(mu_);
  std::deque<uint64_t> cancelled_order_ ABSL_GUARDED_BY(mu_);

  absl::Mutex stop_mu_;  // serialises Stop
  std::vector<std::thread> workers_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_STAGE_STAGE_HOST_H_
