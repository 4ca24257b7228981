// The stage server without gRPC: the stages it holds (keyed by model,
// deployment and stage index), loading them from a spec and weight chunks
// with every field checked, unloading, statistics, and where frames enter
// and leave. server/stage/stage_service.h is the gRPC layer over it; tests
// and in-process clusters drive it directly.
//
//   StageServerCore core(options, &dialer);
//   ASSIGN_OR_RETURN(auto load, core.BeginLoad(spec));
//   for (const WeightChunk& c : chunks) RETURN_IF_ERROR(load->AddChunk(c));
//   RETURN_IF_ERROR(load->Finish());
//   std::shared_ptr<FrameSink> in = core.OpenInput(spec.key());
#ifndef PIPESERVE_SERVER_STAGE_STAGE_SERVER_CORE_H_
#define PIPESERVE_SERVER_STAGE_STAGE_SERVER_CORE_H_

#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "proto/pipeserve_service.pb.h"
#include "runtime/backend.h"
#include "runtime/model_file.h"
#include "server/stage/stage_host.h"
#include "server/transport/frame_sink.h"

namespace pipeserve {

struct StageServerOptions {
  // GEMM threads for a stage whose spec does not say.
  int default_threads = 1;
  // Frames waiting per stage before producers are paused.
  int queue_capacity = 8;
  // The backend every stage is compiled on (chosen at start from --device);
  // null: a CPU backend per stage with the spec's (or default) threads.
  std::shared_ptr<ComputeBackend> backend;
  // Stages held at once; loads beyond it are kResourceExhausted.
  int max_stages = 64;
  // Weight bytes of one stage; 0: no limit but memory.
  uint64_t max_stage_bytes = 0;
};

// How a stage reaches the next stage's server: gRPC streams in a real
// server, direct calls in an in-process cluster.
class Dialer {
 public:
  virtual ~Dialer() = default;
  // A sink writing frames into stage `key` at `address`, connecting
  // lazily (so it never fails here). Thread-safe.
  virtual std::shared_ptr<FrameSink> Dial(const std::string& address, const StageKey& key) = 0;
};

class StageServerCore {
 public:
  // One LoadStage in progress: weights arrive in chunks, then Finish.
  class Load {
   public:
    virtual ~Load() = default;
    // kInvalidArgument for a chunk of a weight the stage does not hold or
    // one that runs past the weight's end.
    virtual absl::Status AddChunk(const WeightChunk& chunk) = 0;
    // Checks that every weight arrived whole with its checksum (kDataLoss
    // naming it), compiles the stage, and puts it in place, replacing an
    // earlier load of the same key.
    virtual absl::Status Finish() = 0;
  };

  // `dialer` must outlive the core.
  StageServerCore(StageServerOptions options, Dialer* dialer);
  // Stops every stage.
  ~StageServerCore();

  // Checks the spec (kInvalidArgument naming the field: key, stage graph,
  // shapes and sizes of weights and received values, next address, thread
  // count) and takes a place among the stages (kResourceExhausted beyond
  // max_stages, counting loads in progress, or max_stage_bytes). Weights
  // are allocated as their chunks arrive: in order, one weight at a time
  // (kResourceExhausted when memory runs out). Thread-safe.
  absl::StatusOr<std::unique_ptr<Load>> BeginLoad(const StageSpec& spec);

  // Stops and drops a stage: its incoming streams end, its sink closes.
  // kNotFound when it is not loaded.
  absl::Status Unload(const StageKey& key);

  // kNotFound when the stage is not loaded.
  absl::StatusOr<StageStatsResponse> Stats(const StageKey& key);

  // The loaded stage, or null.
  std::shared_ptr<StageHost> Find(const StageKey& key);

  // Makes `sink` the destination of last stage `key`'s outputs; the sink
  // it replaces is closed. kNotFound (not loaded), kFailedPrecondition (not
  // the last stage).
  absl::Status SubscribeResults(const StageKey& key, std::shared_ptr<FrameSink> sink);
  // Drops `sink` if it is still the subscriber.
  void UnsubscribeResults(const StageKey& key, const FrameSink* sink);

  // A sink pushing frames straight into stage `key` (looked up on every
  // Send, so it follows reloads), pausing while the stage's queue is full:
  // the in-process counterpart of a Process stream.
  std::shared_ptr<FrameSink> OpenInput(const StageKey& key);

  // Stops and drops every stage (a server going away).
  void UnloadAll();

  // For a graceful shutdown: waits until every frame queued or being
  // computed at the call has been sent on (or dropped), or `deadline`.
  // True if they were.
  bool FinishQueued(absl::Time deadline);

  // The keys of every stage held.
  std::vector<StageKey> Keys();

  size_t size();

 private:
  class LoadImpl;
  using Key = std::tuple<std::string, uint64_t, int, int>;
  static Key KeyOf(const StageKey& key) {
    return {key.model(), key.deployment(), key.stage(), key.replica()};
  }
  // Puts a loaded stage in place; returns the one it replaces.
  std::shared_ptr<StageHost> Install(std::shared_ptr<StageHost> host);
  // A load finished or was abandoned.
  void EndLoad();

  const StageServerOptions options_;
  Dialer* const dialer_;
  absl::Mutex mu_;
  std::map<Key, std::shared_ptr<StageHost>> hosts_ ABSL_GUARDED_BY(mu_);
  size_t loading_ ABSL_GUARDED_BY(mu_) = 0;  // loads begun, not yet ended
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_STAGE_STAGE_SERVER_CORE_H_
