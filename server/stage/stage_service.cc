#include "server/stage/stage_service.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "server/transport/auth.h"
#include "server/transport/frame_stream.h"
#include "server/transport/write_queue.h"

namespace pipeserve {
namespace {

// The stage a Process call names in its metadata.
absl::StatusOr<StageKey> KeyFromMetadata(const grpc::ServerContextBase& ctx) {
  StageKey key;
  key.set_model(MetadataValue(ctx, kModelKey));
  uint64_t deployment = 0;
  int stage = -1;
  if (!absl::SimpleAtoi(MetadataValue(ctx, kDeploymentKey), &deployment) ||
      !absl::SimpleAtoi(MetadataValue(ctx, kStageKey), &stage)) {
    return absl::InvalidArgumentError(
        "Process: the pipeserve-deployment and pipeserve-stage metadata must be numbers");
  }
  key.set_deployment(deployment);
  key.set_stage(stage);
  // Absent (a sender from before replicas): replica 0.
  const std::string replica = MetadataValue(ctx, kReplicaKey);
  int r = 0;
  if (!replica.empty() && !absl::SimpleAtoi(replica, &r)) {
    return absl::InvalidArgumentError("Process: the pipeserve-replica metadata must be a number");
  }
  key.set_replica(r);
  return key;
}

// Frames into a stage: bytes -> Frame -> StageHost, reading again only
// when the host's queue has room. Ends when the host stops.
class ProcessReactor : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit ProcessReactor(std::shared_ptr<StageHost> host)
      : host_(std::move(host)), link_(std::make_shared<Link>(this)) {
    if (!host_->AddProducer(link_)) {
      End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the stage is being unloaded"));
      return;
    }
    ReadNext();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      End(grpc::Status::OK);  // the sender closed its side
      return;
    }
    std::vector<Frame> frames;  // the sender may have merged several
    absl::Status s = FramesFromByteBuffer(buf_, &frames);
    buf_.Clear();
    if (!s.ok()) {
      End(ToGrpcStatus(s));  // a malformed frame ends the stream
      return;
    }
    // Only the last frame may pause the stream (one Resume, one read).
    bool more = true;
    for (size_t i = 0; i < frames.size(); ++i) {
      more = host_->Push(std::move(frames[i]), i + 1 == frames.size() ? link_ : nullptr);
    }
    if (more) ReadNext();
  }

  void OnCancel() override { End(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled")); }

  void OnDone() override {
    {
      absl::MutexLock lock(&link_->mu);
      link_->reactor = nullptr;
    }
    delete this;
  }

 private:
  // The reactor as the host's Producer: outlives it, forgets it at OnDone.
  struct Link : StageHost::Producer {
    explicit Link(ProcessReactor* r) : reactor(r) {}
    void Resume() override {
      absl::MutexLock lock(&mu);
      if (reactor != nullptr) reactor->ReadNext();
    }
    void Stopped() override {
      absl::MutexLock lock(&mu);
      if (reactor != nullptr) {
        reactor->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the stage was unloaded"));
      }
    }
    absl::Mutex mu;
    ProcessReactor* reactor ABSL_GUARDED_BY(mu);
  };

  void ReadNext() {
    absl::MutexLock lock(&mu_);
    if (!finished_) StartRead(&buf_);
  }

  void End(const grpc::Status& s) {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    finished_ = true;
    Finish(s);
  }

  const std::shared_ptr<StageHost> host_;
  const std::shared_ptr<Link> link_;
  grpc::ByteBuffer buf_;
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

// A last stage's outputs, written to the coordinator that subscribed. The
// stage's workers send through Sink; when the coordinator hangs up (or a
// new subscriber replaces this one) the stream finishes and the stage
// stops sending here.
class ResultsReactor : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  class Sink : public MessageSink {
   public:
    Sink(ResultsReactor* r, size_t capacity)
        : queue_(
              capacity, [r](const grpc::ByteBuffer* m) { r->StartWrite(m); },
              [r] { r->Closed(); }, kFrameMergeBytes) {}

    // The stage was unloaded or a newer subscriber took over.
    void Close() override { queue_.Close("the stage closed the results stream"); }
    absl::Status Push(absl::Span<const Frame> frames, absl::Time deadline) override {
      grpc::ByteBuffer bb;
      absl::Status s = FramesToByteBuffer(frames, &bb);
      if (!s.ok()) return s;
      return queue_.Push(std::move(bb), deadline, frames.size());
    }

    WriteQueue queue_;
  };

  ResultsReactor(StageServerCore* core, StageKey key, size_t capacity,
                 grpc::CallbackServerContext* ctx)
      : core_(core), key_(std::move(key)), sink_(std::make_shared<Sink>(this, capacity)) {
    // Refusals go back trailers-only (no marker); a subscription sends its
    // initial metadata before the sink can start any write.
    std::shared_ptr<StageHost> host = core_->Find(key_);
    absl::Status s = host == nullptr
                         ? absl::NotFoundError(absl::StrCat(StageKeyName(key_), " is not loaded here"))
                     : !host->last_stage()
                         ? absl::FailedPreconditionError(absl::StrCat(
                               StageKeyName(key_), " is not the last stage; only its results stream"))
                         : absl::OkStatus();
    if (s.ok()) {
      ctx->AddInitialMetadata(kSubscribedKey, "1");
      StartSendInitialMetadata();
      s = core_->SubscribeResults(key_, sink_);
    }
    if (!s.ok()) {
      subscribed_ = false;
      status_ = ToGrpcStatus(s);
      sink_->queue_.Close("not subscribed");  // finishes via Closed()
    }
  }

  void OnWriteDone(bool ok) override { sink_->queue_.WriteDone(ok); }
  void OnCancel() override { sink_->queue_.Close("the subscriber hung up"); }
  void OnDone() override { delete this; }

 private:
  // The queue closed: no write starts again, so the stream can finish.
  void Closed() {
    if (subscribed_) core_->UnsubscribeResults(key_, sink_.get());
    Finish(status_);
  }

  StageServerCore* const core_;
  const StageKey key_;
  const std::shared_ptr<Sink> sink_;
  bool subscribed_ = true;
  grpc::Status status_ = grpc::Status::OK;
};

template <typename Reactor>
class Reject : public Reactor {
 public:
  explicit Reject(const absl::Status& s) { this->Finish(ToGrpcStatus(s)); }
  void OnDone() override { delete this; }
};

}  // namespace

std::shared_ptr<FrameSink> GrpcDialer::Dial(const std::string& address, const StageKey& key) {
  return FrameSender::Create(channels_, address, key, send_capacity_);
}

StageServiceImpl::StageServiceImpl(StageServerCore* core, std::string cluster_token,
                                   size_t send_capacity)
    : core_(core), cluster_token_(std::move(cluster_token)), send_capacity_(send_capacity) {}

grpc::Status StageServiceImpl::LoadStage(grpc::ServerContext* ctx,
                                         grpc::ServerReader<LoadStageRequest>* reader,
                                         LoadStageResponse*) {
  absl::Status auth = CheckClusterToken(cluster_token_, *ctx);
  if (!auth.ok()) return ToGrpcStatus(auth);
  LoadStageRequest req;
  if (!reader->Read(&req) || !req.has_spec()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "LoadStage: the first message must be the stage spec");
  }
  absl::StatusOr<std::unique_ptr<StageServerCore::Load>> load = core_->BeginLoad(req.spec());
  if (!load.ok()) return ToGrpcStatus(load.status());
  while (reader->Read(&req)) {
    if (!req.has_chunk()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "LoadStage: only the first message may be a spec");
    }
    absl::Status s = (*load)->AddChunk(req.chunk());
    if (!s.ok()) return ToGrpcStatus(s);
  }
  return ToGrpcStatus((*load)->Finish());
}

grpc::Status StageServiceImpl::UnloadStage(grpc::ServerContext* ctx,
                                           const UnloadStageRequest* req, UnloadStageResponse*) {
  absl::Status auth = CheckClusterToken(cluster_token_, *ctx);
  if (!auth.ok()) return ToGrpcStatus(auth);
  return ToGrpcStatus(core_->Unload(req->key()));
}

grpc::Status StageServiceImpl::GetStageStats(grpc::ServerContext* ctx,
                                             const StageStatsRequest* req,
                                             StageStatsResponse* resp) {
  absl::Status auth = CheckClusterToken(cluster_token_, *ctx);
  if (!auth.ok()) return ToGrpcStatus(auth);
  absl::StatusOr<StageStatsResponse> stats = core_->Stats(req->key());
  if (!stats.ok()) return ToGrpcStatus(stats.status());
  *resp = *std::move(stats);
  return grpc::Status::OK;
}

grpc::Status StageServiceImpl::ListStages(grpc::ServerContext* ctx, const ListStagesRequest*,
                                          ListStagesResponse* resp) {
  absl::Status auth = CheckClusterToken(cluster_token_, *ctx);
  if (!auth.ok()) return ToGrpcStatus(auth);
  for (const StageKey& key : core_->Keys()) *resp->add_keys() = key;
  return grpc::Status::OK;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* StageServiceImpl::Process(
    grpc::CallbackServerContext* ctx) {
  using Bidi = grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>;
  absl::Status auth = CheckClusterToken(cluster_token_, *ctx);
  if (!auth.ok()) return new Reject<Bidi>(auth);
  absl::StatusOr<StageKey> key = KeyFromMetadata(*ctx);
  if (!key.ok()) return new Reject<Bidi>(key.status());
  std::shared_ptr<StageHost> host = core_->Find(*key);
  if (host == nullptr) {
    return new Reject<Bidi>(absl::FailedPreconditionError(
        absl::StrCat(StageKeyName(*key), " is not loaded here")));
  }
  return new ProcessReactor(std::move(host));
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* StageServiceImpl::Results(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* request) {
  using Writer = grpc::ServerWriteReactor<grpc::ByteBuffer>;
  absl::Status auth = CheckClusterToken(cluster_token_, *ctx);
  if (!auth.ok()) return new Reject<Writer>(auth);
  ResultsRequest req;
  grpc::ByteBuffer copy(*request);
  if (!grpc::SerializationTraits<ResultsRequest>::Deserialize(&copy, &req).ok()) {
    return new Reject<Writer>(absl::InvalidArgumentError("Results: malformed request"));
  }
  return new ResultsReactor(core_, req.key(), send_capacity_, ctx);
}

}  // namespace pipeserve
