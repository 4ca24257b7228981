#include "server/coordinator/deployment.h"

#include <algorithm>
#include <deque>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/types/optional.h"
#include "absl/synchronization/notification.h"
#include "common/status_macros.h"
#include "partitioner/partition.h"
#include "runtime/microbatch.h"
#include "runtime/signature.h"
#include "server/stage/stage_spec.h"
#include "server/transport/frame_stream.h"

namespace pipeserve {

const char* ModelStateName(ModelState s) {
  switch (s) {
    case ModelState::kLoading:
      return "LOADING";
    case ModelState::kReady:
      return "READY";
    case ModelState::kUnavailable:
      return "UNAVAILABLE";
  }
  return "UNKNOWN";
}

namespace {

// Marks LostInFlight and LostTwice errors.
constexpr char kLostPayload[] = "type.pipeserve.dev/lost-in-flight";
// Marks LostOnLink errors.
constexpr char kLinkPayload[] = "type.pipeserve.dev/lost-on-link";

absl::Status LostOnLink(absl::string_view why) {
  absl::Status s = absl::UnavailableError(why);
  s.SetPayload(kLinkPayload, absl::Cord("once"));
  return s;
}

// The error of requests lost with their servers (IsLostInFlight).
absl::Status LostInFlight(absl::string_view why) {
  absl::Status s = absl::UnavailableError(why);
  s.SetPayload(kLostPayload, absl::Cord("once"));
  return s;
}

// The error of a request lost twice: kInternal, naming the last loss.
absl::Status LostTwice(absl::string_view why) {
  absl::Status s = absl::InternalError(absl::StrCat(
      "stage servers failed twice while computing this request (or one merged with it); it "
      "was not run again, in case it is what brings them down. Last: ", why));
  s.SetPayload(kLostPayload, absl::Cord("twice"));
  return s;
}

bool IsLostTwice(const absl::Status& s) {
  absl::optional<absl::Cord> p = s.GetPayload(kLostPayload);
  return p.has_value() && *p == "twice";
}

// How long an unload may take when a deployment closes (a dead server
// should not hold up an upload for long).
constexpr absl::Duration kUnloadTimeout = absl::Seconds(2);

uint64_t NewDeploymentId() {
  static absl::Mutex mu(absl::kConstInit);
  static absl::BitGen* gen = new absl::BitGen();
  absl::MutexLock lock(&mu);
  uint64_t id = 0;
  while (id == 0) id = absl::Uniform<uint64_t>(*gen);
  return id;
}

// A span of the coordinator's own (stage -1) from `start` to now.
TraceSpan CoordinatorSpan(const char* what, int replica, int microbatch, int64_t start_us) {
  TraceSpan span;
  span.set_what(what);
  span.set_stage(-1);
  span.set_replica(replica);
  span.set_microbatch(microbatch);
  const int64_t now_us = absl::ToUnixMicros(FrameClockNow());
  span.set_start_us(std::min(start_us, now_us));
  span.set_duration_us(now_us - span.start_us());
  return span;
}

bool ValidErrorCode(int code) {
  return code > 0 && code <= static_cast<int>(absl::StatusCode::kUnauthenticated);
}

}  // namespace

bool IsLostInFlight(const absl::Status& s) { return s.GetPayload(kLostPayload).has_value(); }

bool IsLostOnLink(const absl::Status& s) { return s.GetPayload(kLinkPayload).has_value(); }

absl::Status LostOnLinksTooOften(int times, const absl::Status& last) {
  return absl::InternalError(absl::StrCat(
      "links between live stage servers failed ", times, " times while carrying this request (or "
      "one merged with it); it was not run again, in case it is what ends their streams. Last: ",
      last.message()));
}

// One request in flight: what came back per microbatch, and where each
// microbatch is.
struct Deployment::Pending {
  explicit Pending(std::vector<int64_t> r)
      : rows(std::move(r)),
        remaining(static_cast<int>(rows.size())),
        outputs(rows.size()),
        lane(rows.size(), -1),
        attempt(rows.size(), 0),
        lost(rows.size(), 0),
        link_lost(rows.size(), 0) {
    for (int m = 0; m < static_cast<int>(rows.size()); ++m) to_send.push_back(m);
  }
  const std::vector<int64_t> rows;  // batch rows of each microbatch (-1: none)
  int remaining;
  std::vector<std::vector<Tensor>> outputs;
  std::vector<int> lane;     // where each microbatch was sent last (-1: waiting to be)
  std::vector<int> attempt;  // its attempt number there
  std::vector<int> lost;     // times it was in flight on a lane that broke
  std::vector<int> link_lost;  // of those, by a link (not yet counted in lost)
  std::deque<int> to_send;   // microbatches not sent yet, or lost with their lane

  // Whether microbatch `m` is out on `on` (any lane when -1): sent there,
  // not answered.
  bool Out(size_t m, int on) const {
    return lane[m] >= 0 && (on < 0 || lane[m] == on) && outputs[m].empty();
  }
  // Whether losing microbatch `m` once more makes it lost twice: it is not
  // run a third time, in case it is what brings the servers down.
  bool LastChance(size_t m) const { return lost[m] >= 1; }
  // Counts a loss of microbatch `m` to a link; whether it counts as lost.
  bool LinkStrike(size_t m) { return ++link_lost[m] % kLinkLossesPerStrike == 0; }

  // Traced requests: each microbatch's spans from the stages, and the
  // coordinator's own.
  std::vector<std::vector<TraceSpan>> spans;
  absl::Status error;
  absl::Notification done;
  absl::CondVar wake;  // with mu_: done, or more to send
};

Deployment::Deployment(const DeploymentConfig& config, ModelInfo info, int replicas,
                       std::vector<Lane> lanes, BatcherOptions batching)
    : config_(config),
      name_(info.name),
      id_(info.deployment),
      microbatches_(info.microbatches),
      replicas_(replicas),
      plan_(info.plan),
      info_(std::move(info)),
      lanes_(std::move(lanes)),
      batching_(batching) {
  for (const ValueSpec& in : plan_->inputs()) input_batched_.push_back(in.batched());
  for (const ValueSpec& out : plan_->outputs()) output_batched_.push_back(out.batched());
  for (const ValueSpec& v : lanes_.front().specs.front().receives()) {
    for (int i = 0; i < plan_->inputs_size(); ++i) {
      if (plan_->inputs(i).name() == v.name()) {
        first_inputs_.push_back(i);
        first_names_.push_back(v.name());
      }
    }
  }
  batcher_ = std::make_unique<Batcher>(
      batching_, FollowsTheBatch(*plan_),
      [this](const std::vector<Tensor>& inputs, absl::Time deadline,
             const std::function<bool()>& cancelled, bool merged) {
        // A merged request goes whole: the merged requests in flight keep
        // the stages busy, and fewer, larger frames cost less per row.
        RequestOptions options;
        options.deadline = deadline;
        options.cancelled = cancelled;
        return InferDirect(inputs, options, merged ? 1 : 0);
      },
      // A merged request lost twice with its stage servers is not run
      // again member by member: one of them may be what kills them.
      [](const absl::Status& s) { return Batcher::MayBeOneMembersFault(s) && !IsLostTwice(s); });
}

Deployment::~Deployment() { Close("the deployment was dropped"); }

absl::StatusOr<BatcherOptions> Deployment::Batching(const DeploymentConfig& config,
                                                   const UploadOptions& options, int servers) {
  BatcherOptions b = config.batching;
  if (options.max_batch_rows() < -1 || options.max_queue_delay_us() < 0 ||
      options.max_batches_in_flight() < 0) {
    return absl::InvalidArgumentError(
        "max_batch_rows must be >= -1 (-1: no batching), max_queue_delay_us and "
        "max_batches_in_flight >= 0");
  }
  if (options.max_queue_delay_us() > 10'000'000) {
    return absl::InvalidArgumentError(absl::StrCat("max_queue_delay_us ",
                                                   options.max_queue_delay_us(),
                                                   " is more than 10 s"));
  }
  if (options.max_batch_rows() == -1) b.max_rows = 0;
  if (options.max_batch_rows() > 0) b.max_rows = options.max_batch_rows();
  if (options.max_queue_delay_us() > 0) {
    b.max_queue_delay = absl::Microseconds(options.max_queue_delay_us());
  }
  if (options.max_batches_in_flight() > 0) b.max_in_flight = options.max_batches_in_flight();
  if (b.max_in_flight <= 0) b.max_in_flight = std::max(2, servers);
  b.max_in_flight = std::min(b.max_in_flight, 64);
  return b;
}

absl::StatusOr<int> Deployment::Replicas(const DeploymentConfig& config,
                                         const UploadOptions& options) {
  const int replicas = options.replicas() > 0 ? options.replicas()
                                              : std::max(1, config.default_replicas);
  if (replicas > kMaxReplicas) {
    return absl::InvalidArgumentError(absl::StrCat("replicas ", replicas,
                                                   " is more than a stage may have (",
                                                   kMaxReplicas, ")"));
  }
  return replicas;
}

int64_t Deployment::MergeRows(const Plan& plan, const BatcherOptions& batching) {
  return FollowsTheBatch(plan) ? std::max<int64_t>(0, batching.max_rows) : 0;
}

std::vector<StageSpec> Deployment::Specs(const DeploymentConfig& config, const std::string& name,
                                         const Plan& plan, const UploadOptions& options,
                                         const std::vector<std::string>& servers,
                                         int replicas) {
  const int n = plan.stages_size();
  absl::StatusOr<BatcherOptions> batching = Batching(config, options, n * replicas);
  const int64_t merge_rows = batching.ok() ? MergeRows(plan, *batching) : 0;
  std::vector<StageSpec> out;
  for (int r = 0; r < replicas; ++r) {
    std::vector<std::string> lane(servers.begin() + r * n, servers.begin() + (r + 1) * n);
    for (StageSpec& spec :
         MakeStageSpecs(plan, name, 0, lane, config.threads_per_stage, r, merge_rows)) {
      out.push_back(std::move(spec));
    }
  }
  return out;
}

absl::StatusOr<std::shared_ptr<Deployment>> Deployment::Make(
    const DeploymentConfig& config, const std::string& name, const Plan& plan,
    const UploadOptions& options, std::vector<std::string> servers, uint64_t bytes,
    uint64_t id) {
  const int n = plan.stages_size();
  ASSIGN_OR_RETURN(const int replicas, Replicas(config, options));
  if (n < 1 || static_cast<int>(servers.size()) != n * replicas) {
    return absl::InternalError(absl::StrCat("a plan of ", n, " stages in ", replicas,
                                            " replicas got ", servers.size(),
                                            " stage servers"));
  }
  int microbatches = options.microbatches() > 0 ? options.microbatches()
                                                : config.default_microbatches;
  if (microbatches > config.max_microbatches) {
    return absl::InvalidArgumentError(absl::StrCat("microbatches ", microbatches,
                                                   " is more than this coordinator allows (",
                                                   config.max_microbatches, ")"));
  }
  ModelInfo info;
  info.name = name;
  info.plan = std::make_shared<const Plan>(plan);
  info.replicas = replicas;
  info.deployment = id;
  info.bytes = bytes;
  info.microbatches = microbatches;
  ASSIGN_OR_RETURN(BatcherOptions batching, Batching(config, options, n * replicas));
  info.batching = batching;
  std::vector<Lane> lanes(replicas);
  for (int r = 0; r < replicas; ++r) {
    lanes[r].servers.assign(servers.begin() + r * n, servers.begin() + (r + 1) * n);
    lanes[r].specs = MakeStageSpecs(plan, name, id, lanes[r].servers, config.threads_per_stage,
                                    r, MergeRows(plan, batching));
  }
  return std::shared_ptr<Deployment>(
      new Deployment(config, std::move(info), replicas, std::move(lanes), batching));
}

absl::Status Deployment::LoadLane(const std::vector<std::string>& servers,
                                  const std::vector<StageSpec>& specs,
                                  const ModelFileReader& file, absl::Time deadline) {
  // From the last stage back, so each stage's next hop is ready before
  // anything can flow into it.
  WeightReader read = [&file](const std::string& fqn, uint64_t offset, size_t len, char* out) {
    return file.Read(fqn, offset, len, out);
  };
  for (int i = static_cast<int>(specs.size()) - 1; i >= 0; --i) {
    RETURN_IF_ERROR(config_.stages->LoadStage(servers[i], specs[i], read, deadline));
  }
  return absl::OkStatus();
}

absl::Status Deployment::LoadAndConnect(const ModelFileReader* file) {
  const absl::Time deadline = absl::Now() + config_.load_timeout;
  for (int r = 0; r < replicas_; ++r) {
    std::vector<std::string> servers;
    std::vector<StageSpec> specs;
    {
      absl::MutexLock lock(&mu_);
      servers = lanes_[r].servers;
      specs = lanes_[r].specs;
    }
    if (file != nullptr) RETURN_IF_ERROR(LoadLane(servers, specs, *file, deadline));
    RETURN_IF_ERROR(ConnectLane(r, std::move(servers), std::move(specs), deadline));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Deployment>> Deployment::Create(
    const DeploymentConfig& config, const std::string& name, const ModelFileReader& file,
    const Plan& plan, const UploadOptions& options, std::vector<std::string> servers,
    uint64_t bytes) {
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> d,
                   Make(config, name, plan, options, std::move(servers), bytes,
                        NewDeploymentId()));
  absl::Status s = d->LoadAndConnect(&file);
  if (!s.ok()) {
    d->Close(absl::StrCat("deploying failed: ", s.message()));
    return s;
  }
  return d;
}

absl::StatusOr<std::shared_ptr<Deployment>> Deployment::Adopt(
    const DeploymentConfig& config, const std::string& name, const Plan& plan,
    const UploadOptions& options, std::vector<std::string> servers, uint64_t bytes,
    uint64_t id) {
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> d,
                   Make(config, name, plan, options, std::move(servers), bytes, id));
  absl::Status s = d->LoadAndConnect(nullptr);
  if (!s.ok()) {
    // Its stages stay for the caller to unload or keep.
    d->Close(absl::StrCat("adopting failed: ", s.message()), /*unload=*/false);
    return s;
  }
  return d;
}

absl::StatusOr<std::unique_ptr<StageClient::Subscription>> Deployment::SubscribeLaneResults(
    int lane, uint64_t generation, const std::string& last, const StageKey& key,
    absl::Time deadline) {
  std::weak_ptr<Deployment> weak = shared_from_this();
  return config_.stages->SubscribeResults(
      last, key,
      [weak, lane](Frame f) {
        if (auto dep = weak.lock()) dep->Deliver(lane, std::move(f));
      },
      [weak, last, lane, generation](const absl::Status& end) {
        auto dep = weak.lock();
        if (dep == nullptr) return;
        std::string why = absl::StrCat(
            "the results stream from the last stage (", last,
            dep->replicas_ > 1 ? absl::StrCat(", replica ", lane) : std::string(),
            ") ended: ", end.message());
        if (dep->BreakLane(lane, generation, why) && dep->config_.on_broken) {
          dep->config_.on_broken(dep->name_);
        }
      },
      deadline);
}

void Deployment::UnloadLaneStages(const std::vector<std::string>& servers,
                                  const std::vector<StageSpec>& specs) {
  const absl::Time unload_by = absl::Now() + kUnloadTimeout;
  for (size_t i = 0; i < specs.size(); ++i) {
    config_.stages->UnloadStage(servers[i], specs[i].key(), unload_by).IgnoreError();
  }
}

absl::Status Deployment::ConnectLane(int lane, std::vector<std::string> servers,
                                     std::vector<StageSpec> specs, absl::Time deadline) {
  const int n = static_cast<int>(specs.size());
  uint64_t generation;
  {
    absl::MutexLock lock(&mu_);
    generation = lanes_[lane].generation + 1;
  }
  absl::StatusOr<std::unique_ptr<StageClient::Subscription>> results =
      SubscribeLaneResults(lane, generation, servers[n - 1], specs[n - 1].key(), deadline);
  if (!results.ok()) return results.status();
  std::shared_ptr<FrameSink> input = config_.stages->OpenInput(servers[0], specs[0].key());
  std::shared_ptr<FrameSink> old_input;
  std::unique_ptr<StageClient::Subscription> old_results;
  bool closing;
  {
    absl::MutexLock lock(&mu_);
    closing = closing_;
    if (!closing) {
      Lane& l = lanes_[lane];
      old_input = std::exchange(l.input, input);
      old_results = std::exchange(l.results, *std::move(results));
      l.servers = servers;
      l.specs = specs;
      l.generation = generation;
      l.ready = true;
      // A broken deployment (no lane left) is redeployed whole, not here.
      if (info_.state == ModelState::kLoading) info_.state = ModelState::kReady;
    }
  }
  if (closing) {
    // Closed meanwhile (a re-upload, an unload): what this connect made
    // goes, and so do the stages it connected.
    input->Close();
    results->reset();
    UnloadLaneStages(servers, specs);
    return absl::UnavailableError("the deployment closed while a replica was connected");
  }
  // Ending a results stream calls BreakLane, which takes mu_.
  if (old_input) old_input->Close();
  old_results.reset();
  return absl::OkStatus();
}

absl::Status Deployment::ReloadLane(int lane, const ModelFileReader& file,
                                    const std::vector<std::string>& servers, int threads) {
  const int n = plan_->stages_size();
  if (lane < 0 || lane >= replicas_ || static_cast<int>(servers.size()) != n) {
    return absl::InternalError(absl::StrCat("lane ", lane, " of ", replicas_, " got ",
                                            servers.size(), " servers for ", n, " stages"));
  }
  std::vector<std::string> old_servers;
  std::vector<StageSpec> old_specs;
  {
    absl::MutexLock lock(&mu_);
    if (closing_) return absl::UnavailableError("the deployment is closing");
    old_servers = lanes_[lane].servers;
    old_specs = lanes_[lane].specs;
  }
  // A server that does not answer at once (not back yet, its link still
  // down) is not worth a load that would wait for it: the repair is tried
  // again later.
  for (const std::string& address : servers) {
    absl::Status up =
        config_.stages->ListStages(address, absl::Now() + absl::Seconds(2)).status();
    if (!up.ok()) {
      return absl::UnavailableError(absl::StrCat("replica ", lane, ": stage server ", address,
                                                 " does not answer: ", up.message()));
    }
  }
  std::vector<StageSpec> specs =
      MakeStageSpecs(*plan_, name_, id_, servers, threads, lane, MergeRows(*plan_, batching_));
  const absl::Time deadline = absl::Now() + config_.load_timeout;
  absl::Status s = LoadLane(servers, specs, file, deadline);
  if (s.ok()) s = ConnectLane(lane, servers, specs, deadline);
  const absl::Time unload_by = absl::Now() + kUnloadTimeout;
  if (!s.ok()) {
    for (int i = 0; i < n; ++i) {
      config_.stages->UnloadStage(servers[i], specs[i].key(), unload_by).IgnoreError();
    }
    return s;
  }
  // A server of the lane that was replaced by another address (restarted
  // on a new port) may still hold the stage: it goes.
  for (int i = 0; i < n; ++i) {
    if (old_servers[i] != servers[i]) {
      config_.stages->UnloadStage(old_servers[i], old_specs[i].key(), unload_by).IgnoreError();
    }
  }
  return absl::OkStatus();
}

ModelInfo Deployment::Info() const {
  absl::MutexLock lock(&mu_);
  ModelInfo info = info_;
  info.ready_replicas = info_.state == ModelState::kReady ? ReadyLanes() : 0;
  // The lanes' servers now (a reloaded lane may be on new ones).
  info.servers.clear();
  for (const Lane& l : lanes_) {
    info.servers.insert(info.servers.end(), l.servers.begin(), l.servers.end());
  }
  return info;
}

int64_t Deployment::version() const {
  absl::MutexLock lock(&mu_);
  return info_.version;
}

void Deployment::set_version(int64_t version) {
  absl::MutexLock lock(&mu_);
  info_.version = version;
}

int Deployment::ReadyLanes() const {
  int ready = 0;
  for (const Lane& l : lanes_) ready += l.ready ? 1 : 0;
  return ready;
}

int Deployment::PickLane(int avoid, int home) {
  if (home >= 0 && home != avoid && lanes_[home].ready) return home;
  int fallback = -1;
  for (int i = 0; i < replicas_; ++i) {
    const int r = static_cast<int>(next_lane_++ % replicas_);
    if (!lanes_[r].ready) continue;
    if (r != avoid) return r;
    fallback = r;
  }
  return fallback;
}

absl::Status Deployment::CheckOutputs(const Frame& frame, const Pending& p) const {
  const int m = frame.header.microbatch();
  if (frame.tensors.size() != static_cast<size_t>(plan_->outputs_size()) ||
      frame.header.tensors_size() != plan_->outputs_size()) {
    return absl::InternalError(absl::StrCat("microbatch ", m, " came back with ",
                                            frame.tensors.size(), " tensors, the model has ",
                                            plan_->outputs_size(), " outputs"));
  }
  for (int j = 0; j < plan_->outputs_size(); ++j) {
    const ValueSpec& spec = plan_->outputs(j);
    const Tensor& t = frame.tensors[j];
    const DataType want = spec.dtype() == DT_INVALID ? DT_FLOAT32 : spec.dtype();
    bool ok = frame.header.tensors(j).name() == spec.name() && t.rank() == spec.shape_size() &&
              t.dtype() == want;
    for (int d = 0; ok && d < t.rank(); ++d) {
      if (spec.shape(d) >= 0) {
        ok = t.dim(d) == spec.shape(d);
      } else if (d == 0 && spec.batched()) {
        ok = t.dim(d) == p.rows[m];  // the microbatch's rows
      }  // else a free dimension (a sequence length): any size
    }
    if (!ok) {
      return absl::InternalError(absl::StrCat(
          "microbatch ", m, " came back with \"", frame.header.tensors(j).name(), "\" ",
          ShapeToString(t.shape()), " where output \"", spec.name(), "\" ",
          ShapeToString(Shape(spec.shape().begin(), spec.shape().end())), " was due (",
          p.rows[m], " rows)"));
    }
  }
  return absl::OkStatus();
}

void Deployment::Finish(uint64_t id, absl::Status error) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  it->second->error = std::move(error);
  it->second->done.Notify();
  it->second->wake.SignalAll();
  pending_.erase(it);
}

void Deployment::FailAll(const absl::Status& error) {
  while (!pending_.empty()) Finish(pending_.begin()->first, error);
}

void Deployment::FailBroken(const std::string& why, int lane, bool link_only) {
  // A request is lost with the servers only if some microbatch of it was
  // out on them (sent, not answered); lost again after a replay, it is
  // lost twice. The rest, and all after a link failure, simply wait for
  // the repair.
  // (Coordinator::InferAdmitted counts a request's losses to links.)
  std::vector<std::pair<uint64_t, absl::Status>> ends;
  for (auto& [id, p] : pending_) {
    bool in_flight = false, again = false;
    for (size_t m = 0; m < p->outputs.size(); ++m) {
      if (!p->Out(m, lane)) continue;
      in_flight = true;
      again = again || (!link_only && p->LastChance(m));
    }
    ends.emplace_back(id, again                    ? LostTwice(why)
                          : in_flight && link_only ? LostOnLink(why)
                          : in_flight              ? LostInFlight(why)
                                                   : absl::UnavailableError(why));
  }
  for (auto& [id, status] : ends) Finish(id, std::move(status));
}

void Deployment::Deliver(int lane, Frame frame) {
  const FrameHeader& h = frame.header;
  absl::MutexLock lock(&mu_);
  auto it = pending_.find(h.request_id());
  if (it == pending_.end()) {
    ++stray_frames_;  // late (the request ended) or made up
    return;
  }
  Pending& p = *it->second;
  const int m = h.microbatch();
  const bool known = m >= 0 && m < static_cast<int>(p.outputs.size());
  if (known && (p.lane[m] != lane || p.attempt[m] != h.attempt())) {
    ++stray_frames_;  // an earlier attempt, from a lane that broke
    return;
  }
  if (h.kind() == FrameHeader::ERROR) {
    // A stage's error, passed on; an ERROR frame never means success.
    Finish(h.request_id(),
           ValidErrorCode(h.error_code())
               ? absl::Status(static_cast<absl::StatusCode>(h.error_code()), h.error_message())
               : absl::InternalError(absl::StrCat("a stage failed the request without an error "
                                                  "code: ", h.error_message())));
    return;
  }
  if (h.kind() != FrameHeader::DATA) return;  // a CANCEL that travelled to the end
  if (!known || !p.outputs[m].empty()) {
    Finish(h.request_id(), absl::InternalError(absl::StrCat(
                               "the last stage sent microbatch ", m, " of a request split into ",
                               p.outputs.size(), known ? ", twice" : "")));
    return;
  }
  absl::Status fits = CheckOutputs(frame, p);
  if (!fits.ok()) {
    Finish(h.request_id(), fits);
    return;
  }
  p.outputs[m] = std::move(frame.tensors);
  if (h.trace() && !p.spans.empty()) {
    std::vector<TraceSpan>& spans = p.spans[m];
    spans.insert(spans.end(), h.spans().begin(), h.spans().end());
    spans.push_back(CoordinatorSpan("receive", lane, m, h.sent_us()));
  }
  if (--p.remaining == 0) Finish(h.request_id(), absl::OkStatus());
}

void Deployment::SendCancel(uint64_t id) {
  // Tell the stages to drop whatever of this request they still hold; a
  // stage 0 too full to take it soon is left alone (the deadlines go on).
  std::vector<std::shared_ptr<FrameSink>> inputs;
  {
    absl::MutexLock lock(&mu_);
    for (const Lane& l : lanes_) {
      if (l.ready) inputs.push_back(l.input);
    }
  }
  for (const std::shared_ptr<FrameSink>& input : inputs) {
    Frame cancel;
    cancel.header.set_kind(FrameHeader::CANCEL);
    cancel.header.set_request_id(id);
    input->Send(std::move(cancel), absl::Now() + absl::Milliseconds(100)).IgnoreError();
  }
}

absl::StatusOr<std::vector<Tensor>> Deployment::Infer(const std::vector<Tensor>& inputs,
                                                      const RequestOptions& options,
                                                      bool lost_before) {
  // Checked here, so one bad request never fails a merged one.
  ASSIGN_OR_RETURN(const int64_t rows, CheckTensorsMatch(plan_->inputs(), inputs));
  if (config_.max_request_rows > 0 && rows > config_.max_request_rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a batch of ", rows, " rows is more than this coordinator takes in one request (",
        config_.max_request_rows, ", --max_request_rows); send it in parts"));
  }
  if (options.trace != nullptr || options.lane >= 0 || lost_before) {
    return InferDirect(inputs, options, 0, lost_before);
  }
  absl::Time deadline = options.deadline;
  if (deadline == absl::InfiniteFuture()) deadline = absl::Now() + config_.default_timeout;
  return batcher_->Infer(inputs, deadline, options.cancelled);
}

// One request on its way through the pipeline: InferDirect's state while
// it sends the microbatches.
struct Deployment::Request {
  uint64_t id = 0;
  std::shared_ptr<Pending> pending;
  std::vector<std::vector<Tensor>> microbatches;  // each one's inputs, in plan order
  absl::Time deadline;
  const std::function<bool()>* cancelled = nullptr;
  std::vector<TraceSpan>* trace = nullptr;  // null: not traced
  absl::Time began;
  int sent = 0;    // first sends done (for the messages)
  int avoid = -1;  // a lane whose stage 0 could not be reached
  int home = -1;   // the lane holding the state it reads (RequestOptions::lane)

  bool Cancelled() const { return *cancelled && (*cancelled)(); }
};

// The microbatch a request sends next, and where.
struct Deployment::Send {
  int m = -1;  // -1: none (the request ended meanwhile)
  int lane = -1;
  int attempt = 0;
  std::shared_ptr<FrameSink> input;
};

absl::Status Deployment::CheckServing() const {
  if (!retired_.empty() && holds_ == 0) return absl::UnavailableError(retired_);
  if (closing_ || info_.state != ModelState::kReady) {
    return absl::UnavailableError(absl::StrCat("model \"", name_, "\" is ",
                                               ModelStateName(info_.state), ": ", info_.reason));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Tensor>> Deployment::InferDirect(const std::vector<Tensor>& inputs,
                                                            const RequestOptions& options,
                                                            int chunks, bool lost_before) {
  Request r;
  r.began = FrameClockNow();
  {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(CheckServing());
  }
  ASSIGN_OR_RETURN(int64_t batch, CheckTensorsMatch(plan_->inputs(), inputs));
  r.deadline = options.deadline == absl::InfiniteFuture()
                   ? absl::Now() + config_.default_timeout
                   : options.deadline;
  r.cancelled = &options.cancelled;
  r.trace = options.trace;
  r.home = options.lane < replicas_ ? options.lane : -1;
  if (batch == 0) {
    // One empty microbatch: the stages make the outputs, with their types
    // and the sizes of other free dims (zeros made here were float32, and
    // every free dim 0).
    r.microbatches.push_back(inputs);
  } else {
    ASSIGN_OR_RETURN(r.microbatches, SplitMicrobatches(inputs, input_batched_,
                                                       chunks > 0 ? chunks : microbatches_));
  }
  r.pending = std::make_shared<Pending>(MicrobatchRows(r.microbatches));
  if (lost_before) r.pending->lost.assign(r.microbatches.size(), 1);
  if (r.trace != nullptr) r.pending->spans.resize(r.microbatches.size());
  r.id = next_request_id_++;
  {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(CheckServing());
    pending_[r.id] = r.pending;
  }
  const absl::Status ended = SendAll(r);
  return Conclude(r, ended);
}

std::vector<int64_t> Deployment::MicrobatchRows(
    const std::vector<std::vector<Tensor>>& microbatches) const {
  std::vector<int64_t> rows;
  for (const std::vector<Tensor>& mb : microbatches) {
    int64_t r = -1;
    for (size_t i = 0; i < mb.size(); ++i) {
      if (input_batched_[i] && mb[i].rank() > 0) r = mb[i].dim(0);
    }
    rows.push_back(r);
  }
  return rows;
}

absl::Status Deployment::SendAll(Request& r) {
  // Send every microbatch to a ready lane, then wait; a lane that breaks
  // meanwhile hands its unfinished microbatches back to be sent again.
  while (true) {
    Send next;
    RETURN_IF_ERROR(NextSend(r, &next));
    if (next.m < 0) return absl::OkStatus();  // done: its status says how it ended
    absl::Status s = SendMicrobatch(r, next);
    if (r.pending->done.HasBeenNotified()) return absl::OkStatus();
    if (r.Cancelled()) return absl::CancelledError("the client cancelled the request");
    if (s.ok()) {
      if (next.attempt == 1) ++r.sent;
      r.avoid = -1;
      continue;
    }
    if (s.code() == absl::StatusCode::kDeadlineExceeded) {
      return absl::DeadlineExceededError(absl::StrCat(
          "request to \"", name_, "\" missed its deadline while stage 0 was full (", r.sent,
          " of ", r.microbatches.size(), " microbatches sent)"));
    }
    if (Reroute(r, next)) continue;
    return absl::UnavailableError(
        absl::StrCat("cannot reach stage 0 of \"", name_, "\": ", s.message()));
  }
}

absl::Status Deployment::NextSend(Request& r, Send* next) {
  Pending& p = *r.pending;
  absl::MutexLock lock(&mu_);
  while (!p.done.HasBeenNotified() && p.to_send.empty()) {
    const absl::Time now = absl::Now();
    if (now >= r.deadline || r.Cancelled()) break;
    p.wake.WaitWithDeadline(&mu_, std::min(r.deadline, now + absl::Milliseconds(*r.cancelled ? 20 : 1000)));
  }
  if (p.done.HasBeenNotified()) return absl::OkStatus();  // next->m stays -1
  if (p.to_send.empty()) {
    if (r.Cancelled()) return absl::CancelledError("the client cancelled the request");
    return absl::DeadlineExceededError(absl::StrCat(
        "request to \"", name_, "\" missed its deadline with ", p.remaining, " of ",
        r.microbatches.size(), " microbatches unfinished"));
  }
  next->lane = PickLane(r.avoid, r.home);
  if (next->lane < 0) {
    // No lane left: Break failed the request already, or is about to.
    return absl::UnavailableError(
        absl::StrCat("model \"", name_, "\" has no ready replica: ", info_.reason));
  }
  next->m = p.to_send.front();
  p.to_send.pop_front();
  p.lane[next->m] = next->lane;
  next->attempt = ++p.attempt[next->m];
  if (next->attempt > 1) ++replayed_microbatches_;
  next->input = lanes_[next->lane].input;
  return absl::OkStatus();
}

absl::Status Deployment::SendMicrobatch(Request& r, const Send& next) {
  Frame f;
  f.header.set_request_id(r.id);
  f.header.set_microbatch(next.m);
  f.header.set_deadline_us(absl::ToUnixMicros(r.deadline));
  f.header.set_attempt(next.attempt);
  for (size_t k = 0; k < first_inputs_.size(); ++k) {
    f.Add(first_names_[k], r.microbatches[next.m][first_inputs_[k]]);
  }
  const absl::Time send_began = FrameClockNow();
  if (r.trace != nullptr) {
    f.header.set_trace(true);
    f.header.set_sent_us(absl::ToUnixMicros(send_began));
  }
  // Sent in slices of the deadline, so a request that ends while stage 0
  // is full (a stage's error, a broken pipeline, the client gone) stops
  // waiting for room at once.
  absl::Status s;
  while (true) {
    s = next.input->Send(f, std::min(r.deadline, absl::Now() + absl::Milliseconds(50)));
    if (s.code() != absl::StatusCode::kDeadlineExceeded || absl::Now() >= r.deadline) break;
    if (r.pending->done.HasBeenNotified() || r.Cancelled()) break;
  }
  if (s.ok() && r.trace != nullptr) {
    // Time blocked on stage 0's backpressure, and encoding (recorded even
    // when the answer is back already: in-process stages can be that fast).
    TraceSpan span = CoordinatorSpan("send", next.lane, next.m, absl::ToUnixMicros(send_began));
    absl::MutexLock lock(&mu_);
    r.pending->spans[next.m].push_back(std::move(span));
  }
  return s;
}

bool Deployment::Reroute(Request& r, const Send& next) {
  // This lane's stage 0 cannot be reached: another lane takes the
  // microbatch (the health check decides about the lane), or, with none
  // other, the request fails over as the coordinator decides.
  Pending& p = *r.pending;
  absl::MutexLock lock(&mu_);
  if (p.done.HasBeenNotified() || p.lane[next.m] != next.lane ||
      p.attempt[next.m] != next.attempt) {
    return p.lane[next.m] == -1;  // its lane broke meanwhile and handed it back
  }
  bool other = false;
  for (int lane = 0; lane < replicas_; ++lane) {
    other = other || (lane != next.lane && lanes_[lane].ready);
  }
  if (!other) return false;
  p.lane[next.m] = -1;
  p.to_send.push_front(next.m);
  r.avoid = next.lane;
  return true;
}

absl::StatusOr<std::vector<Tensor>> Deployment::Conclude(Request& r, const absl::Status& ended) {
  if (!ended.ok()) {
    {
      absl::MutexLock lock(&mu_);
      pending_.erase(r.id);
    }
    if (r.sent > 0) SendCancel(r.id);
    return ended;
  }
  if (!r.pending->error.ok()) {
    SendCancel(r.id);  // the stages drop what is left of it
    return r.pending->error;
  }
  absl::StatusOr<std::vector<Tensor>> merged =
      MergeMicrobatches(output_batched_, r.pending->outputs);
  if (r.trace != nullptr) {
    r.trace->push_back(CoordinatorSpan("request", 0, -1, absl::ToUnixMicros(r.began)));
    // Finished: no frame of this request touches its spans any more.
    for (std::vector<TraceSpan>& spans : r.pending->spans) {
      r.trace->insert(r.trace->end(), spans.begin(), spans.end());
    }
  }
  return merged;
}

std::vector<Deployment::ReadyLane> Deployment::ReadyLaneStages() const {
  std::vector<ReadyLane> out;
  absl::MutexLock lock(&mu_);
  for (int r = 0; r < replicas_; ++r) {
    const Lane& l = lanes_[r];
    if (!l.ready) continue;
    ReadyLane a{r, l.generation, l.servers, {}, l.input};
    for (const StageSpec& spec : l.specs) a.keys.push_back(spec.key());
    out.push_back(std::move(a));
  }
  return out;
}

std::vector<double> Deployment::MeasuredComputeSeconds(absl::Duration timeout) {
  const int n = plan().stages_size();
  std::vector<double> seconds(n, 0.0), frames(n, 0.0);
  const absl::Time deadline = absl::Now() + timeout;
  for (const ReadyLane& lane : ReadyLaneStages()) {
    for (size_t i = 0; i < lane.keys.size(); ++i) {
      const StageKey& key = lane.keys[i];
      absl::StatusOr<StageStatsResponse> stats =
          config_.stages->GetStageStats(lane.servers[i], key, deadline);
      if (!stats.ok() || key.stage() < 0 || key.stage() >= n) continue;
      seconds[key.stage()] += stats->compute_seconds();
      frames[key.stage()] += static_cast<double>(stats->frames_processed());
    }
  }
  for (int s = 0; s < n; ++s) seconds[s] = frames[s] > 0 ? seconds[s] / frames[s] : 0.0;
  return seconds;
}

std::vector<Deployment::LaneHealth> Deployment::CheckLanes(absl::Duration timeout) {
  const std::vector<ReadyLane> asks = ReadyLaneStages();
  const absl::Time deadline = absl::Now() + timeout;
  std::vector<LaneHealth> out;
  for (const ReadyLane& a : asks) {
    LaneHealth h{a.lane, a.generation, absl::OkStatus()};
    const std::string replica =
        replicas_ > 1 ? absl::StrCat(" (replica ", a.lane, ")") : std::string();
    if (absl::Status lost = a.input ? a.input->Lost() : absl::OkStatus(); !lost.ok()) {
      h.status = absl::UnavailableError(absl::StrCat("the stream to stage 0", replica, " on ",
                                                     a.servers[0], " broke: ", lost.message()));
    }
    for (size_t i = 0; i < a.keys.size() && h.status.ok(); ++i) {
      const std::string& address = a.servers[i];
      absl::StatusOr<StageStatsResponse> stats =
          config_.stages->GetStageStats(address, a.keys[i], deadline);
      if (!stats.ok()) {
        h.status = absl::UnavailableError(absl::StrCat("stage ", i, replica, " on ", address,
                                                       " failed its health check: ",
                                                       stats.status().message()));
      } else if (!stats->downstream_error().empty()) {
        h.link_only = i + 1 < a.keys.size() &&
                      config_.stages->GetStageStats(a.servers[i + 1], a.keys[i + 1], deadline).ok();
        h.status = absl::UnavailableError(absl::StrCat(
            "stage ", i, replica, " on ", address, " cannot send on: ", stats->downstream_error(),
            h.link_only ? absl::StrCat(" (stage ", i + 1, " answers: the link failed)") : ""));
      } else if (i + 1 == a.keys.size() && !stats->results_subscribed()) {
        h.status = absl::UnavailableError(absl::StrCat(
            "stage ", i, replica, " on ", address, " has lost the results subscription"));
      }
    }
    out.push_back(std::move(h));
  }
  return out;
}

bool Deployment::BreakLane(int lane, uint64_t generation, const std::string& why,
                           bool link_only) {
  absl::MutexLock lock(&mu_);
  if (closing_ || info_.state != ModelState::kReady || lane < 0 || lane >= replicas_) {
    return false;
  }
  Lane& l = lanes_[lane];
  if (!l.ready || l.generation != generation) return false;
  l.ready = false;
  if (ReadyLanes() == 0) {
    info_.state = ModelState::kUnavailable;
    info_.reason = why;
    FailBroken(why, lane, link_only);
    return true;
  }
  // The others carry on; what was in this lane runs again there, once.
  std::vector<uint64_t> lost_twice;
  for (auto& [id, p] : pending_) {
    bool handed_back = false;
    for (size_t m = 0; m < p->outputs.size(); ++m) {
      if (!p->Out(m, lane)) continue;
      const bool strike = !link_only || p->LinkStrike(m);
      if (strike && p->LastChance(m)) {
        lost_twice.push_back(id);
        break;
      }
      if (strike) ++p->lost[m];
      p->lane[m] = -1;
      p->to_send.push_back(static_cast<int>(m));
      handed_back = true;
    }
    if (handed_back) p->wake.SignalAll();
  }
  for (uint64_t id : lost_twice) Finish(id, LostTwice(why));
  return true;
}

std::vector<int> Deployment::BrokenLanes() const {
  absl::MutexLock lock(&mu_);
  std::vector<int> out;
  for (int r = 0; r < replicas_; ++r) {
    if (!lanes_[r].ready) out.push_back(r);
  }
  return out;
}

bool Deployment::Break(const std::string& why) {
  absl::MutexLock lock(&mu_);
  if (closing_ || info_.state != ModelState::kReady) return false;
  info_.state = ModelState::kUnavailable;
  info_.reason = why;
  for (Lane& l : lanes_) l.ready = false;
  FailBroken(why, /*lane=*/-1);
  return true;
}

void Deployment::Retire(const std::string& why) {
  absl::MutexLock lock(&mu_);
  if (retired_.empty()) retired_ = why;
}

std::shared_ptr<void> Deployment::Hold(std::shared_ptr<Deployment> d) {
  {
    absl::MutexLock lock(&d->mu_);
    ++d->holds_;
  }
  return std::shared_ptr<void>(nullptr, [d](void*) {
    absl::MutexLock lock(&d->mu_);
    --d->holds_;
  });
}

bool Deployment::Retiring() const {
  absl::MutexLock lock(&mu_);
  return !retired_.empty();
}

bool Deployment::LeftService() const {
  absl::MutexLock lock(&mu_);
  return !retired_.empty() || closing_;
}

bool Deployment::Drained() const {
  absl::MutexLock lock(&mu_);
  return pending_.empty() && holds_ == 0;
}

int Deployment::InFlight() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(pending_.size());
}

void Deployment::UnloadStages() {
  std::vector<std::pair<std::string, StageKey>> stages;
  {
    absl::MutexLock lock(&mu_);
    for (const Lane& l : lanes_) {
      for (size_t i = 0; i < l.specs.size(); ++i) stages.emplace_back(l.servers[i], l.specs[i].key());
    }
  }
  const absl::Time deadline = absl::Now() + kUnloadTimeout;
  for (const auto& [address, key] : stages) {
    config_.stages->UnloadStage(address, key, deadline).IgnoreError();
  }
}

void Deployment::Close(const std::string& why, bool unload) {
  absl::MutexLock close_lock(&close_mu_);
  if (closed_) return;
  closed_ = true;
  std::vector<std::shared_ptr<FrameSink>> inputs;
  std::vector<std::unique_ptr<StageClient::Subscription>> results;
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
    if (info_.state == ModelState::kReady) info_.state = ModelState::kUnavailable;
    if (info_.reason.empty()) info_.reason = why;
    for (Lane& l : lanes_) {
      l.ready = false;
      if (l.input) inputs.push_back(l.input);
      results.push_back(std::move(l.results));
    }
    FailAll(absl::UnavailableError(why));
  }
  for (const auto& input : inputs) input->Close();
  results.clear();  // ends the subscriptions
  if (unload) UnloadStages();
}

}  // namespace pipeserve
