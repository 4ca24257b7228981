// The coordinator's core: the registry of models, their uploads and
// deployments onto stage servers (found by a Launcher, reached through a
// StageClient), the request pipeline (each Deployment runs its requests),
// and health and repair. It serves no RPCs and includes no gRPC:
// server/coordinator/kserve_service.h and model_service.h are thin gRPC
// layers over it, and its tests run it against InProcessStages.
//
//   Coordinator coord(options, std::move(store), std::move(launcher), &stage_client);
//   coord.LoadStoredModels();
//   ASSIGN_OR_RETURN(std::shared_ptr<Deployment> model, coord.Find("example"));
//   ASSIGN_OR_RETURN(std::vector<Tensor> out, coord.InferOn(model, {x, y}, RequestOptions{deadline}));
#ifndef PIPESERVE_SERVER_COORDINATOR_CORE_H_
#define PIPESERVE_SERVER_COORDINATOR_CORE_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "partitioner/calibrate.h"
#include "proto/pipeserve_service.pb.h"
#include "runtime/backend.h"
#include "server/coordinator/admission.h"
#include "server/coordinator/deployment.h"
#include "server/coordinator/launcher.h"
#include "server/coordinator/model_store.h"
#include "server/coordinator/stage_client.h"

namespace pipeserve {

struct CoordinatorOptions {
  // Microbatches per request when the upload does not say, and the most
  // an upload may ask for.
  int default_microbatches = 4;
  int max_microbatches = 1024;
  // Replicas of every stage when the upload does not say (R lanes of S
  // stages on R x S stage servers).
  int default_replicas = 1;
  // Dynamic batching when the upload does not say (see Batcher; max_rows
  // 0 turns it off, max_in_flight 0: a model's stage servers).
  BatcherOptions batching = {64, absl::ZeroDuration(), 0};
  // Deadline for requests that come without one.
  absl::Duration default_timeout = absl::Seconds(60);
  // Deadline for a generation that comes without one (HTTP clients have
  // no way to give one): none by default, since a long completion may
  // take minutes; a client that hangs up cancels its generation.
  absl::Duration generation_timeout = absl::InfiniteDuration();
  // Most batch rows one request may carry (0: no limit).
  int64_t max_request_rows = int64_t{1} << 24;
  // Deadline for loading one model's stages.
  absl::Duration load_timeout = absl::Seconds(120);
  // How often every ready model's stage servers are checked. A stage that
  // stops answering, loses its stage, cannot send on, or loses its results
  // subscription takes its lane out of service (its microbatches run again
  // on the other lanes) and the lane is reloaded; with no lane left the
  // model is UNAVAILABLE, its requests wait, and it is redeployed from the
  // store, retrying with backoff until it is back.
  absl::Duration health_interval = absl::Milliseconds(500);
  // Most stages one model may be cut into.
  int max_stages = 64;
  // Largest upload, and uploads in progress at once.
  uint64_t max_upload_bytes = uint64_t{16} << 30;
  int max_concurrent_uploads = 2;
  // Requests one model may have queued or running at once; beyond it a
  // request gets kResourceExhausted at once (0: no limit).
  int max_queued_requests = 128;
  // Longest a replaced version may take to finish its requests in flight
  // before its stages are unloaded anyway.
  absl::Duration drain_timeout = absl::Seconds(60);
  // Leave the stages loaded when the coordinator goes away, for the next
  // one to adopt (stage servers that outlive the coordinator: the static
  // launcher).
  bool keep_stages_on_exit = false;
  // Automatic cuts (an upload's num_stages on a model without cut points)
  // are balanced by node times measured on this backend at upload (not
  // owned; null: by estimate, unless the upload brings a profile), with
  // `calibration` saying how, and links of this bandwidth between stages
  // when the upload does not say.
  ComputeBackend* calibration_backend = nullptr;
  CalibrationOptions calibration;
  double link_bytes_per_second = 1e9;
  // KV cache each stage server holds for a cache-aware model (SizeKvCache).
  int64_t kv_cache_bytes = int64_t{256} << 20;
};

// Checks `spec` (UploadOptions.tokenizer; empty: none) against the model
// of `plan` and puts it in the plan: kInvalidArgument naming the problem
// for a model not exported for generation, files that do not parse, or a
// tokenizer with more tokens than the model's vocabulary.
absl::Status AttachTokenizer(const std::string& name, const TokenizerSpec& spec, Plan* plan);

// The servers for the `broken` lanes of a model of `n` stages (`info`:
// its servers, lane by lane), from the launcher's `servers` (n per lane):
// those no serving lane uses, in order, so a launcher whose list shifted
// (a DNS name that lost a pod) never puts a lane onto another's servers.
// Where the launcher shares servers between stages, by position.
// kUnavailable when too few are free.
absl::StatusOr<std::vector<std::string>> ServersForBrokenLanes(
    const ModelInfo& info, const std::vector<int>& broken, int n,
    const std::vector<std::string>& servers);

// The payload marking a status as "too few stage servers now, with a
// launcher whose servers come later" (Coordinator::ServersFor).
inline constexpr char kWaitingForServers[] = "pipeserve/waiting-for-servers";

class Coordinator {
 public:
  // `stages` must outlive the coordinator.
  Coordinator(CoordinatorOptions options, std::unique_ptr<ModelStore> store,
              std::unique_ptr<Launcher> launcher, StageClient* stages);
  // Closes every deployment (unloading its stages).
  ~Coordinator();

  // Deploys every model in the store (after a restart). A model whose
  // stages an earlier coordinator left loaded on the launcher's existing
  // servers, exactly as this one would load them (same fingerprints, see
  // StageFingerprint), is adopted without sending a weight; every other
  // stage found there is unloaded (one coordinator owns its stage
  // servers). Models that fail are listed as UNAVAILABLE with the reason
  // and repaired like broken ones.
  void LoadStoredModels();

  // Stored models adopted from loaded stages by LoadStoredModels.
  int adopted_models() const { return adopted_models_.load(); }

  // Whether the coordinator can serve: the stored models have been loaded
  // once, and some model is READY (or there is no model at all, so nothing
  // is down). Health checks and KServe ServerReady report this.
  bool Serving();

  // Calls about a stored model (uploads, unloads, lookups) answer
  // kUnavailable until LoadStoredModels has loaded it (and calls about any
  // model until it has read the store): an upload must not race the
  // loader, which would put the stored version back over it. Other names
  // are served meanwhile.
  //
  // Uploads: stage the bytes with StartUpload (kResourceExhausted when
  // max_concurrent_uploads are in progress; the upload refuses data past
  // max_upload_bytes with kResourceExhausted), then FinishUpload checks the
  // size and CRC-32 (kDataLoss), partitions (kInvalidArgument with the
  // partitioner's message, or naming the limit a model exceeds), deploys
  // (kUnavailable if stage servers fail) and only then commits the file to
  // the store and switches requests to it. On any error nothing is stored
  // and a model already serving under the name keeps serving. One
  // exception: with a launcher whose servers come later (the dns one) and
  // too few now, a model that nothing serves yet is stored and waits, its
  // status saying for what, and the repair loop deploys it once enough
  // answer; the response's `waiting` says so.
  absl::StatusOr<std::unique_ptr<PendingUpload>> StartUpload(const std::string& name);
  // Uploads started and not yet finished or dropped (never more than
  // max_concurrent_uploads).
  int uploads_in_progress() const { return uploads_in_progress_.load(); }
  absl::StatusOr<UploadResponse> FinishUpload(const std::string& name,
                                              const UploadOptions& options,
                                              std::unique_ptr<PendingUpload> upload,
                                              uint64_t total_bytes, uint32_t crc32);

  // Stops serving `name`, unloads its stages and removes it from the
  // store. kNotFound for an unknown model.
  absl::Status Unload(const std::string& name);

  std::vector<ModelInfo> ListModels();
  // Every stage server address the coordinator has used since it started
  // (up to kMaxKnownAddresses): what RedactAddresses keeps from clients.
  // A shared snapshot, so that redacting an error copies nothing.
  static constexpr size_t kMaxKnownAddresses = 4096;
  std::shared_ptr<const std::vector<std::string>> StageServerAddresses();
  // kNotFound for an unknown model.
  absl::StatusOr<ModelInfo> GetModel(const std::string& name);
  // Whether GetModel(name) would succeed, without building its ModelInfo
  // (asked once per request, for its metrics label).
  bool Knows(const std::string& name);
  // Per stage of a READY model: the mean seconds its stage servers took to
  // compute a microbatch so far (see Deployment::MeasuredComputeSeconds);
  // empty for a model that is not deployed.
  std::vector<double> MeasuredComputeSeconds(const std::string& name);

  // The deployment serving `name`, to run requests on with InferOn: READY,
  // or broken and being repaired. kNotFound for an unknown model,
  // kUnavailable for one that has never deployed since the coordinator
  // started (its stage servers are not up yet). A caller checks
  // inputs against, and reads outputs by, this deployment's plan, so a
  // re-upload meanwhile cannot mix two versions.
  absl::StatusOr<std::shared_ptr<Deployment>> Find(const std::string& name);

  // Runs a request on `model` (from Find), and keeps it alive across
  // failures: when the deployment breaks (a stage server dies, a link
  // fails) or is replaced, the request waits, within its deadline, for the
  // repaired deployment (or a new version with the same inputs and
  // outputs) and runs again there; inference is idempotent, and each
  // attempt has its own request id, so frames of an earlier attempt are
  // dropped as strays. Errors as Deployment::Infer, except that
  // kUnavailable only comes back when the model was unloaded, the
  // coordinator is stopping, or the replacement has another signature;
  // kDeadlineExceeded when the deadline passes while waiting (naming the
  // failure waited out); kResourceExhausted when max_queued_requests of
  // the model are queued or running already.
  // options.pinned_version (not 0) keeps the request to that version;
  // options.answered_version gets the version that answered, and
  // options.trace the timeline of the attempt that answered.
  absl::StatusOr<std::vector<Tensor>> InferOn(std::shared_ptr<Deployment> model,
                                              const std::vector<Tensor>& inputs,
                                              const RequestOptions& options);

  // A request counted against its model's queue (max_queued_requests) from
  // Admit until it is destroyed (AdmissionQueue). Callers that queue
  // requests before they run them (ModelStreamInfer) admit them first, so
  // what waits is counted.
  using Admission = AdmissionQueue::Ticket;
  // kResourceExhausted, naming the limit, when max_queued_requests of
  // `name` are queued or running already.
  absl::StatusOr<Admission> Admit(const std::string& name) { return admission_.Admit(name); }
  // InferOn for a request admitted already (`admission` of model->name()).
  absl::StatusOr<std::vector<Tensor>> InferAdmitted(const Admission& admission,
                                                    std::shared_ptr<Deployment> model,
                                                    const std::vector<Tensor>& inputs,
                                                    const RequestOptions& options);

  // Find(model), then InferOn it.
  absl::StatusOr<std::vector<Tensor>> Infer(const std::string& model,
                                            const std::vector<Tensor>& inputs,
                                            const RequestOptions& options);
  absl::StatusOr<std::vector<Tensor>> Infer(const std::string& model,
                                            const std::vector<Tensor>& inputs,
                                            absl::Time deadline,
                                            const std::function<bool()>& cancelled = nullptr);

  // For a graceful shutdown: waits until no request is queued or running,
  // or `deadline`. True if none is.
  bool WaitIdle(absl::Time deadline);

  // The deadline a request without one gets.
  absl::Duration default_timeout() const { return options_.default_timeout; }
  // The deadline a generation starting now without one gets.
  absl::Time GenerationDeadline() const { return absl::Now() + options_.generation_timeout; }

  // `listener(model, version, unloaded)` runs each time a version leaves
  // service, replaced by an upload or unloaded, before the coordinator
  // checks whether it has drained (so a holder can let go of it there);
  // null: none. It runs outside the table of models' lock, and must
  // neither upload nor unload.
  using RetiredListener =
      std::function<void(const std::string& model, int64_t version, bool unloaded)>;
  void SetRetiredListener(RetiredListener listener);

  // Whether the stage servers compute on one machine's shared cores (the
  // local launcher without GPUs). A generation model's stages then take
  // turns: one step in flight, each stage using every core.
  bool StagesShareCores() const { return launcher_->StagesShareCores(); }

  // Requests that ran again after a failure, since start.
  uint64_t retried_requests() const { return retried_requests_.load(); }
  // Lanes of replicated deployments reloaded after a failure, since start.
  uint64_t reloaded_lanes() const { return reloaded_lanes_.load(); }

 private:
  // One model's lock: its uploads, unloads, deployments and repairs
  // happen one at a time, while other models' go on beside them (they
  // share stage servers, the launcher and the store, which are
  // thread-safe). Held while the object lives.
  // With `wait` false it only tries: held() says whether it got it.
  class ModelLock {
   public:
    ModelLock(Coordinator* c, const std::string& name, bool wait = true);
    ~ModelLock();
    ModelLock(const ModelLock&) = delete;
    ModelLock& operator=(const ModelLock&) = delete;
    bool held() const { return held_; }

   private:
    Coordinator* const c_;
    const std::string name_;
    absl::Mutex* mu_;
    bool held_ = false;
  };
  // kUnavailable while `name` may still be loaded from the store.
  absl::Status CheckLoaded(const std::string& name);
  bool Loading(const std::string& name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The launcher's servers for `n` stages, remembered (Remember).
  absl::StatusOr<std::vector<std::string>> ServersFor(int n);
  void Remember(const std::vector<std::string>& servers);
  // GEMM threads for each stage of `plan` (StagesShareCores).
  int ThreadsPerStage(const Plan& plan) const;
  // The model's stored entry, read now; nullopt when it is not stored.
  absl::StatusOr<absl::optional<StoredModel>> Stored(const std::string& name);
  // Deploys `name` (its ModelLock held). `measured`, when given, receives
  // the node profile measured to plan the model (nothing when none was).
  absl::StatusOr<std::shared_ptr<Deployment>> Deploy(const std::string& name,
                                                     const std::string& path,
                                                     const UploadOptions& options,
                                                     uint64_t bytes,
                                                     NodeProfile* measured = nullptr);
  std::shared_ptr<Deployment> Current(const std::string& name);
  // Partitions `file` as `options` say, within max_stages: automatic cuts
  // by the upload's profile, else by times measured now (returned in
  // `measured`), else by estimate (see UploadOptions.balance).
  absl::StatusOr<Plan> PlanFor(const std::string& name, const ModelFileReader& file,
                               const UploadOptions& options, NodeProfile* measured = nullptr);
  // PlanFor's cuts, before a cache-aware model's KV cache is sized
  // (SizeKvCache, kv_budget.h).
  absl::StatusOr<Plan> CutFor(const std::string& name, const ModelFileReader& file,
                              const UploadOptions& options, NodeProfile* measured);
  // The model's node times measured on the calibration backend, into
  // `profile`; left empty where balancing by time was not asked for
  // outright and cannot be done (no backend, or measuring failed: then
  // plan's balance says why).
  absl::Status MeasureProfile(const ModelFileReader& file, const UploadOptions& options,
                              Plan* plan, NodeProfile* profile) const;
  // Serves `name` from `d` (a new upload's deployment, its lock held): the
  // version it replaces finishes its requests in flight, then closes.
  void Publish(const std::string& name, const std::shared_ptr<Deployment>& d);
  // Closes `d`, replaced by a new upload, and logs it; `how` it went.
  void CloseRetired(Deployment& d, const std::string& how);
  // Tells the RetiredListener, if any, that `d` left service.
  void Retired(const std::string& name, const Deployment& d, bool unloaded);
  // FinishUpload's exception above: stores `upload` and lists the model as
  // waiting (`why`), for the repair loop.
  absl::StatusOr<UploadResponse> StoreWaiting(const std::string& name,
                                              const UploadOptions& options,
                                              std::unique_ptr<PendingUpload> upload,
                                              const absl::Status& why);
  // Deploys stored model `m` at start (LoadStoredModels), unless a newer
  // version serves by then; one that fails is listed UNAVAILABLE and
  // repaired.
  void DeployStored(const StoredModel& m);
  // A stage loaded on one of the launcher's servers when the coordinator
  // started.
  struct HeldStage {
    std::string address;
    StageKey key;
    uint64_t fingerprint = 0;
    bool adopted = false;
  };
  // A deployment of stored model `m` made of stages in `held` (marked
  // adopted), or null when they do not make one.
  std::shared_ptr<Deployment> TryAdopt(const StoredModel& m, std::vector<HeldStage>& held);
  // After `failed` (a deployment of `name`) failed a request with `why`:
  // the deployment to run it again on, once there is one that is READY.
  // `failed` itself again if it is still READY (a transient failure),
  // after a short wait.
  absl::StatusOr<std::shared_ptr<Deployment>> AwaitDeployment(
      const std::string& name, const std::shared_ptr<Deployment>& failed,
      const absl::Status& why, absl::Time deadline, absl::Duration backoff,
      const std::function<bool()>& cancelled, int64_t pinned_version);
  // Closes retired deployments that have drained (or run out of time).
  void CloseDrained(bool all);
  // Checks stage servers every health_interval.
  void MonitorLoop();
  // Redeploys models marked broken.
  void RepairLoop();
  void ScheduleRepair(const std::string& name);
  void Repair(const std::string& name);
  // Repair `name` again in 100 ms (its lock was held).
  void RepairSoon(const std::string& name);
  // A redeployment of stored model `m` failed with `why`: try again with
  // backoff, and, when nothing of it serves (`listed_failed`), list why.
  void RedeployFailed(const StoredModel& m, bool listed_failed, const absl::Status& why);
  // Reloads the broken lanes of `d` (still serving on the others; the
  // model's ModelLock held).
  absl::Status RepairLanes(const StoredModel& m, Deployment& d);

  const CoordinatorOptions options_;
  const std::unique_ptr<ModelStore> store_;
  const std::unique_ptr<Launcher> launcher_;
  StageClient* const stages_;
  DeploymentConfig config_;
  std::atomic<int> uploads_in_progress_{0};

  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Deployment>> models_ ABSL_GUARDED_BY(mu_);
  // Models found in the store that failed to deploy.
  std::map<std::string, ModelInfo> failed_ ABSL_GUARDED_BY(mu_);
  bool loaded_ ABSL_GUARDED_BY(mu_) = false;
  // The store has been read, and the stored models not yet loaded.
  bool store_listed_ ABSL_GUARDED_BY(mu_) = false;
  std::set<std::string> to_load_ ABSL_GUARDED_BY(mu_);
  // Replaced versions finishing their requests in flight, with the time
  // they are closed by regardless.
  std::vector<std::pair<std::shared_ptr<Deployment>, absl::Time>> retired_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> shutting_down_{false};
  absl::Mutex listener_mu_;
  RetiredListener retired_listener_ ABSL_GUARDED_BY(listener_mu_);
  std::atomic<uint64_t> retried_requests_{0};
  std::atomic<uint64_t> reloaded_lanes_{0};
  std::atomic<int> adopted_models_{0};
  AdmissionQueue admission_;
  // Each model's lock (ModelLock), with how many hold or wait for it; an
  // entry goes when nobody does.
  struct LockEntry {
    absl::Mutex mu;
    int users = 0;
  };
  absl::Mutex addresses_mu_;
  std::set<std::string> known_addresses_ ABSL_GUARDED_BY(addresses_mu_);
  // known_addresses_ as StageServerAddresses hands it out.
  std::shared_ptr<const std::vector<std::string>> addresses_ ABSL_GUARDED_BY(addresses_mu_) =
      std::make_shared<const std::vector<std::string>>();
  absl::Mutex locks_mu_;
  std::map<std::string, std::unique_ptr<LockEntry>> locks_ ABSL_GUARDED_BY(locks_mu_);

  absl::Mutex repair_mu_;
  std::map<std::string, absl::Time> to_repair_ ABSL_GUARDED_BY(repair_mu_);  // name -> not before
  std::map<std::string, int> repair_attempts_ ABSL_GUARDED_BY(repair_mu_);
  // Why the last repair of a model failed (what it waits for), shown in its
  // status until a repair succeeds.
  std::map<std::string, std::string> repair_why_ ABSL_GUARDED_BY(repair_mu_);
  // `info` with the reason its repair waits, where one is on record.
  ModelInfo WithRepairReason(ModelInfo info);
  void RepairFailed(const std::string& name, const absl::Status& why);
  bool stopping_ ABSL_GUARDED_BY(repair_mu_) = false;
  std::thread monitor_thread_;
  std::thread repair_thread_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_CORE_H_
