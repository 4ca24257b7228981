// The coordinator's core: takes uploaded models, partitions them, loads
// their stages onto stage servers (found by a Launcher), and runs
// inference requests through the chained stages with microbatching. It
// serves no RPCs itself: server/kserve_service.h and server/model_service.h
// are thin gRPC layers over it. (It is a gRPC *client* of the stage
// servers, through server/frame_stream.h.)
//
//   Coordinator coord(options, std::move(store), std::move(launcher));
//   coord.LoadStoredModels();
//   ASSIGN_OR_RETURN(std::vector<Tensor> out,
//                    coord.Infer("example", {x, y}, absl::Now() + absl::Seconds(5)));
#ifndef PIPESERVE_SERVER_COORDINATOR_CORE_H_
#define PIPESERVE_SERVER_COORDINATOR_CORE_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/pipeserve_service.pb.h"
#include "runtime/tensor.h"
#include "server/frame_stream.h"
#include "server/launcher.h"
#include "server/model_store.h"

namespace pipeserve {

struct CoordinatorOptions {
  // Microbatches per request when the upload does not say.
  int default_microbatches = 4;
  // Deadline for requests that come without one.
  absl::Duration default_timeout = absl::Seconds(60);
  // Deadline for loading one model's stages.
  absl::Duration load_timeout = absl::Seconds(120);
  // Frames queued towards stage 0 before Infer waits (backpressure).
  int send_capacity = 8;
  // How often every ready model's stage servers are checked. A stage that
  // stops answering (or lost its stage) marks the model UNAVAILABLE, fails
  // its requests in flight, and the model is redeployed from the store,
  // retrying with backoff until it is back.
  absl::Duration health_interval = absl::Seconds(1);
};

enum class ModelState { kLoading, kReady, kUnavailable };
const char* ModelStateName(ModelState s);

struct ModelInfo {
  std::string name;
  ModelState state = ModelState::kLoading;
  std::string reason;  // why not ready
  // Shared and immutable: ModelInfo is copied on every request, the plan
  // (every stage's graph) is not.
  std::shared_ptr<const Plan> plan = std::make_shared<const Plan>();
  std::vector<std::string> servers;  // per stage
  int microbatches = 0;
  uint64_t bytes = 0;
};

class Deployment;

class Coordinator {
 public:
  Coordinator(CoordinatorOptions options, std::unique_ptr<ModelStore> store,
              std::unique_ptr<Launcher> launcher);
  ~Coordinator();

  // Deploys every model in the store (after a restart). Models that fail
  // are listed as UNAVAILABLE with the reason.
  void LoadStoredModels();

  // Uploads: stage the bytes with StartUpload, then FinishUpload checks the
  // size and CRC-32 (kDataLoss), partitions (kInvalidArgument with the
  // partitioner's message), deploys (kUnavailable if stage servers fail)
  // and only then commits the file to the store. On any error nothing is
  // stored and a model already serving under the name keeps serving.
  absl::StatusOr<std::unique_ptr<PendingUpload>> StartUpload(const std::string& name);
  absl::StatusOr<UploadResponse> FinishUpload(const std::string& name,
                                              const UploadOptions& options,
                                              std::unique_ptr<PendingUpload> upload,
                                              uint64_t total_bytes, uint32_t crc32);

  std::vector<ModelInfo> ListModels();
  // kNotFound for an unknown model.
  absl::StatusOr<ModelInfo> GetModel(const std::string& name);

  // Runs `inputs` (in the model's input order) through the pipeline, split
  // into the model's microbatch count; returns the outputs in order.
  // kNotFound (unknown model), kUnavailable (not ready, or a stage server
  // failed), kInvalidArgument (inputs that do not fit, naming the input),
  // kDeadlineExceeded, kCancelled (when `cancelled` turns true), or the
  // error a stage reported. Thread-safe; many requests pipeline together.
  absl::StatusOr<std::vector<Tensor>> Infer(const std::string& model,
                                            const std::vector<Tensor>& inputs,
                                            absl::Time deadline,
                                            std::function<bool()> cancelled = nullptr);

 private:
  absl::StatusOr<std::shared_ptr<Deployment>> Deploy(const std::string& name,
                                                     const std::string& path,
                                                     const UploadOptions& options,
                                                     uint64_t bytes);
  std::shared_ptr<Deployment> Find(const std::string& name);
  // Checks stage servers every health_interval.
  void MonitorLoop();
  // Redeploys models marked broken.
  void RepairLoop();
  void ScheduleRepair(const std::string& name);

  const CoordinatorOptions options_;
  const std::unique_ptr<ModelStore> store_;
  const std::unique_ptr<Launcher> launcher_;
  StageChannels channels_;  // to the stage servers
  std::atomic<uint64_t> next_request_id_{1};

  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Deployment>> models_ ABSL_GUARDED_BY(mu_);
  // Models found in the store that failed to deploy.
  std::map<std::string, ModelInfo> failed_ ABSL_GUARDED_BY(mu_);
  // Serialises uploads and deployments (they share stage servers).
  absl::Mutex deploy_mu_;

  absl::Mutex repair_mu_;
  std::map<std::string, absl::Time> to_repair_ ABSL_GUARDED_BY(repair_mu_);  // name -> not before
  std::map<std::string, int> repair_attempts_ ABSL_GUARDED_BY(repair_mu_);
  bool stopping_ ABSL_GUARDED_BY(repair_mu_) = false;
  std::thread monitor_thread_;
  std::thread repair_thread_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_CORE_H_
