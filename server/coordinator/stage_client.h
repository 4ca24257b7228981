// How the coordinator reaches its stage servers: load and unload stages,
// ask how they are, send frames into a pipeline and take its results. The
// coordinator's core uses only this interface; GrpcStageClient
// (grpc_stage_client.h) talks to real stage servers, InProcessStages
// (in_process_stages.h) runs stage servers inside this process, for tests
// and for benchmarks that leave the network out.
//
//   RETURN_IF_ERROR(client->LoadStage(address, spec, read_weights, deadline));
//   auto results = client->SubscribeResults(last, key, on_frame, on_done, deadline);
//   std::shared_ptr<FrameSink> in = client->OpenInput(first, key);
#ifndef PIPESERVE_SERVER_COORDINATOR_STAGE_CLIENT_H_
#define PIPESERVE_SERVER_COORDINATOR_STAGE_CLIENT_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/pipeserve_service.pb.h"
#include "server/transport/frame_sink.h"

namespace pipeserve {

// Copies `n` bytes of weight `fqn`, starting at byte `offset`, to `out`.
using WeightReader =
    std::function<absl::Status(const std::string& fqn, uint64_t offset, size_t n, char* out)>;

class StageClient {
 public:
  // Ends a results subscription when destroyed.
  class Subscription {
   public:
    virtual ~Subscription() = default;
  };

  virtual ~StageClient() = default;

  // Loads `spec` on the server at `address`, streaming each weight of the
  // stage through `weights` in chunks. Errors: the server's (e.g.
  // kInvalidArgument for a spec it refuses, kDataLoss for a weight that
  // fails its checksum, kResourceExhausted), kUnavailable when the server
  // cannot be reached, kDeadlineExceeded. Thread-safe, like every method.
  virtual absl::Status LoadStage(const std::string& address, const StageSpec& spec,
                                 const WeightReader& weights, absl::Time deadline) = 0;

  // kNotFound when the server does not hold the stage.
  virtual absl::Status UnloadStage(const std::string& address, const StageKey& key,
                                   absl::Time deadline) = 0;

  // Every stage the server at `address` holds.
  virtual absl::StatusOr<std::vector<StageKey>> ListStages(const std::string& address,
                                                           absl::Time deadline) = 0;

  // kNotFound when the server does not hold the stage (it lost it, e.g.
  // after a restart), kUnavailable when the server cannot be reached.
  virtual absl::StatusOr<StageStatsResponse> GetStageStats(const std::string& address,
                                                           const StageKey& key,
                                                           absl::Time deadline) = 0;

  // A sink for the frames of requests into stage `key` at `address`.
  // Connects lazily: Sends fail with kUnavailable while the stage cannot be
  // reached, and block (up to each frame's deadline) while it is full.
  virtual std::shared_ptr<FrameSink> OpenInput(const std::string& address,
                                               const StageKey& key) = 0;

  // Takes the outputs of last stage `key` at `address`: `on_frame` for each
  // frame (on a transport thread; it must not block), `on_done` once when
  // the subscription ends by itself. Returns once the server has it in
  // place.
  virtual absl::StatusOr<std::unique_ptr<Subscription>> SubscribeResults(
      const std::string& address, const StageKey& key, std::function<void(Frame)> on_frame,
      std::function<void(const absl::Status&)> on_done, absl::Time deadline) = 0;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_STAGE_CLIENT_H_
