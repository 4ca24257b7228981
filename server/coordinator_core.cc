#include "server/coordinator_core.h"

#include <algorithm>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "partitioner/partition.h"
#include "partitioner/routing.h"
#include "proto/pipeserve_service.grpc.pb.h"
#include "runtime/microbatch.h"
#include "runtime/model_file.h"
#include "runtime/signature.h"
#include "server/frame_stream.h"
#include "server/stage_host.h"

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

constexpr size_t kWeightChunkBytes = 1 << 20;

absl::Status FromGrpc(const grpc::Status& s, const std::string& context) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(context, ": ", s.error_message()));
}

// One request in flight: what came back per microbatch.
struct PendingRequest {
  explicit PendingRequest(int microbatches)
      : remaining(microbatches), outputs(microbatches) {}
  int remaining;
  std::vector<std::vector<Tensor>> outputs;
  absl::Status error;
  absl::Notification done;
};

}  // namespace

// A deployed model: its plan, its stage servers, the stream into stage 0
// and the results stream out of the last stage.
class Deployment {
 public:
  ModelInfo info;
  Routing routing;
  std::shared_ptr<FrameSender> to_first;
  std::shared_ptr<ResultsReceiver> results;
  // Called (once) when the deployment breaks, to get it repaired.
  std::function<void(const std::string&)> on_broken;

  void Deliver(Frame frame) {
    absl::MutexLock lock(&mu_);
    auto it = pending_.find(frame.header.request_id());
    if (it == pending_.end()) return;  // late: the request already ended
    PendingRequest& p = *it->second;
    if (frame.header.kind() == FrameHeader::ERROR) {
      p.error = absl::Status(static_cast<absl::StatusCode>(frame.header.error_code()),
                             frame.header.error_message());
      Finish(it);
      return;
    }
    int mb = frame.header.microbatch();
    if (frame.header.kind() != FrameHeader::DATA || mb < 0 ||
        mb >= static_cast<int>(p.outputs.size()) || !p.outputs[mb].empty()) {
      return;
    }
    p.outputs[mb] = std::move(frame.tensors);
    if (--p.remaining == 0) Finish(it);
  }

  // The results stream ended: nothing in flight can complete.
  void Broken(const std::string& why) {
    std::function<void(const std::string&)> notify;
    {
      absl::MutexLock lock(&mu_);
      if (closing_ || info.state == ModelState::kUnavailable) return;
      info.state = ModelState::kUnavailable;
      info.reason = why;
      while (!pending_.empty()) {
        pending_.begin()->second->error = absl::UnavailableError(why);
        Finish(pending_.begin());
      }
      notify = on_broken;
    }
    if (notify) notify(info.name);
  }

  void Register(uint64_t id, std::shared_ptr<PendingRequest> p) {
    absl::MutexLock lock(&mu_);
    pending_[id] = std::move(p);
  }

  void Forget(uint64_t id) {
    absl::MutexLock lock(&mu_);
    pending_.erase(id);
  }

  // Microbatches of `p` still outstanding (its fields change under mu_).
  int Remaining(const PendingRequest& p) {
    absl::MutexLock lock(&mu_);
    return p.remaining;
  }

  ModelInfo Info() {
    absl::MutexLock lock(&mu_);
    return info;
  }

  void SetState(ModelState s, std::string reason = "") {
    absl::MutexLock lock(&mu_);
    info.state = s;
    info.reason = std::move(reason);
  }

  // Stops the streams; requests in flight fail as unavailable.
  void Close(const std::string& why) {
    {
      absl::MutexLock lock(&mu_);
      closing_ = true;
      while (!pending_.empty()) {
        pending_.begin()->second->error = absl::UnavailableError(why);
        Finish(pending_.begin());
      }
    }
    if (to_first) to_first->Close();
    if (results) {
      results->Cancel();
      results->WaitDone(absl::Seconds(5));
    }
  }

 private:
  using Map = absl::flat_hash_map<uint64_t, std::shared_ptr<PendingRequest>>;
  void Finish(Map::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    it->second->done.Notify();
    pending_.erase(it);
  }

  absl::Mutex mu_;
  Map pending_ ABSL_GUARDED_BY(mu_);
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
};

Coordinator::Coordinator(CoordinatorOptions options, std::unique_ptr<ModelStore> store,
                         std::unique_ptr<Launcher> launcher)
    : options_(options), store_(std::move(store)), launcher_(std::move(launcher)) {
  monitor_thread_ = std::thread([this] { MonitorLoop(); });
  repair_thread_ = std::thread([this] { RepairLoop(); });
}

Coordinator::~Coordinator() {
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
  for (auto& [name, d] : models) d->Close("the coordinator is shutting down");
}

void Coordinator::LoadStoredModels() {
  absl::StatusOr<std::vector<StoredModel>> stored = store_->List();
  if (!stored.ok()) return;
  for (const StoredModel& m : *stored) {
    absl::MutexLock deploy_lock(&deploy_mu_);
    absl::StatusOr<std::shared_ptr<Deployment>> d = Deploy(m.name, m.path, m.options, m.bytes);
    absl::MutexLock lock(&mu_);
    if (d.ok()) {
      models_[m.name] = *d;
      failed_.erase(m.name);
    } else {
      ModelInfo info;
      info.name = m.name;
      info.state = ModelState::kUnavailable;
      info.reason = std::string(d.status().message());
      info.bytes = m.bytes;
      failed_[m.name] = info;
    }
  }
}

absl::StatusOr<std::unique_ptr<PendingUpload>> Coordinator::StartUpload(const std::string& name) {
  return store_->StartUpload(name);
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
  if (options.microbatches() < 0 || options.num_stages() < 0) {
    return absl::InvalidArgumentError("microbatches and num_stages must be >= 0");
  }
  absl::MutexLock deploy_lock(&deploy_mu_);
  ASSIGN_OR_RETURN(std::shared_ptr<Deployment> d,
                   Deploy(name, upload->path(), options, upload->bytes()));
  absl::Status committed = upload->Commit(options);
  if (!committed.ok()) {
    d->Close("the upload could not be stored");
    return committed;
  }
  std::shared_ptr<Deployment> old;
  {
    absl::MutexLock lock(&mu_);
    old = models_[name];
    models_[name] = d;
    failed_.erase(name);
  }
  if (old) old->Close(absl::StrCat("model \"", name, "\" was replaced by a new upload"));
  UploadResponse resp;
  resp.set_name(name);
  resp.set_bytes(total_bytes);
  resp.set_num_stages(d->info.plan->stages_size());
  return resp;
}

absl::StatusOr<std::shared_ptr<Deployment>> Coordinator::Deploy(const std::string& name,
                                                                const std::string& path,
                                                                const UploadOptions& options,
                                                                uint64_t bytes) {
  ASSIGN_OR_RETURN(Model model, ReadModelFile(path));
  PartitionOptions popts;
  popts.num_stages = options.num_stages();
  for (const SplitSpecEntry& e : options.split_spec()) popts.split_spec[e.module()] = e.point();
  ASSIGN_OR_RETURN(Plan plan, Partition(model.graph, popts));
  const int n = plan.stages_size();
  ASSIGN_OR_RETURN(std::vector<std::string> servers, launcher_->ServersFor(n));

  auto d = std::make_shared<Deployment>();
  d->info.name = name;
  d->info.plan = std::make_shared<const Plan>(plan);
  d->info.servers = servers;
  d->info.bytes = bytes;
  d->info.microbatches =
      options.microbatches() > 0 ? options.microbatches() : options_.default_microbatches;
  d->routing = RoutePlan(plan);

  // Load from the last stage back, so each stage's next hop is ready
  // before anything can flow into it.
  absl::Time deadline = absl::Now() + options_.load_timeout;
  auto channel = [this](const std::string& a) { return channels_.To(a); };
  for (int i = n - 1; i >= 0; --i) {
    StageSpec spec;
    spec.set_model(name);
    *spec.mutable_stage() = plan.stages(i);
    spec.set_num_stages(n);
    for (const std::string& f : d->routing.forward[i]) spec.add_forward(f);
    if (i + 1 < n) spec.set_next_address(servers[i + 1]);
    spec.set_threads(launcher_->ThreadsPerStage());
    auto stub = StageService::NewStub(channel(servers[i]));
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(deadline));
    LoadStageResponse resp;
    auto writer = stub->LoadStage(&ctx, &resp);
    LoadStageRequest req;
    *req.mutable_spec() = spec;
    bool ok = writer->Write(req);
    for (const TensorInfo& info : plan.stages(i).graph().params()) {
      const Tensor& t = model.weights.at(info.fqn());
      const char* p = reinterpret_cast<const char*>(t.data());
      for (uint64_t off = 0; ok && off < uint64_t(t.byte_size()); off += kWeightChunkBytes) {
        LoadStageRequest chunk;
        chunk.mutable_chunk()->set_fqn(info.fqn());
        chunk.mutable_chunk()->set_offset(off);
        chunk.mutable_chunk()->set_data(p + off, std::min<uint64_t>(kWeightChunkBytes, t.byte_size() - off));
        ok = writer->Write(chunk);
      }
    }
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    if (!st.ok()) {
      return FromGrpc(st, absl::StrCat("loading stage ", i, " of \"", name, "\" on ", servers[i]));
    }
  }

  std::weak_ptr<Deployment> weak = d;
  std::string last = servers[n - 1];
  d->results = ResultsReceiver::Start(
      channel(last), name, n - 1,
      [weak](Frame f) {
        if (auto dep = weak.lock()) dep->Deliver(std::move(f));
      },
      [weak, last](const grpc::Status& s) {
        if (auto dep = weak.lock()) {
          dep->Broken(absl::StrCat("the results stream from the last stage (", last,
                                   ") ended: ", s.error_message()));
        }
      });
  d->to_first = FrameSender::Create(channel(servers[0]), name, 0, options_.send_capacity);
  d->info.state = ModelState::kReady;
  d->on_broken = [this](const std::string& model) { ScheduleRepair(model); };
  return d;
}

void Coordinator::ScheduleRepair(const std::string& name) {
  absl::MutexLock lock(&repair_mu_);
  int attempt = repair_attempts_[name]++;
  // 0.2 s, 0.4 s, ... up to 10 s between attempts.
  absl::Duration wait = std::min(absl::Milliseconds(200) * (1 << std::min(attempt, 6)),
                                 absl::Seconds(10));
  to_repair_[name] = absl::Now() + wait;
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
    std::shared_ptr<Deployment> broken = Find(name);
    if (broken == nullptr || broken->Info().state == ModelState::kReady) continue;
    absl::StatusOr<std::vector<StoredModel>> stored = store_->List();
    const StoredModel* m = nullptr;
    if (stored.ok()) {
      for (const StoredModel& s : *stored) {
        if (s.name == name) m = &s;
      }
    }
    if (m == nullptr) continue;  // removed meanwhile
    absl::StatusOr<std::shared_ptr<Deployment>> d;
    {
      absl::MutexLock deploy_lock(&deploy_mu_);
      d = Deploy(m->name, m->path, m->options, m->bytes);
    }
    if (!d.ok()) {
      broken->SetState(ModelState::kUnavailable,
                       absl::StrCat(broken->Info().reason, "; redeploying failed: ",
                                    d.status().message()));
      ScheduleRepair(name);
      continue;
    }
    bool replaced = false;
    {
      absl::MutexLock lock(&mu_);
      auto it = models_.find(name);
      if (it != models_.end() && it->second == broken) {
        it->second = *d;
        replaced = true;
      }
    }
    if (replaced) {
      broken->Close("replaced by a redeployment");
      absl::MutexLock lock(&repair_mu_);
      repair_attempts_.erase(name);
    } else {
      (*d)->Close("a newer upload replaced the model during repair");
    }
  }
}

void Coordinator::MonitorLoop() {
  std::map<std::string, std::unique_ptr<StageService::Stub>> stubs;
  while (true) {
    {
      absl::MutexLock lock(&repair_mu_);
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(repair_mu_) { return stopping_; };
      if (repair_mu_.AwaitWithTimeout(absl::Condition(&stop), options_.health_interval)) return;
    }
    std::vector<std::shared_ptr<Deployment>> ready;
    {
      absl::MutexLock lock(&mu_);
      for (auto& [name, d] : models_) ready.push_back(d);
    }
    for (const std::shared_ptr<Deployment>& d : ready) {
      ModelInfo info = d->Info();
      if (info.state != ModelState::kReady) continue;
      for (int s = 0; s < static_cast<int>(info.servers.size()); ++s) {
        auto& stub = stubs[info.servers[s]];
        if (!stub) stub = StageService::NewStub(channels_.To(info.servers[s]));
        grpc::ClientContext ctx;
        ctx.set_deadline(absl::ToChronoTime(absl::Now() + std::max(options_.health_interval,
                                                                     absl::Seconds(1))));
        StageStatsRequest req;
        req.set_model(info.name);
        req.set_stage(s);
        StageStatsResponse resp;
        grpc::Status st = stub->GetStageStats(&ctx, req, &resp);
        if (!st.ok()) {
          d->Broken(absl::StrCat("stage ", s, " on ", info.servers[s],
                                 " failed its health check: ", st.error_message()));
          break;
        }
      }
    }
  }
}

std::shared_ptr<Deployment> Coordinator::Find(const std::string& name) {
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
  for (auto& d : deployments) out.push_back(d->Info());
  std::sort(out.begin(), out.end(),
            [](const ModelInfo& a, const ModelInfo& b) { return a.name < b.name; });
  return out;
}

absl::StatusOr<ModelInfo> Coordinator::GetModel(const std::string& name) {
  if (auto d = Find(name)) return d->Info();
  absl::MutexLock lock(&mu_);
  auto it = failed_.find(name);
  if (it != failed_.end()) return it->second;
  return absl::NotFoundError(absl::StrCat("model \"", name, "\" is not known"));
}

absl::StatusOr<std::vector<Tensor>> Coordinator::Infer(const std::string& model,
                                                       const std::vector<Tensor>& inputs,
                                                       absl::Time deadline,
                                                       std::function<bool()> cancelled) {
  std::shared_ptr<Deployment> d = Find(model);
  if (d == nullptr) {
    ASSIGN_OR_RETURN(ModelInfo info, GetModel(model));
    return absl::UnavailableError(absl::StrCat("model \"", model, "\" is ",
                                               ModelStateName(info.state), ": ", info.reason));
  }
  ModelInfo info = d->Info();
  if (info.state != ModelState::kReady) {
    return absl::UnavailableError(absl::StrCat("model \"", model, "\" is ",
                                               ModelStateName(info.state), ": ", info.reason));
  }
  const Plan& plan = *info.plan;
  RETURN_IF_ERROR(CheckTensorsMatch(plan.inputs(), inputs).status());
  if (deadline == absl::InfiniteFuture()) deadline = absl::Now() + options_.default_timeout;

  std::vector<bool> batched;
  for (const ValueSpec& in : plan.inputs()) batched.push_back(in.batched());
  ASSIGN_OR_RETURN(auto microbatches, SplitMicrobatches(inputs, batched, info.microbatches));
  absl::flat_hash_map<std::string, int> input_index;
  for (int i = 0; i < plan.inputs_size(); ++i) input_index[plan.inputs(i).name()] = i;

  const uint64_t id = next_request_id_++;
  auto pending = std::make_shared<PendingRequest>(static_cast<int>(microbatches.size()));
  d->Register(id, pending);
  const int64_t deadline_us = absl::ToUnixMicros(deadline);
  for (size_t m = 0; m < microbatches.size(); ++m) {
    Frame f;
    f.header.set_request_id(id);
    f.header.set_microbatch(static_cast<int>(m));
    f.header.set_deadline_us(deadline_us);
    for (const std::string& name : d->routing.to_first) {
      f.Add(name, microbatches[m][input_index.at(name)]);
    }
    absl::Status sent = d->to_first->Send(std::move(f));
    if (!sent.ok()) {
      d->Forget(id);
      return absl::UnavailableError(absl::StrCat("cannot reach stage 0 of \"", model,
                                                 "\": ", sent.message()));
    }
  }

  // Wait for every microbatch, the deadline, or the client to go away.
  absl::Status ended;
  while (!pending->done.HasBeenNotified()) {
    absl::Time now = absl::Now();
    if (now >= deadline) {
      ended = absl::DeadlineExceededError(absl::StrCat(
          "request to \"", model, "\" missed its deadline with ", d->Remaining(*pending),
          " of ", microbatches.size(), " microbatches unfinished"));
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
    d->Forget(id);
    // Tell the stages to drop whatever of this request they still hold.
    Frame cancel;
    cancel.header.set_kind(FrameHeader::CANCEL);
    cancel.header.set_request_id(id);
    d->to_first->Send(std::move(cancel)).IgnoreError();
    return ended;
  }
  if (!pending->error.ok()) return pending->error;
  std::vector<bool> out_batched;
  for (const ValueSpec& out : plan.outputs()) out_batched.push_back(out.batched());
  return MergeMicrobatches(out_batched, pending->outputs);
}

}  // namespace pipeserve
