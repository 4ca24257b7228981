#include "server/coordinator/deployment.h"

#include <algorithm>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/status_macros.h"
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

bool ValidErrorCode(int code) {
  return code > 0 && code <= static_cast<int>(absl::StatusCode::kUnauthenticated);
}

}  // namespace

// One request in flight: what came back per microbatch.
struct Deployment::Pending {
  explicit Pending(std::vector<int64_t> r)
      : rows(std::move(r)), remaining(static_cast<int>(rows.size())), outputs(rows.size()) {}
  const std::vector<int64_t> rows;  // batch rows of each microbatch (-1: none)
  int remaining;
  std::vector<std::vector<Tensor>> outputs;
  absl::Status error;
  absl::Notification done;
};

Deployment::Deployment(const DeploymentConfig& config, ModelInfo info,
                       std::vector<StageSpec> specs)
    : config_(config),
      name_(info.name),
      servers_(info.servers),
      microbatches_(info.microbatches),
      plan_(info.plan),
      specs_(std::move(specs)),
      info_(std::move(info)) {
  for (const ValueSpec& in : plan_->inputs()) input_batched_.push_back(in.batched());
  for (const ValueSpec& out : plan_->outputs()) output_batched_.push_back(out.batched());
  for (const ValueSpec& v : specs_.front().receives()) {
    for (int i = 0; i < plan_->inputs_size(); ++i) {
      if (plan_->inputs(i).name() == v.name()) first_inputs_.push_back(i);
    }
  }
}

Deployment::~Deployment() { Close("the deployment was dropped"); }

absl::StatusOr<std::shared_ptr<Deployment>> Deployment::Make(
    const DeploymentConfig& config, const std::string& name, const Plan& plan,
    const UploadOptions& options, std::vector<std::string> servers, uint64_t bytes,
    uint64_t id) {
  const int n = plan.stages_size();
  if (n < 1 || static_cast<int>(servers.size()) != n) {
    return absl::InternalError(absl::StrCat("a plan of ", n, " stages got ", servers.size(),
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
  info.servers = servers;
  info.deployment = id;
  info.bytes = bytes;
  info.microbatches = microbatches;
  std::vector<StageSpec> specs =
      MakeStageSpecs(plan, name, info.deployment, servers, config.threads_per_stage);
  return std::shared_ptr<Deployment>(new Deployment(config, std::move(info), std::move(specs)));
}

std::vector<StageSpec> Deployment::Specs(const DeploymentConfig& config, const std::string& name,
                                         const Plan& plan,
                                         const std::vector<std::string>& servers) {
  return MakeStageSpecs(plan, name, 0, servers, config.threads_per_stage);
}

absl::StatusOr<std::shared_ptr<Deployment>> Deployment::Create(
    const DeploymentConfig& config, const std::string& name, const ModelFileReader& file,
    const Plan& plan, const UploadOptions& options, std::vector<std::string> servers,
    uint64_t bytes) {
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> d,
                   Make(config, name, plan, options, std::move(servers), bytes,
                        NewDeploymentId()));
  // Load from the last stage back, so each stage's next hop is ready
  // before anything can flow into it.
  const absl::Time deadline = absl::Now() + config.load_timeout;
  WeightReader read = [&file](const std::string& fqn, uint64_t offset, size_t len, char* out) {
    return file.Read(fqn, offset, len, out);
  };
  absl::Status s;
  for (int i = static_cast<int>(d->specs_.size()) - 1; i >= 0 && s.ok(); --i) {
    s = config.stages->LoadStage(d->servers_[i], d->specs_[i], read, deadline);
  }
  if (s.ok()) s = d->Connect(deadline);
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
  absl::Status s = d->Connect(absl::Now() + config.load_timeout);
  if (!s.ok()) {
    // Its stages stay for the caller to unload or keep.
    d->Close(absl::StrCat("adopting failed: ", s.message()), /*unload=*/false);
    return s;
  }
  return d;
}

absl::Status Deployment::Connect(absl::Time deadline) {
  const int n = static_cast<int>(specs_.size());
  std::weak_ptr<Deployment> weak = shared_from_this();
  const std::string last = servers_[n - 1];
  absl::StatusOr<std::unique_ptr<StageClient::Subscription>> results =
      config_.stages->SubscribeResults(
          last, specs_[n - 1].key(),
          [weak](Frame f) {
            if (auto dep = weak.lock()) dep->Deliver(std::move(f));
          },
          [weak, last](const absl::Status& end) {
            auto dep = weak.lock();
            if (dep == nullptr) return;
            std::string why = absl::StrCat("the results stream from the last stage (", last,
                                           ") ended: ", end.message());
            if (dep->Break(why) && dep->config_.on_broken) dep->config_.on_broken(dep->name_);
          },
          deadline);
  if (!results.ok()) return results.status();
  results_ = *std::move(results);
  input_ = config_.stages->OpenInput(servers_[0], specs_[0].key());
  absl::MutexLock lock(&mu_);
  info_.state = ModelState::kReady;
  return absl::OkStatus();
}

ModelInfo Deployment::Info() const {
  absl::MutexLock lock(&mu_);
  return info_;
}

int64_t Deployment::version() const {
  absl::MutexLock lock(&mu_);
  return info_.version;
}

void Deployment::set_version(int64_t version) {
  absl::MutexLock lock(&mu_);
  info_.version = version;
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
  pending_.erase(it);
}

void Deployment::FailAll(const absl::Status& error) {
  while (!pending_.empty()) Finish(pending_.begin()->first, error);
}

void Deployment::Deliver(Frame frame) {
  const FrameHeader& h = frame.header;
  absl::MutexLock lock(&mu_);
  auto it = pending_.find(h.request_id());
  if (it == pending_.end()) {
    ++stray_frames_;  // late (the request ended) or made up
    return;
  }
  Pending& p = *it->second;
  const int m = h.microbatch();
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
  if (m < 0 || m >= static_cast<int>(p.outputs.size()) || !p.outputs[m].empty()) {
    Finish(h.request_id(), absl::InternalError(absl::StrCat(
                               "the last stage sent microbatch ", m, " of a request split into ",
                               p.outputs.size(), (m >= 0 && m < static_cast<int>(p.outputs.size()))
                                                     ? ", twice"
                                                     : "")));
    return;
  }
  absl::Status fits = CheckOutputs(frame, p);
  if (!fits.ok()) {
    Finish(h.request_id(), fits);
    return;
  }
  p.outputs[m] = std::move(frame.tensors);
  if (--p.remaining == 0) Finish(h.request_id(), absl::OkStatus());
}

void Deployment::SendCancel(uint64_t id) {
  // Tell the stages to drop whatever of this request they still hold; a
  // stage 0 too full to take it soon is left alone (the deadlines go on).
  Frame cancel;
  cancel.header.set_kind(FrameHeader::CANCEL);
  cancel.header.set_request_id(id);
  input_->Send(std::move(cancel), absl::Now() + absl::Milliseconds(100)).IgnoreError();
}

absl::StatusOr<std::vector<Tensor>> Deployment::Infer(const std::vector<Tensor>& inputs,
                                                      absl::Time deadline,
                                                      const std::function<bool()>& cancelled) {
  const std::string& model = name_;
  {
    absl::MutexLock lock(&mu_);
    if (!retired_.empty()) return absl::UnavailableError(retired_);
    if (info_.state != ModelState::kReady) {
      return absl::UnavailableError(absl::StrCat("model \"", model, "\" is ",
                                                 ModelStateName(info_.state), ": ", info_.reason));
    }
  }
  ASSIGN_OR_RETURN(int64_t batch, CheckTensorsMatch(plan_->inputs(), inputs));
  if (deadline == absl::InfiniteFuture()) deadline = absl::Now() + config_.default_timeout;

  std::vector<std::vector<Tensor>> microbatches;
  if (batch == 0) {
    // Nothing to compute for outputs that follow the batch.
    if (std::all_of(output_batched_.begin(), output_batched_.end(), [](bool b) { return b; })) {
      std::vector<Tensor> empty;
      for (const ValueSpec& out : plan_->outputs()) {
        Shape s(out.shape().begin(), out.shape().end());
        for (int64_t& d : s) d = std::max<int64_t>(d, 0);
        empty.push_back(Tensor::Zeros(s));
      }
      return empty;
    }
    microbatches.push_back(inputs);  // one empty microbatch makes the rest
  } else {
    ASSIGN_OR_RETURN(microbatches, SplitMicrobatches(inputs, input_batched_, microbatches_));
  }
  std::vector<int64_t> rows;
  for (const std::vector<Tensor>& mb : microbatches) {
    int64_t r = -1;
    for (size_t i = 0; i < mb.size(); ++i) {
      if (input_batched_[i] && mb[i].rank() > 0) r = mb[i].dim(0);
    }
    rows.push_back(r);
  }

  const uint64_t id = next_request_id_++;
  auto pending = std::make_shared<Pending>(rows);
  {
    absl::MutexLock lock(&mu_);
    if (!retired_.empty()) return absl::UnavailableError(retired_);
    if (closing_ || info_.state != ModelState::kReady) {
      return absl::UnavailableError(absl::StrCat("model \"", model, "\" is ",
                                                 ModelStateName(info_.state), ": ", info_.reason));
    }
    pending_[id] = pending;
  }
  auto forget = [&] {
    absl::MutexLock lock(&mu_);
    pending_.erase(id);
  };
  const int64_t deadline_us = absl::ToUnixMicros(deadline);
  for (size_t m = 0; m < microbatches.size(); ++m) {
    Frame f;
    f.header.set_request_id(id);
    f.header.set_microbatch(static_cast<int>(m));
    f.header.set_deadline_us(deadline_us);
    for (size_t k = 0; k < first_inputs_.size(); ++k) {
      f.Add(specs_.front().receives(static_cast<int>(k)).name(),
            microbatches[m][first_inputs_[k]]);
    }
    // Sent in slices of the deadline, so a request that ends while stage 0
    // is full (a stage's error, a broken pipeline, the client gone) stops
    // waiting for room at once.
    absl::Status sent;
    while (true) {
      sent = input_->Send(f, std::min(deadline, absl::Now() + absl::Milliseconds(50)));
      if (sent.code() != absl::StatusCode::kDeadlineExceeded || absl::Now() >= deadline) break;
      if (pending->done.HasBeenNotified() || (cancelled && cancelled())) break;
    }
    if (pending->done.HasBeenNotified()) break;  // ended already: its status says why
    if (sent.ok() && !(cancelled && cancelled())) continue;
    forget();
    if (m > 0) SendCancel(id);
    if (sent.ok() || (cancelled && cancelled())) {
      return absl::CancelledError("the client cancelled the request");
    }
    if (sent.code() == absl::StatusCode::kDeadlineExceeded) {
      return absl::DeadlineExceededError(absl::StrCat(
          "request to \"", model, "\" missed its deadline while stage 0 was full (", m, " of ",
          microbatches.size(), " microbatches sent)"));
    }
    return absl::UnavailableError(
        absl::StrCat("cannot reach stage 0 of \"", model, "\": ", sent.message()));
  }

  // Wait for every microbatch, the deadline, or the client to go away.
  absl::Status ended;
  while (!pending->done.HasBeenNotified()) {
    absl::Time now = absl::Now();
    if (now >= deadline) {
      int left;
      {
        absl::MutexLock lock(&mu_);
        left = pending->remaining;
      }
      ended = absl::DeadlineExceededError(absl::StrCat("request to \"", model,
                                                       "\" missed its deadline with ", left, " of ",
                                                       microbatches.size(),
                                                       " microbatches unfinished"));
      break;
    }
    if (cancelled && cancelled()) {
      ended = absl::CancelledError("the client cancelled the request");
      break;
    }
    pending->done.WaitForNotificationWithTimeout(
        std::min(deadline - now, absl::Milliseconds(cancelled ? 20 : 1000)));
  }
  if (!ended.ok()) {
    forget();
    SendCancel(id);
    return ended;
  }
  if (!pending->error.ok()) {
    SendCancel(id);  // the stages drop what is left of it
    return pending->error;
  }
  return MergeMicrobatches(output_batched_, pending->outputs);
}

absl::Status Deployment::CheckStages(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  for (size_t i = 0; i < specs_.size(); ++i) {
    const std::string& address = servers_[i];
    absl::StatusOr<StageStatsResponse> stats =
        config_.stages->GetStageStats(address, specs_[i].key(), deadline);
    if (!stats.ok()) {
      return absl::UnavailableError(absl::StrCat("stage ", i, " on ", address,
                                                 " failed its health check: ",
                                                 stats.status().message()));
    }
    if (!stats->downstream_error().empty()) {
      return absl::UnavailableError(absl::StrCat("stage ", i, " on ", address,
                                                 " cannot send on: ", stats->downstream_error()));
    }
    if (i + 1 == specs_.size() && !stats->results_subscribed()) {
      return absl::UnavailableError(absl::StrCat("stage ", i, " on ", address,
                                                 " has lost the results subscription"));
    }
  }
  return absl::OkStatus();
}

bool Deployment::Break(const std::string& why) {
  absl::MutexLock lock(&mu_);
  if (closing_ || info_.state != ModelState::kReady) return false;
  info_.state = ModelState::kUnavailable;
  info_.reason = why;
  FailAll(absl::UnavailableError(why));
  return true;
}

void Deployment::Retire(const std::string& why) {
  absl::MutexLock lock(&mu_);
  if (retired_.empty()) retired_ = why;
}

bool Deployment::Drained() const { return InFlight() == 0; }

int Deployment::InFlight() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(pending_.size());
}

void Deployment::UnloadStages() {
  const absl::Time deadline = absl::Now() + kUnloadTimeout;
  for (size_t i = 0; i < specs_.size(); ++i) {
    config_.stages->UnloadStage(servers_[i], specs_[i].key(), deadline).IgnoreError();
  }
}

void Deployment::Close(const std::string& why, bool unload) {
  absl::MutexLock close_lock(&close_mu_);
  if (closed_) return;
  closed_ = true;
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
    if (info_.state == ModelState::kReady) info_.state = ModelState::kUnavailable;
    if (info_.reason.empty()) info_.reason = why;
    FailAll(absl::UnavailableError(why));
  }
  if (input_) input_->Close();
  results_.reset();  // ends the subscription
  if (unload) UnloadStages();
}

}  // namespace pipeserve
