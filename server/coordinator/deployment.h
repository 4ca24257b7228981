// One deployment of a model: an upload, partitioned and loaded onto stage
// servers under its own random id, with stage 0's input open and the last
// stage's results subscribed. It runs requests (microbatching, deadlines,
// cancellation), checks every frame that comes back, and when it closes it
// unloads its stages. A re-upload makes a new deployment beside the old one
// and closes the old one only once the new one serves.
//
// With R replicas the deployment is R lanes, each a whole chain of the
// stages on its own servers (replica r of stage s sends to replica r of
// stage s+1). A request's microbatches are spread over the ready lanes;
// when a lane breaks (a server in it dies, a link of it fails) its
// unfinished microbatches run again at once on the others, with the next
// attempt number, while the lane is reloaded (ReloadLane). Only when no
// lane is left does the deployment break.
//
//   ASSIGN_OR_RETURN(std::shared_ptr<Deployment> d,
//                    Deployment::Create(config, "example", file, plan, options, servers, bytes));
//   ASSIGN_OR_RETURN(std::vector<Tensor> out, d->Infer({x, y}, RequestOptions{deadline}));
//   d->Close("replaced by a new upload");
#ifndef PIPESERVE_SERVER_COORDINATOR_DEPLOYMENT_H_
#define PIPESERVE_SERVER_COORDINATOR_DEPLOYMENT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/pipeserve_service.pb.h"
#include "runtime/model_file.h"
#include "runtime/tensor.h"
#include "server/coordinator/batcher.h"
#include "server/coordinator/stage_client.h"

namespace pipeserve {

enum class ModelState { kLoading, kReady, kUnavailable };
const char* ModelStateName(ModelState s);

struct ModelInfo {
  std::string name;
  ModelState state = ModelState::kLoading;
  std::string reason;  // why not ready
  // Shared and immutable: ModelInfo is copied freely, the plan (every
  // stage's graph) is not.
  std::shared_ptr<const Plan> plan = std::make_shared<const Plan>();
  std::vector<std::string> servers;  // per stage of lane 0, then of lane 1, ... (as Info() is asked)
  int replicas = 1;                  // lanes
  int ready_replicas = 0;            // lanes serving now
  uint64_t deployment = 0;
  int microbatches = 0;
  uint64_t bytes = 0;
  int64_t version = 1;  // the store's version of the upload (KServe model_version)
  BatcherOptions batching;  // dynamic batching (max_rows 0: none)
};

// What every deployment of a coordinator shares.
struct DeploymentConfig {
  StageClient* stages = nullptr;
  // Microbatches per request when the upload does not say.
  int default_microbatches = 4;
  // Replicas of every stage when the upload does not say.
  int default_replicas = 1;
  // Dynamic batching when the upload does not say (max_in_flight 0: the
  // deployment's stages x replicas).
  BatcherOptions batching = {64, absl::ZeroDuration(), 0};
  // Most microbatches an upload may ask for.
  int max_microbatches = 1024;
  // Deadline for requests that come without one.
  absl::Duration default_timeout = absl::Seconds(60);
  // Most batch rows one request may carry (0: no limit).
  int64_t max_request_rows = int64_t{1} << 24;
  // Deadline for loading all of a model's stages.
  absl::Duration load_timeout = absl::Seconds(120);
  // GEMM threads per stage (0: the servers decide).
  int threads_per_stage = 0;
  // Called with the model's name when a deployment or one of its lanes
  // breaks by itself (a results stream ended), so it gets repaired.
  std::function<void(const std::string&)> on_broken;
};

// How one request runs, whatever kind of work it carries: a one-shot
// forward pass (ModelInfer) or a generation step of sequences whose KV
// caches one lane holds.
struct RequestOptions {
  // When the request fails with kDeadlineExceeded (InfiniteFuture: the
  // coordinator's default timeout from now).
  absl::Time deadline = absl::InfiniteFuture();
  // Polled while the request runs: true ends it with kCancelled.
  std::function<bool()> cancelled;
  // The lane (replica) whose stages hold the state the request reads: a
  // generation step's KV caches. -1: any ready lane. When that lane is
  // out of service the request runs on another (a generation step then
  // finds no cache there, and the generator rebuilds its sequences).
  int lane = -1;
  // With `trace`, the timeline of the attempt that answered is appended
  // there (see Deployment::Infer); such a request is never merged.
  std::vector<TraceSpan>* trace = nullptr;
  // Coordinator only: run on this version of the model only (0: whichever
  // serves the name; a repair keeps the version, a new upload does not),
  // and, when not null, the version that answered.
  int64_t pinned_version = 0;
  int64_t* answered_version = nullptr;

  bool Cancelled() const { return cancelled && cancelled(); }
};

// Most replicas of a stage (StageKey.replica is below it).
inline constexpr int kMaxReplicas = 64;

// Whether `s` is the error of a request in flight on a deployment, or of
// a microbatch in flight on a lane, that broke (a stage server died or was
// cut off while it may have held their work): kUnavailable, so it runs
// again once there is somewhere to run, but marked, because a request lost
// like this twice is not run a third time (it may be what brings the
// servers down: kInternal then).
bool IsLostInFlight(const absl::Status& s);

// Losses to a link between live stage servers (LaneHealth::link_only) a
// request, or a microbatch on a lane, takes before they count as losses in
// flight: a live receiver may also end a stream over what the request
// sent, and every such loss costs a repair.
inline constexpr int kLinkLossesPerStrike = 3;

// Whether `s` is the error of a request in flight on a deployment that
// broke as link_only: kUnavailable, marked apart from IsLostInFlight.
bool IsLostOnLink(const absl::Status& s);
// The error of a request lost to links `times` times, `last` the last:
// kInternal, it is not run again.
absl::Status LostOnLinksTooOften(int times, const absl::Status& last);

class Deployment : public std::enable_shared_from_this<Deployment> {
 public:
  // Partitions `file`'s graph as `options` say, loads every stage of every
  // lane on `servers` (replicas x stages, lane by lane), subscribes to the
  // results and opens stage 0's inputs. kInvalidArgument for a model or
  // options that do not partition, or a stage server's refusal;
  // kUnavailable when a server cannot be reached. On error, stages already
  // loaded are unloaded.
  static absl::StatusOr<std::shared_ptr<Deployment>> Create(
      const DeploymentConfig& config, const std::string& name, const ModelFileReader& file,
      const Plan& plan, const UploadOptions& options, std::vector<std::string> servers,
      uint64_t bytes);

  // A deployment of stages already loaded under deployment id `id` (left
  // by a coordinator that went away, see Specs): subscribes to the results
  // and opens stage 0's inputs without sending a weight. On error nothing
  // is unloaded.
  static absl::StatusOr<std::shared_ptr<Deployment>> Adopt(
      const DeploymentConfig& config, const std::string& name, const Plan& plan,
      const UploadOptions& options, std::vector<std::string> servers, uint64_t bytes,
      uint64_t id);

  // The dynamic batching `options` ask for (or the default) for a
  // deployment on `servers` stage servers; kInvalidArgument for values out
  // of range.
  static absl::StatusOr<BatcherOptions> Batching(const DeploymentConfig& config,
                                                 const UploadOptions& options, int servers);

  // The replicas `options` ask for (or the default); kInvalidArgument
  // beyond kMaxReplicas.
  static absl::StatusOr<int> Replicas(const DeploymentConfig& config,
                                      const UploadOptions& options);

  // The specs Create would load (deployment id 0), lane by lane: their
  // fingerprints say which loaded stages Adopt can take over.
  static std::vector<StageSpec> Specs(const DeploymentConfig& config, const std::string& name,
                                      const Plan& plan, const UploadOptions& options,
                                      const std::vector<std::string>& servers, int replicas);

  // StageSpec.merge_rows for `plan`'s stages: the batcher's max_rows when
  // the model follows the batch (FollowsTheBatch, partitioner/partition.h),
  // else 0.
  static int64_t MergeRows(const Plan& plan, const BatcherOptions& batching);

  ~Deployment();

  const std::string& name() const { return name_; }
  ModelInfo Info() const;
  int64_t version() const;
  void set_version(int64_t version);
  const Plan& plan() const { return *plan_; }
  int replicas() const { return replicas_; }

  // Runs `inputs` (in the plan's input order) through the pipeline in the
  // deployment's microbatch count, spread over the ready lanes (only
  // options.lane, while it is ready); returns the
  // outputs in order. A batch of 0 rows runs as one empty microbatch. kInvalidArgument (inputs that do not fit, naming the input,
  // or more rows than max_request_rows), kUnavailable (not ready, or every
  // lane broke: LostInFlight), kDeadlineExceeded (also while stage 0 is
  // full), kCancelled (when options.cancelled turns true), kInternal (a stage
  // sent something that does not fit the plan, or a microbatch was lost
  // with its lane twice: LostTwice), or the error a stage reported. Thread-safe; many requests pipeline together.
  // Small requests are merged with concurrent ones while the deployment
  // is busy (dynamic batching, see Batcher), except traced ones and those
  // bound to a lane.
  // With options.trace, the request's timeline is appended there: the request
  // and each microbatch's send on the coordinator (stage -1), its
  // transfer, queue and compute on every stage, and its transfer back
  // ("receive"). `lost_before`: the request was lost with its servers
  // once already (LostInFlight): it runs alone, and a microbatch of it
  // lost again fails it with LostTwice instead of running a third time.
  absl::StatusOr<std::vector<Tensor>> Infer(const std::vector<Tensor>& inputs,
                                            const RequestOptions& options,
                                            bool lost_before = false);

  // The health of one ready lane: the first problem found asking its stage
  // servers (unreachable, stage lost, a broken link downstream, no results
  // subscription), or OK, with the lane's generation when asked (for
  // BreakLane).
  struct LaneHealth {
    int lane = 0;
    uint64_t generation = 0;
    absl::Status status;
    // A stage cannot send on while the next one answers: a link failed
    // between two live servers (rarely what a request caused: only every
    // kLinkLossesPerStrike-th such loss counts against one).
    bool link_only = false;
  };
  std::vector<LaneHealth> CheckLanes(absl::Duration timeout);

  // Takes lane `lane` (still at `generation`) out of service: its
  // unfinished microbatches run again on the other lanes. When it was the
  // last ready lane the deployment breaks as with Break. Returns false if
  // the lane was not ready (or was reloaded since): only the first caller
  // repairs. A `link_only` break (LaneHealth) counts one loss in
  // kLinkLossesPerStrike against the microbatches it catches in flight.
  bool BreakLane(int lane, uint64_t generation, const std::string& why, bool link_only = false);

  // Per stage: mean seconds computing a microbatch so far, over the ready
  // lanes' servers (from their stats; 0 for a stage none has computed for,
  // or whose servers did not answer within `timeout`).
  std::vector<double> MeasuredComputeSeconds(absl::Duration timeout);

  // Lanes out of service, waiting for ReloadLane.
  std::vector<int> BrokenLanes() const;

  // Loads lane `lane` again on `servers` (one per stage; the launcher's
  // servers now) with `threads` GEMM threads per stage, reconnects it and
  // puts it back in service. The other lanes serve throughout.
  absl::Status ReloadLane(int lane, const ModelFileReader& file,
                          const std::vector<std::string>& servers, int threads);

  // Marks the deployment UNAVAILABLE and fails the requests in flight with
  // kUnavailable(why). Returns false if it was not READY (already broken or
  // closing): only the first caller repairs.
  bool Break(const std::string& why);

  // Takes no new requests (they get kUnavailable(why) at once) but lets
  // those in flight finish: a re-upload retires the version it replaces
  // and closes it once Drained() (or its drain time is up).
  void Retire(const std::string& why);
  // Keeps the deployment taking requests after it retires, and not
  // Drained(), while the handle lives: a generator's sequences finish on
  // the version whose stages hold their KV caches (Generation).
  static std::shared_ptr<void> Hold(std::shared_ptr<Deployment> d);
  // No request in flight, and no Hold.
  bool Drained() const;
  // Retired or closing.
  bool LeftService() const;
  // Retired: replaced by an upload, or unloaded (a deployment closed for a
  // repair is not).
  bool Retiring() const;
  // Requests in flight.
  int InFlight() const;

  // Stops serving: fails requests in flight with kUnavailable(why), closes
  // the streams and unloads every stage (or, with `unload` false, leaves
  // them loaded for a coordinator that comes after). Idempotent.
  void Close(const std::string& why, bool unload = true);

  // Frames that came back for no request in flight (late, injected, or of
  // an earlier attempt of a microbatch).
  uint64_t stray_frames() const { return stray_frames_.load(); }
  // Microbatches sent again after their lane broke.
  uint64_t replayed_microbatches() const { return replayed_microbatches_.load(); }
  // Requests answered from a merged request (dynamic batching), and the
  // requests the batcher ran (merged or alone).
  uint64_t merged_requests() const { return batcher_->merged_requests(); }
  uint64_t batches() const { return batcher_->batches(); }
  // Requests waiting in the batcher for the model.
  size_t queued_requests() const { return batcher_->queued(); }
  // The batching this deployment does (max_rows 0: none).
  const BatcherOptions& batching() const { return batching_; }

 private:
  struct Pending;
  // One chain of the stages.
  struct Lane {
    std::vector<std::string> servers;  // per stage
    std::vector<StageSpec> specs;
    std::shared_ptr<FrameSink> input;
    std::unique_ptr<StageClient::Subscription> results;
    bool ready = false;
    // Counts connects, so a results stream of an earlier load that ends
    // late does not break the lane loaded since.
    uint64_t generation = 0;
  };
  // A ready lane's stages as they are now: where each is and its key.
  struct ReadyLane {
    int lane;
    uint64_t generation;
    std::vector<std::string> servers;
    std::vector<StageKey> keys;
    std::shared_ptr<FrameSink> input;  // to its first stage
  };
  std::vector<ReadyLane> ReadyLaneStages() const;
  Deployment(const DeploymentConfig& config, ModelInfo info, int replicas,
             std::vector<Lane> lanes, BatcherOptions batching);
  // Infer without the batcher: one request through the pipeline, in
  // `chunks` microbatches (0: the deployment's count).
  absl::StatusOr<std::vector<Tensor>> InferDirect(const std::vector<Tensor>& inputs,
                                                  const RequestOptions& options, int chunks = 0,
                                                  bool lost_before = false);
  // InferDirect's phases: a request's state while it is sent, and the
  // microbatch it sends next.
  struct Request;
  struct Send;
  // kUnavailable when the deployment takes no new request (retired,
  // closing, not READY), naming why.
  absl::Status CheckServing() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Each microbatch's batch rows (-1: none).
  std::vector<int64_t> MicrobatchRows(const std::vector<std::vector<Tensor>>& microbatches) const;
  // Sends every microbatch of `r` (again, when a lane breaks) until the
  // request is done (OK: its Pending says how) or ends otherwise (the
  // deadline, the client cancelled, stage 0 unreachable: that error).
  absl::Status SendAll(Request& r);
  // Waits for a microbatch of `r` to send and picks its lane; next->m -1
  // when the request is done meanwhile.
  absl::Status NextSend(Request& r, Send* next);
  // Sends it into its lane's stage 0, waiting for room within r.deadline.
  absl::Status SendMicrobatch(Request& r, const Send& next);
  // After stage 0 of next's lane could not be reached: whether the
  // microbatch goes to another lane (queued again) rather than failing r.
  bool Reroute(Request& r, const Send& next);
  // r's answer once SendAll ended with `ended`.
  absl::StatusOr<std::vector<Tensor>> Conclude(Request& r, const absl::Status& ended);
  static absl::StatusOr<std::shared_ptr<Deployment>> Make(
      const DeploymentConfig& config, const std::string& name, const Plan& plan,
      const UploadOptions& options, std::vector<std::string> servers, uint64_t bytes,
      uint64_t id);
  // Loads `specs` on `servers`, from the last stage back.
  absl::Status LoadLane(const std::vector<std::string>& servers,
                        const std::vector<StageSpec>& specs, const ModelFileReader& file,
                        absl::Time deadline);
  // Loads every lane from `file` (null: they are loaded already) and
  // connects it.
  absl::Status LoadAndConnect(const ModelFileReader* file);
  // Subscribes to lane `lane`'s results and opens its stage 0's input on
  // `servers`, and puts the lane (with `specs`) in service. READY once one
  // lane is.
  absl::Status ConnectLane(int lane, std::vector<std::string> servers,
                           std::vector<StageSpec> specs, absl::Time deadline);
  // Lane `lane`'s results from its last stage (on `last`): delivered while
  // this deployment lives; the stream's end breaks the lane (if still at
  // `generation`).
  absl::StatusOr<std::unique_ptr<StageClient::Subscription>> SubscribeLaneResults(
      int lane, uint64_t generation, const std::string& last, const StageKey& key,
      absl::Time deadline);
  // Unloads a lane's stages (specs[i] on servers[i]), errors ignored.
  void UnloadLaneStages(const std::vector<std::string>& servers,
                        const std::vector<StageSpec>& specs);

  // Handles one frame from lane `lane`'s last stage.
  void Deliver(int lane, Frame frame);
  // Checks a DATA frame against the plan's outputs for microbatch `m`.
  absl::Status CheckOutputs(const Frame& frame, const Pending& p) const;
  // `home` when it is ready and not `avoid`, else the next ready lane in
  // turn, preferring one other than `avoid`; -1 when none is ready.
  int PickLane(int avoid, int home = -1) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int ReadyLanes() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Finish(uint64_t id, absl::Status error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FailAll(const absl::Status& error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Fails every request in flight after lane `lane` (-1: every lane)
  // broke: LostInFlight for those with a microbatch out on it, LostTwice
  // for those with one out on it again after a replay, kUnavailable for
  // the rest.
  void FailBroken(const std::string& why, int lane, bool link_only = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SendCancel(uint64_t id);
  void UnloadStages();

  const DeploymentConfig config_;
  const std::string name_;
  const uint64_t id_;
  const int microbatches_;
  const int replicas_;
  const std::shared_ptr<const Plan> plan_;
  std::vector<bool> input_batched_, output_batched_;
  std::vector<int> first_inputs_;  // plan input index of each value sent to stage 0
  std::vector<std::string> first_names_;  // and its name there
  std::atomic<uint64_t> next_request_id_{1};
  std::atomic<uint64_t> stray_frames_{0};
  std::atomic<uint64_t> replayed_microbatches_{0};

  mutable absl::Mutex mu_;
  ModelInfo info_ ABSL_GUARDED_BY(mu_);
  std::vector<Lane> lanes_ ABSL_GUARDED_BY(mu_);
  uint64_t next_lane_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<uint64_t, std::shared_ptr<Pending>> pending_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  std::string retired_ ABSL_GUARDED_BY(mu_);  // why, once retired
  int holds_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Mutex close_mu_;  // serialises Close
  bool closed_ ABSL_GUARDED_BY(close_mu_) = false;

  const BatcherOptions batching_;
  // Last: its workers run InferDirect, so it goes (joining them) first.
  std::unique_ptr<Batcher> batcher_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_COORDINATOR_DEPLOYMENT_H_
