#include "server/coordinator/core.h"

#include <algorithm>
#include <cmath>
#include <iostream>
#include <set>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "common/model_name.h"
#include "common/status_macros.h"
#include "partitioner/partition.h"
#include "runtime/model_file.h"
#include "server/coordinator/kv_budget.h"
#include "server/text/tokenizer.h"

namespace pipeserve {
namespace {

// An upload that holds one of the coordinator's upload slots while it
// lives and refuses data past the size limit.
class LimitedUpload : public PendingUpload {
 public:
  LimitedUpload(std::unique_ptr<PendingUpload> inner, std::string name, uint64_t limit,
                std::atomic<int>* slots)
      : inner_(std::move(inner)), name_(std::move(name)), limit_(limit), slots_(slots) {}
  ~LimitedUpload() override { --*slots_; }

  absl::Status Append(absl::string_view data) override {
    if (data.size() > limit_ || inner_->bytes() > limit_ - data.size()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "upload of \"", name_, "\" is larger than this coordinator accepts (", limit_,
          " bytes, --max_upload_mb); nothing was stored"));
    }
    return inner_->Append(data);
  }
  uint64_t bytes() const override { return inner_->bytes(); }
  uint32_t crc32() const override { return inner_->crc32(); }
  const std::string& path() const override { return inner_->path(); }
  absl::Status Commit(const UploadOptions& options) override { return inner_->Commit(options); }
  int64_t version() const override { return inner_->version(); }

 private:
  const std::unique_ptr<PendingUpload> inner_;
  const std::string name_;
  const uint64_t limit_;
  std::atomic<int>* const slots_;
};

}  // namespace

Coordinator::Coordinator(CoordinatorOptions options, std::unique_ptr<ModelStore> store,
                         std::unique_ptr<Launcher> launcher, StageClient* stages)
    : options_(options),
      store_(std::move(store)),
      launcher_(std::move(launcher)),
      stages_(stages),
      admission_(options_.max_queued_requests) {
  config_.stages = stages_;
  config_.default_microbatches = options_.default_microbatches;
  config_.default_replicas = options_.default_replicas;
  config_.batching = options_.batching;
  config_.max_microbatches = options_.max_microbatches;
  config_.default_timeout = options_.default_timeout;
  config_.max_request_rows = options_.max_request_rows;
  config_.load_timeout = options_.load_timeout;
  config_.on_broken = [this](const std::string& model) { ScheduleRepair(model); };
  Remember(launcher_->ExistingServers());
  monitor_thread_ = std::thread([this] { MonitorLoop(); });
  repair_thread_ = std::thread([this] { RepairLoop(); });
}

Coordinator::~Coordinator() {
  shutting_down_ = true;
  {
    absl::MutexLock lock(&repair_mu_);
    stopping_ = true;
  }
  monitor_thread_.join();
  repair_thread_.join();
  std::map<std::string, std::shared_ptr<Deployment>> models;
  {
    absl::MutexLock lock(&mu_);
    models.swap(models_);
  }
  for (auto& [name, d] : models) {
    d->Close("the coordinator is shutting down", /*unload=*/!options_.keep_stages_on_exit);
  }
  CloseDrained(/*all=*/true);
}

Coordinator::ModelLock::ModelLock(Coordinator* c, const std::string& name, bool wait)
    : c_(c), name_(name) {
  {
    absl::MutexLock lock(&c_->locks_mu_);
    std::unique_ptr<LockEntry>& e = c_->locks_[name_];
    if (e == nullptr) e = std::make_unique<LockEntry>();
    ++e->users;
    mu_ = &e->mu;
  }
  if (wait) {
    mu_->Lock();
    held_ = true;
  } else {
    held_ = mu_->TryLock();
  }
}

Coordinator::ModelLock::~ModelLock() {
  if (held_) mu_->Unlock();
  absl::MutexLock lock(&c_->locks_mu_);
  auto it = c_->locks_.find(name_);
  if (--it->second->users == 0) c_->locks_.erase(it);
}

bool Coordinator::Loading(const std::string& name) {
  return !store_listed_ || to_load_.count(name) > 0;
}

absl::Status Coordinator::CheckLoaded(const std::string& name) {
  absl::MutexLock lock(&mu_);
  if (!Loading(name)) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "the coordinator is still loading its stored models (\"", name.substr(0, 128),
      "\" among them); try again shortly"));
}

absl::StatusOr<absl::optional<StoredModel>> Coordinator::Stored(const std::string& name) {
  ASSIGN_OR_RETURN(std::vector<StoredModel> stored, store_->List());
  for (StoredModel& m : stored) {
    if (m.name == name) return absl::optional<StoredModel>(std::move(m));
  }
  return absl::optional<StoredModel>();
}

void Coordinator::LoadStoredModels() {
  // What the servers hold already: a predecessor's stages.
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  std::vector<HeldStage> held;
  for (const std::string& address : launcher_->ExistingServers()) {
    absl::StatusOr<std::vector<StageKey>> keys = stages_->ListStages(address, deadline);
    if (!keys.ok()) continue;  // not up yet: then it holds nothing either
    for (const StageKey& key : *keys) {
      absl::StatusOr<StageStatsResponse> stats = stages_->GetStageStats(address, key, deadline);
      held.push_back({address, key, stats.ok() ? stats->fingerprint() : 0, false});
    }
  }
  absl::StatusOr<std::vector<StoredModel>> stored = store_->List();
  {
    absl::MutexLock lock(&mu_);
    if (stored.ok()) {
      for (const StoredModel& m : *stored) to_load_.insert(m.name);
    }
    store_listed_ = true;
  }
  std::vector<StoredModel> to_deploy;
  if (stored.ok()) {
    for (const StoredModel& m : *stored) {
      std::shared_ptr<Deployment> adopted;
      if (!held.empty()) {
        ModelLock model_lock(this, m.name);
        adopted = TryAdopt(m, held);
      }
      if (adopted == nullptr) {
        to_deploy.push_back(m);
        continue;
      }
      ++adopted_models_;
      adopted->set_version(m.version);
      absl::MutexLock lock(&mu_);
      models_[m.name] = adopted;
      to_load_.erase(m.name);
    }
  }
  // The rest would hold their memory for good: nothing else knows them.
  for (const HeldStage& h : held) {
    if (!h.adopted) stages_->UnloadStage(h.address, h.key, deadline).IgnoreError();
  }
  for (const StoredModel& m : to_deploy) DeployStored(m);
  absl::MutexLock lock(&mu_);
  loaded_ = true;
}

void Coordinator::DeployStored(const StoredModel& m) {
  // No upload or unload of this name runs meanwhile: they wait for the
  // stored models to load (CheckLoaded).
  ModelLock model_lock(this, m.name);
  absl::StatusOr<std::shared_ptr<Deployment>> d = Deploy(m.name, m.path, m.options, m.bytes);
  absl::MutexLock lock(&mu_);
  to_load_.erase(m.name);
  if (d.ok()) {
    (*d)->set_version(m.version);
    models_[m.name] = *d;
    failed_.erase(m.name);
    return;
  }
  ModelInfo& info = failed_[m.name];
  info.name = m.name;
  info.state = ModelState::kUnavailable;
  info.reason = std::string(d.status().message());
  info.bytes = m.bytes;
  // Stage servers may come up later (a Kubernetes rollout): keep trying.
  ScheduleRepair(m.name);
}

std::shared_ptr<Deployment> Coordinator::TryAdopt(const StoredModel& m,
                                                  std::vector<HeldStage>& held) {
  absl::StatusOr<std::unique_ptr<ModelFileReader>> file = ModelFileReader::Open(m.path);
  if (!file.ok()) return nullptr;
  absl::StatusOr<Plan> plan = PlanFor(m.name, **file, m.options);
  if (!plan.ok()) return nullptr;
  DeploymentConfig config = config_;
  absl::StatusOr<int> replicas = Deployment::Replicas(config, m.options);
  if (!replicas.ok()) return nullptr;
  const int n = plan->stages_size();
  absl::StatusOr<std::vector<std::string>> servers = ServersFor(n * *replicas);
  if (!servers.ok()) return nullptr;
  config.threads_per_stage = ThreadsPerStage(*plan);
  const std::vector<StageSpec> want = Deployment::Specs(config, m.name, *plan, m.options, *servers, *replicas);
  // The held stage that is stage `i % n` of replica `i / n` of deployment
  // `id`, as it would be loaded now.
  auto find = [&](size_t i, uint64_t id) -> HeldStage* {
    for (HeldStage& h : held) {
      if (!h.adopted && h.address == (*servers)[i] && h.key.model() == m.name &&
          h.key.stage() == static_cast<int>(i) % n && h.key.replica() == static_cast<int>(i) / n &&
          h.key.deployment() == id && h.fingerprint == want[i].fingerprint()) {
        return &h;
      }
    }
    return nullptr;
  };
  for (const HeldStage& first : held) {
    if (first.adopted || first.key.model() != m.name || first.key.stage() != 0 ||
        first.key.replica() != 0) {
      continue;
    }
    const uint64_t id = first.key.deployment();
    std::vector<HeldStage*> parts;
    for (size_t i = 0; i < want.size(); ++i) {
      HeldStage* h = find(i, id);
      if (h == nullptr) break;
      parts.push_back(h);
    }
    if (parts.size() != want.size()) continue;
    absl::StatusOr<std::shared_ptr<Deployment>> d =
        Deployment::Adopt(config, m.name, *plan, m.options, *servers, m.bytes, id);
    if (!d.ok()) continue;
    for (HeldStage* h : parts) h->adopted = true;
    return *d;
  }
  return nullptr;
}

absl::StatusOr<Plan> Coordinator::PlanFor(const std::string& name, const ModelFileReader& file,
                                          const UploadOptions& options, NodeProfile* measured) {
  ASSIGN_OR_RETURN(Plan plan, CutFor(name, file, options, measured));
  RETURN_IF_ERROR(SizeKvCache(file.graph(), options_.kv_cache_bytes, &plan));
  RETURN_IF_ERROR(AttachTokenizer(name, options.tokenizer(), &plan));
  return plan;
}

absl::Status AttachTokenizer(const std::string& name, const TokenizerSpec& spec, Plan* plan) {
  if (spec.ByteSizeLong() == 0) return absl::OkStatus();
  if (plan->generation().tokens().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a tokenizer is for models exported for generation (export(generation=True)); \"",
        name, "\" was not"));
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> t = MakeTokenizer(spec);
  if (!t.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: ", t.status().message()));
  }
  const int64_t vocab = plan->generation().vocab();
  if (vocab > 0 && (*t)->size() > vocab) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer: it has ", (*t)->size(), " tokens, more than the vocabulary of \"", name,
        "\" (", vocab, "): it is not this model's tokenizer"));
  }
  *plan->mutable_tokenizer() = spec;
  return absl::OkStatus();
}

namespace {

// Node times sent with an upload: finite seconds >= 0, for rows >= 1.
absl::Status CheckProfile(const NodeProfile& profile) {
  for (double t : profile.seconds()) {
    if (!(t >= 0) || !std::isfinite(t)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "profile: node times must be finite seconds >= 0, got ", t));
    }
  }
  if (profile.rows() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile: rows must be >= 1, got ", profile.rows()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Coordinator::MeasureProfile(const ModelFileReader& file, const UploadOptions& options,
                                         Plan* plan, NodeProfile* profile) const {
  const bool must = options.balance() == UploadOptions::BALANCE_MEASURED;
  if (options_.calibration_backend == nullptr) {
    if (!must) return absl::OkStatus();
    return absl::FailedPreconditionError(
        "balance MEASURED: this coordinator has no calibration backend "
        "(--calibration_device is empty)");
  }
  ParamReader read = [&file](const TensorInfo& p) -> absl::StatusOr<Tensor> {
    ASSIGN_OR_RETURN(Tensor t, Tensor::TryEmpty({p.shape().begin(), p.shape().end()}, p.dtype()));
    RETURN_IF_ERROR(file.Read(p.fqn(), 0, t.byte_size(), reinterpret_cast<char*>(t.data())));
    return t;
  };
  // Under load a stage computes the queued microbatches of a request in
  // one run, up to the model's max_batch_rows (Deployment::MergeRows):
  // that run's cost per microbatch is what bounds its throughput.
  CalibrationOptions calibration = options_.calibration;
  if (absl::StatusOr<BatcherOptions> batching = Deployment::Batching(config_, options, 1);
      batching.ok()) {
    calibration.joined_rows = Deployment::MergeRows(*plan, *batching);
  }
  absl::StatusOr<Calibration> c =
      Calibrate(file.graph(), read, *options_.calibration_backend, calibration);
  if (!c.ok()) {
    if (must) return c.status();
    plan->set_balance(absl::StrCat(plan->balance(), "; measuring failed: ", c.status().message()));
    return absl::OkStatus();
  }
  *profile->mutable_seconds() = {c->node_seconds.begin(), c->node_seconds.end()};
  profile->set_rows(c->rows);
  profile->set_source(c->Describe());
  return absl::OkStatus();
}

absl::StatusOr<Plan> Coordinator::CutFor(const std::string& name, const ModelFileReader& file,
                                         const UploadOptions& options, NodeProfile* measured) {
  PartitionOptions popts;
  popts.num_stages = options.num_stages();
  if (popts.num_stages > options_.max_stages) {
    return absl::InvalidArgumentError(absl::StrCat("num_stages ", popts.num_stages,
                                                   " is more than this coordinator serves (",
                                                   options_.max_stages, ", --max_stages)"));
  }
  for (const SplitSpecEntry& e : options.split_spec()) popts.split_spec[e.module()] = e.point();
  ASSIGN_OR_RETURN(Plan plan, Partition(file.graph(), popts));
  const int n = plan.stages_size();
  if (n > options_.max_stages) {
    return absl::InvalidArgumentError(absl::StrCat("model \"", name, "\" cuts into ", n,
                                                   " stages; this coordinator serves at most ",
                                                   options_.max_stages, " (--max_stages)"));
  }
  const UploadOptions::Balance balance = options.balance();
  if (plan.balance() != kEstimatedBalance || balance == UploadOptions::BALANCE_ESTIMATED) {
    return plan;  // the model's own cuts, one stage, or the estimate asked for
  }
  // Automatic cuts: balance them by time.
  const double gbps = options.link_gb_per_s();
  if (!(gbps >= 0) || !std::isfinite(gbps)) {
    return absl::InvalidArgumentError(
        absl::StrCat("link_gb_per_s must be a finite number >= 0, got ", gbps));
  }
  popts.link_bytes_per_second = gbps > 0 ? gbps * 1e9 : options_.link_bytes_per_second;
  NodeProfile profile = options.profile();
  if (profile.seconds().empty()) {
    RETURN_IF_ERROR(MeasureProfile(file, options, &plan, &profile));
    if (profile.seconds().empty()) return plan;  // the estimate's cuts
    if (measured != nullptr) *measured = profile;
  }
  RETURN_IF_ERROR(CheckProfile(profile));
  popts.node_seconds = {profile.seconds().begin(), profile.seconds().end()};
  popts.cost_rows = profile.rows();
  popts.cost_source = profile.source().empty() ? "profile sent with the upload" : profile.source();
  absl::StatusOr<Plan> timed = Partition(file.graph(), popts);
  if (!timed.ok()) {
    return absl::Status(timed.status().code(),
                        absl::StrCat("profile: ", timed.status().message()));
  }
  return timed;
}

bool Coordinator::Serving() {
  std::vector<std::shared_ptr<Deployment>> deployments;
  {
    absl::MutexLock lock(&mu_);
    if (!loaded_) return false;
    if (models_.empty() && failed_.empty()) return true;
    for (auto& [name, d] : models_) deployments.push_back(d);
  }
  for (const auto& d : deployments) {
    if (d->Info().state == ModelState::kReady) return true;
  }
  return false;
}

absl::StatusOr<std::unique_ptr<PendingUpload>> Coordinator::StartUpload(const std::string& name) {
  RETURN_IF_ERROR(ValidModelName(name));
  RETURN_IF_ERROR(CheckLoaded(name));
  int now = uploads_in_progress_.load();
  do {
    if (now >= options_.max_concurrent_uploads) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the coordinator is taking ", options_.max_concurrent_uploads,
          " uploads already (--max_concurrent_uploads); try again when one finishes"));
    }
  } while (!uploads_in_progress_.compare_exchange_weak(now, now + 1));
  absl::StatusOr<std::unique_ptr<PendingUpload>> upload = store_->StartUpload(name);
  if (!upload.ok()) {
    --uploads_in_progress_;
    return upload.status();
  }
  return std::unique_ptr<PendingUpload>(new LimitedUpload(
      *std::move(upload), name, options_.max_upload_bytes, &uploads_in_progress_));
}

absl::StatusOr<UploadResponse> Coordinator::FinishUpload(const std::string& name,
                                                         const UploadOptions& options,
                                                         std::unique_ptr<PendingUpload> upload,
                                                         uint64_t total_bytes,
                                                         uint32_t crc32) {
  if (upload->bytes() != total_bytes) {
    return absl::DataLossError(absl::StrCat("upload of \"", name, "\" is truncated: received ",
                                            upload->bytes(), " of ", total_bytes, " bytes"));
  }
  if (upload->crc32() != crc32) {
    return absl::DataLossError(absl::StrCat("upload of \"", name,
                                            "\" is corrupt: CRC-32 of the received bytes is ",
                                            upload->crc32(), ", the client sent ", crc32));
  }
  if (options.microbatches() < 0 || options.num_stages() < 0 || options.replicas() < 0) {
    return absl::InvalidArgumentError("microbatches, num_stages and replicas must be >= 0");
  }
  RETURN_IF_ERROR(CheckLoaded(name));
  ModelLock model_lock(this, name);
  NodeProfile measured;
  absl::StatusOr<std::shared_ptr<Deployment>> deployed =
      Deploy(name, upload->path(), options, upload->bytes(), &measured);
  if (!deployed.ok()) {
    if (!deployed.status().GetPayload(kWaitingForServers).has_value() ||
        Current(name) != nullptr) {
      return deployed.status();
    }
    UploadOptions stored = options;
    if (!measured.seconds().empty()) *stored.mutable_profile() = measured;
    return StoreWaiting(name, stored, std::move(upload), deployed.status());
  }
  std::shared_ptr<Deployment> d = *std::move(deployed);
  // Keep what was measured with the model: a restart or a redeployment
  // then cuts exactly as now (and can adopt the stages it finds loaded).
  UploadOptions stored = options;
  if (!measured.seconds().empty()) *stored.mutable_profile() = measured;
  absl::Status committed = upload->Commit(stored);
  if (!committed.ok()) {
    d->Close("the upload could not be stored");
    return committed;
  }
  d->set_version(upload->version());
  Publish(name, d);
  UploadResponse resp;
  resp.set_name(name);
  resp.set_bytes(total_bytes);
  resp.set_num_stages(d->plan().stages_size());
  return resp;
}

absl::StatusOr<UploadResponse> Coordinator::StoreWaiting(const std::string& name,
                                                         const UploadOptions& options,
                                                         std::unique_ptr<PendingUpload> upload,
                                                         const absl::Status& why) {
  RETURN_IF_ERROR(upload->Commit(options));
  {
    absl::MutexLock lock(&mu_);
    ModelInfo& info = failed_[name];
    info = ModelInfo();
    info.name = name;
    info.state = ModelState::kUnavailable;
    info.reason = std::string(why.message());
    info.bytes = upload->bytes();
    info.version = upload->version();
  }
  {
    absl::MutexLock lock(&repair_mu_);
    repair_attempts_.erase(name);
    repair_why_.erase(name);
  }
  ScheduleRepair(name);
  UploadResponse resp;
  resp.set_name(name);
  resp.set_bytes(upload->bytes());
  resp.set_waiting(std::string(why.message()));
  return resp;
}

void Coordinator::Publish(const std::string& name, const std::shared_ptr<Deployment>& d) {
  std::shared_ptr<Deployment> old;
  {
    absl::MutexLock lock(&mu_);
    old = std::exchange(models_[name], d);
    failed_.erase(name);
  }
  {
    absl::MutexLock lock(&repair_mu_);
    to_repair_.erase(name);
    repair_attempts_.erase(name);
    repair_why_.erase(name);
  }
  // New requests go to `d` from here on; the old version finishes the
  // requests it has in flight, then its stages go.
  if (old == nullptr) return;
  old->Retire(absl::StrCat("model \"", name, "\" was replaced by a new upload"));
  Retired(name, *old, /*unloaded=*/false);
  if (old->Drained()) {
    CloseRetired(*old, "has nothing in flight");
  } else {
    absl::MutexLock lock(&mu_);
    retired_.emplace_back(old, absl::Now() + options_.drain_timeout);
  }
}

absl::Status Coordinator::Unload(const std::string& name) {
  RETURN_IF_ERROR(CheckLoaded(name));
  ModelLock model_lock(this, name);
  std::shared_ptr<Deployment> d;
  {
    absl::MutexLock lock(&mu_);
    bool known = models_.count(name) || failed_.count(name);
    if (!known) return absl::NotFoundError(absl::StrCat("model \"", name, "\" is not known"));
  }
  RETURN_IF_ERROR(store_->Remove(name));
  {
    absl::MutexLock lock(&mu_);
    auto it = models_.find(name);
    if (it != models_.end()) {
      d = std::move(it->second);
      models_.erase(it);
    }
    failed_.erase(name);
  }
  {
    absl::MutexLock lock(&repair_mu_);
    to_repair_.erase(name);
    repair_attempts_.erase(name);
    repair_why_.erase(name);
  }
  if (d) {
    d->Retire(absl::StrCat("model \"", name, "\" was unloaded"));
    Retired(name, *d, /*unloaded=*/true);
    d->Close(absl::StrCat("model \"", name, "\" was unloaded"));
  }
  return absl::OkStatus();
}

void Coordinator::SetRetiredListener(RetiredListener listener) {
  absl::MutexLock lock(&listener_mu_);
  retired_listener_ = std::move(listener);
}

void Coordinator::Retired(const std::string& name, const Deployment& d, bool unloaded) {
  // Called under the listener lock: SetRetiredListener(nullptr) returns only
  // once no call is running.
  absl::MutexLock lock(&listener_mu_);
  if (retired_listener_) retired_listener_(name, d.version(), unloaded);
}

absl::StatusOr<std::shared_ptr<Deployment>> Coordinator::Deploy(const std::string& name,
                                                                const std::string& path,
                                                                const UploadOptions& options,
                                                                uint64_t bytes,
                                                                NodeProfile* measured) {
  ASSIGN_OR_RETURN(std::unique_ptr<ModelFileReader> file, ModelFileReader::Open(path));
  ASSIGN_OR_RETURN(Plan plan, PlanFor(name, *file, options, measured));
  DeploymentConfig config = config_;
  ASSIGN_OR_RETURN(const int replicas, Deployment::Replicas(config, options));
  ASSIGN_OR_RETURN(std::vector<std::string> servers, ServersFor(plan.stages_size() * replicas));
  config.threads_per_stage = ThreadsPerStage(plan);
  return Deployment::Create(config, name, *file, plan, options, std::move(servers), bytes);
}

int Coordinator::ThreadsPerStage(const Plan& plan) const {
  return launcher_->ThreadsPerStage(plan.has_generation() && launcher_->StagesShareCores());
}

void Coordinator::ScheduleRepair(const std::string& name) {
  absl::MutexLock lock(&repair_mu_);
  int attempt = repair_attempts_[name]++;
  // 0.2 s, 0.4 s, ... up to 10 s between attempts.
  absl::Duration wait = std::min(absl::Milliseconds(200) * (1 << std::min(attempt, 6)),
                                 absl::Seconds(10));
  to_repair_[name] = absl::Now() + wait;
}

void Coordinator::Repair(const std::string& name) {
  // Under the model's lock, with the store read now: an unload or upload
  // in between cannot leave this repair acting on what it replaced. The
  // one repair thread never waits for a lock (an upload of this model may
  // hold it for minutes, and other models' repairs are due): it comes back.
  ModelLock model_lock(this, name, /*wait=*/false);
  if (!model_lock.held()) {
    RepairSoon(name);
    return;
  }
  std::shared_ptr<Deployment> broken = Current(name);
  const bool serving = broken != nullptr && broken->Info().state == ModelState::kReady;
  if (serving && broken->BrokenLanes().empty()) return;
  absl::StatusOr<absl::optional<StoredModel>> stored = Stored(name);
  if (!stored.ok()) {
    ScheduleRepair(name);  // the store could not be read: try again later
    return;
  }
  if (!stored->has_value()) {  // unloaded meanwhile: nothing to repair
    absl::MutexLock lock(&mu_);
    failed_.erase(name);
    return;
  }
  const StoredModel& m = **stored;
  if (serving) {
    // Some lanes still serve: reload only the broken ones beside them.
    if (absl::Status s = RepairLanes(m, *broken); !s.ok()) {
      RepairFailed(name, s);
      ScheduleRepair(name);
      return;
    }
    absl::MutexLock lock(&repair_mu_);
    repair_attempts_.erase(name);
    repair_why_.erase(name);
    return;
  }
  absl::StatusOr<std::shared_ptr<Deployment>> d = Deploy(m.name, m.path, m.options, m.bytes);
  if (!d.ok()) {
    RedeployFailed(m, broken == nullptr, d.status());
    return;
  }
  (*d)->set_version(m.version);
  {
    absl::MutexLock lock(&mu_);
    models_[name] = *d;
    failed_.erase(name);
  }
  if (broken) broken->Close("replaced by a redeployment");
  absl::MutexLock lock(&repair_mu_);
  repair_attempts_.erase(name);
  repair_why_.erase(name);
}

void Coordinator::RepairSoon(const std::string& name) {
  absl::MutexLock lock(&repair_mu_);
  const absl::Time soon = absl::Now() + absl::Milliseconds(100);
  auto [it, added] = to_repair_.emplace(name, soon);
  if (!added) it->second = std::min(it->second, soon);
}

void Coordinator::RedeployFailed(const StoredModel& m, bool listed_failed, const absl::Status& why) {
  absl::MutexLock lock(&mu_);
  if (listed_failed) {  // nothing serves it: list why
    ModelInfo& info = failed_[m.name];
    info.name = m.name;
    info.state = ModelState::kUnavailable;
    info.reason = absl::StrCat("redeploying failed: ", why.message());
    info.bytes = m.bytes;
    info.version = m.version;
  }
  RepairFailed(m.name, why);
  ScheduleRepair(m.name);
}

void Coordinator::RepairFailed(const std::string& name, const absl::Status& why) {
  absl::MutexLock lock(&repair_mu_);
  repair_why_[name] = std::string(why.message());
}

ModelInfo Coordinator::WithRepairReason(ModelInfo info) {
  if (info.state == ModelState::kReady && info.ready_replicas >= info.replicas) return info;
  absl::MutexLock lock(&repair_mu_);
  auto it = repair_why_.find(info.name);
  if (it != repair_why_.end() && info.reason.find(it->second) == std::string::npos) {
    info.reason = info.reason.empty() ? absl::StrCat("repairing: ", it->second)
                                      : absl::StrCat(info.reason, "; repairing: ", it->second);
  }
  return info;
}

absl::Status Coordinator::RepairLanes(const StoredModel& m, Deployment& d) {
  ASSIGN_OR_RETURN(std::unique_ptr<ModelFileReader> file, ModelFileReader::Open(m.path));
  const int n = d.plan().stages_size();
  // The launcher's servers now: it replaces servers that died.
  ASSIGN_OR_RETURN(std::vector<std::string> servers, ServersFor(n * d.replicas()));
  const std::vector<int> broken = d.BrokenLanes();
  ASSIGN_OR_RETURN(std::vector<std::string> free,
                   ServersForBrokenLanes(d.Info(), broken, n, servers));
  const int threads = ThreadsPerStage(d.plan());
  for (size_t k = 0; k < broken.size(); ++k) {
    std::vector<std::string> lane_servers(free.begin() + k * n, free.begin() + (k + 1) * n);
    RETURN_IF_ERROR(d.ReloadLane(broken[k], *file, lane_servers, threads));
    ++reloaded_lanes_;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ServersForBrokenLanes(
    const ModelInfo& info, const std::vector<int>& broken, int n,
    const std::vector<std::string>& servers) {
  std::vector<std::string> out;
  const std::set<std::string> distinct(servers.begin(), servers.end());
  if (distinct.size() != servers.size()) {  // shared servers (the static launcher's wrap)
    for (int lane : broken) out.insert(out.end(), servers.begin() + lane * n,
                                       servers.begin() + (lane + 1) * n);
    return out;
  }
  // The healthy lanes keep theirs; the broken ones take the rest in order.
  std::set<std::string> busy;
  for (int lane = 0; lane * n < static_cast<int>(info.servers.size()); ++lane) {
    if (std::find(broken.begin(), broken.end(), lane) != broken.end()) continue;
    for (int s = lane * n; s < (lane + 1) * n && s < static_cast<int>(info.servers.size()); ++s) {
      busy.insert(info.servers[s]);
    }
  }
  for (const std::string& s : servers) {
    if (busy.count(s) == 0 && out.size() < broken.size() * n) out.push_back(s);
  }
  if (out.size() < broken.size() * n) {
    return absl::UnavailableError(absl::StrCat(
        "waiting for ", broken.size() * n, " stage servers no serving lane uses (", out.size(),
        " now)"));
  }
  return out;
}

void Coordinator::RepairLoop() {
  while (true) {
    std::string name;
    {
      absl::MutexLock lock(&repair_mu_);
      auto due = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(repair_mu_) {
        if (stopping_) return true;
        for (auto& [n, t] : to_repair_) {
          if (t <= absl::Now()) return true;
        }
        return false;
      };
      repair_mu_.AwaitWithTimeout(absl::Condition(&due), absl::Milliseconds(100));
      if (stopping_) return;
      for (auto& [n, t] : to_repair_) {
        if (t <= absl::Now()) {
          name = n;
          break;
        }
      }
      if (name.empty()) continue;
      to_repair_.erase(name);
    }
    Repair(name);
  }
}

void Coordinator::MonitorLoop() {
  while (true) {
    {
      absl::MutexLock lock(&repair_mu_);
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(repair_mu_) { return stopping_; };
      if (repair_mu_.AwaitWithTimeout(absl::Condition(&stop), options_.health_interval)) return;
    }
    CloseDrained(/*all=*/false);
    std::vector<std::shared_ptr<Deployment>> deployments;
    {
      absl::MutexLock lock(&mu_);
      for (auto& [name, d] : models_) deployments.push_back(d);
    }
    for (const std::shared_ptr<Deployment>& d : deployments) {
      if (d->Info().state != ModelState::kReady) continue;
      // A lane that fails is taken out at once (its work moves to the
      // others); the last one to fail breaks the deployment.
      for (const Deployment::LaneHealth& h :
           d->CheckLanes(std::max(options_.health_interval, absl::Seconds(1)))) {
        if (!h.status.ok() &&
            d->BreakLane(h.lane, h.generation, std::string(h.status.message()), h.link_only)) {
          ScheduleRepair(d->name());
        }
      }
    }
  }
}

std::shared_ptr<Deployment> Coordinator::Current(const std::string& name) {
  absl::MutexLock lock(&mu_);
  auto it = models_.find(name);
  return it == models_.end() ? nullptr : it->second;
}

std::vector<ModelInfo> Coordinator::ListModels() {
  std::vector<std::shared_ptr<Deployment>> deployments;
  std::vector<ModelInfo> out;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [name, d] : models_) deployments.push_back(d);
    for (auto& [name, info] : failed_) out.push_back(info);
  }
  for (auto& d : deployments) out.push_back(WithRepairReason(d->Info()));
  std::sort(out.begin(), out.end(),
            [](const ModelInfo& a, const ModelInfo& b) { return a.name < b.name; });
  return out;
}

absl::StatusOr<std::vector<std::string>> Coordinator::ServersFor(int n) {
  absl::StatusOr<std::vector<std::string>> found = launcher_->ServersFor(n);
  if (!found.ok()) {
    absl::Status s = found.status();
    // Too few now, more later: FinishUpload stores the model to wait.
    if (s.code() == absl::StatusCode::kUnavailable && launcher_->ServersComeLater()) {
      s.SetPayload(kWaitingForServers, absl::Cord("1"));
    }
    return s;
  }
  std::vector<std::string> servers = *std::move(found);
  Remember(servers);
  return servers;
}

void Coordinator::Remember(const std::vector<std::string>& servers) {
  absl::MutexLock lock(&addresses_mu_);
  bool added = false;
  for (const std::string& s : servers) {
    // Bounded: a local launcher's replacements get new ports forever.
    if (known_addresses_.size() >= kMaxKnownAddresses) break;
    added = known_addresses_.insert(s).second || added;
  }
  if (!added) return;
  addresses_ = std::make_shared<const std::vector<std::string>>(known_addresses_.begin(),
                                                                known_addresses_.end());
}

std::shared_ptr<const std::vector<std::string>> Coordinator::StageServerAddresses() {
  absl::MutexLock lock(&addresses_mu_);
  return addresses_;
}

bool Coordinator::Knows(const std::string& name) {
  if (Current(name) != nullptr) return true;
  absl::MutexLock lock(&mu_);
  return failed_.count(name) > 0;
}

absl::StatusOr<ModelInfo> Coordinator::GetModel(const std::string& name) {
  if (auto d = Current(name)) return WithRepairReason(d->Info());
  absl::MutexLock lock(&mu_);
  auto it = failed_.find(name);
  if (it != failed_.end()) return it->second;
  if (Loading(name)) {
    return absl::UnavailableError(absl::StrCat(
        "model \"", name, "\" is not loaded: the coordinator is still loading its stored "
        "models; try again shortly"));
  }
  return absl::NotFoundError(absl::StrCat("model \"", name, "\" is not known"));
}

std::vector<double> Coordinator::MeasuredComputeSeconds(const std::string& name) {
  std::shared_ptr<Deployment> d = Current(name);
  if (d == nullptr) return {};
  return d->MeasuredComputeSeconds(absl::Seconds(2));
}

absl::StatusOr<std::shared_ptr<Deployment>> Coordinator::Find(const std::string& name) {
  std::shared_ptr<Deployment> d = Current(name);
  if (d == nullptr) {
    ASSIGN_OR_RETURN(ModelInfo info, GetModel(name));
    return absl::UnavailableError(absl::StrCat("model \"", name, "\" is ",
                                               ModelStateName(info.state), ": ", info.reason));
  }
  return d;  // READY, or broken and being repaired (InferOn waits for that)
}

void Coordinator::CloseDrained(bool all) {
  std::vector<std::shared_ptr<Deployment>> done;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    auto it = std::partition(retired_.begin(), retired_.end(), [&](const auto& r) {
      return !all && !r.first->Drained() && r.second > now;
    });
    for (auto j = it; j != retired_.end(); ++j) done.push_back(j->first);
    retired_.erase(it, retired_.end());
  }
  for (const auto& d : done) {
    CloseRetired(*d, d->Drained() ? "has drained" : "ran out of time to drain (--drain_timeout_s)");
  }
}

void Coordinator::CloseRetired(Deployment& d, const std::string& how) {
  const std::string why = absl::StrCat("model \"", d.name(), "\" was replaced by a new upload and ", how);
  std::cerr << "coordinator: version " << d.version() << " closed: " << why << "\n";
  d.Close(why);
}

bool Coordinator::WaitIdle(absl::Time deadline) { return admission_.WaitIdle(deadline); }

namespace {

// Whether a request checked against `a`'s plan can run on `b`.
bool SameSignature(const Plan& a, const Plan& b) {
  if (a.inputs_size() != b.inputs_size() || a.outputs_size() != b.outputs_size()) return false;
  for (int i = 0; i < a.inputs_size(); ++i) {
    if (a.inputs(i).SerializeAsString() != b.inputs(i).SerializeAsString()) return false;
  }
  for (int i = 0; i < a.outputs_size(); ++i) {
    if (a.outputs(i).SerializeAsString() != b.outputs(i).SerializeAsString()) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::shared_ptr<Deployment>> Coordinator::AwaitDeployment(
    const std::string& name, const std::shared_ptr<Deployment>& failed, const absl::Status& why,
    absl::Time deadline, absl::Duration backoff, const std::function<bool()>& cancelled,
    int64_t pinned_version) {
  // The first look comes after `backoff`, so a transient failure is not
  // retried in a tight loop; a new deployment ends the wait at once.
  absl::Time not_before = absl::Now() + backoff;
  while (true) {
    if (shutting_down_) return why;
    if (cancelled && cancelled()) return absl::CancelledError("the client cancelled the request");
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "request to \"", name, "\" missed its deadline waiting for the model to serve again "
          "after: ", why.message()));
    }
    std::shared_ptr<Deployment> current;
    bool repairing = false;
    {
      absl::MutexLock lock(&mu_);
      auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        auto it = models_.find(name);
        return it == models_.end() || it->second != failed;
      };
      if (now < not_before) {
        if (mu_.AwaitWithDeadline(absl::Condition(&changed),
                                  std::min({not_before, deadline, now + absl::Milliseconds(20)}))) {
          not_before = now;  // replaced: no need to wait out the backoff
        }
        continue;  // look again (the client may have gone)
      }
      auto it = models_.find(name);
      if (it != models_.end()) current = it->second;
      repairing = failed_.count(name) > 0;
    }
    if (current == nullptr && !repairing) return why;  // unloaded
    if (current != nullptr && current->Info().state == ModelState::kReady) {
      if (pinned_version != 0 && current->version() != pinned_version) {
        return absl::UnavailableError(absl::StrCat(
            why.message(), "; the request named version ", pinned_version, ", and model \"",
            name, "\" is now version ", current->version()));
      }
      if (current != failed && !SameSignature(failed->plan(), current->plan())) {
        return absl::UnavailableError(absl::StrCat(
            why.message(), "; the model now serving under the name takes other inputs or "
                           "outputs, so the request was not run again"));
      }
      return current;
    }
    // Broken and being repaired: look again shortly.
    not_before = absl::Now() + absl::Milliseconds(20);
  }
}

absl::StatusOr<std::vector<Tensor>> Coordinator::InferOn(std::shared_ptr<Deployment> model,
                                                         const std::vector<Tensor>& inputs,
                                                         const RequestOptions& options) {
  ASSIGN_OR_RETURN(Admission admission, Admit(model->name()));
  return InferAdmitted(admission, std::move(model), inputs, options);
}

absl::StatusOr<std::vector<Tensor>> Coordinator::InferAdmitted(const Admission& admission,
                                                               std::shared_ptr<Deployment> model,
                                                               const std::vector<Tensor>& inputs,
                                                               const RequestOptions& options) {
  const std::string name = admission.model();
  RequestOptions attempt = options;  // each attempt's: the deadline is set once for all
  if (attempt.deadline == absl::InfiniteFuture()) {
    attempt.deadline = absl::Now() + options_.default_timeout;
  }
  absl::Duration backoff = absl::Milliseconds(10);
  // Lost once with the stage servers that held it (LostInFlight): the
  // deployment then runs it alone and fails it (LostTwice) if it is lost
  // again, so a request that brings servers down takes down no more.
  // Losses to links between live servers (LostOnLink) count one in
  // kLinkLossesPerStrike.
  bool lost_before = false;
  int link_losses = 0;  // every kLinkLossesPerStrike-th counts as lost in flight
  while (true) {
    if (attempt.trace != nullptr) attempt.trace->clear();  // only the attempt that answers
    absl::StatusOr<std::vector<Tensor>> out = model->Infer(inputs, attempt, lost_before);
    if (out.ok() && attempt.answered_version != nullptr) {
      *attempt.answered_version = model->version();
    }
    if (out.ok() || out.status().code() != absl::StatusCode::kUnavailable) return out;
    if (IsLostOnLink(out.status()) && ++link_losses % kLinkLossesPerStrike == 0) {
      if (lost_before) return LostOnLinksTooOften(link_losses, out.status());
      lost_before = true;
    }
    lost_before = lost_before || IsLostInFlight(out.status());
    ASSIGN_OR_RETURN(model, AwaitDeployment(name, model, out.status(), attempt.deadline, backoff,
                                            attempt.cancelled, attempt.pinned_version));
    backoff = std::min(backoff * 2, absl::Milliseconds(200));
    ++retried_requests_;
  }
}

absl::StatusOr<std::vector<Tensor>> Coordinator::Infer(const std::string& model,
                                                       const std::vector<Tensor>& inputs,
                                                       const RequestOptions& options) {
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> d, Find(model));
  return InferOn(std::move(d), inputs, options);
}

absl::StatusOr<std::vector<Tensor>> Coordinator::Infer(const std::string& model,
                                                       const std::vector<Tensor>& inputs,
                                                       absl::Time deadline,
                                                       const std::function<bool()>& cancelled) {
  RequestOptions options;
  options.deadline = deadline;
  options.cancelled = cancelled;
  return Infer(model, inputs, options);
}

}  // namespace pipeserve
