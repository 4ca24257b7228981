#include "server/stage_service.h"

#include <cstring>
#include <deque>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/model_file.h"

namespace pipeserve {
namespace {

std::string Metadata(grpc::CallbackServerContext* ctx, const char* key) {
  auto it = ctx->client_metadata().find(key);
  if (it == ctx->client_metadata().end()) return "";
  return std::string(it->second.data(), it->second.size());
}

// Frames to compute: bytes -> Frame -> StageHost, reading again only when
// the host's queue has room.
class InReactor : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit InReactor(std::shared_ptr<StageHost> host)
      : host_(std::move(host)), state_(std::make_shared<State>()) {
    StartRead(&buf_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    Frame frame;
    absl::Status s = FrameFromByteBuffer(buf_, &frame);
    buf_.Clear();
    if (!s.ok()) {
      Finish(ToGrpc(s));
      return;
    }
    std::shared_ptr<State> state = state_;
    host_->Push(std::move(frame), [this, state] {
      absl::MutexLock lock(&state->mu);
      if (state->alive) StartRead(&buf_);
    });
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&state_->mu);
      state_->alive = false;
    }
    delete this;
  }

 private:
  struct State {
    absl::Mutex mu;
    bool alive = true;
  };
  std::shared_ptr<StageHost> host_;
  std::shared_ptr<State> state_;
  grpc::ByteBuffer buf_;
};

// The last stage's outputs, written back to the coordinator that opened
// this stream. The stage's worker sends through ResultsSink.
class ResultsReactor : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  class Sink : public FrameSink {
   public:
    Sink(ResultsReactor* r, size_t capacity) : reactor_(r), capacity_(capacity) {}

    absl::Status Send(Frame frame) override {
      grpc::ByteBuffer bb;
      absl::Status s = FrameToByteBuffer(frame, &bb);
      if (!s.ok()) return s;
      bool start = false;
      {
        absl::MutexLock lock(&mu_);
        auto room = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return closed_ || queue_.size() < capacity_;
        };
        mu_.Await(absl::Condition(&room));
        if (closed_) return absl::UnavailableError("results stream closed");
        queue_.push_back(std::move(bb));
        if (!writing_) {
          writing_ = true;
          current_ = std::move(queue_.front());
          queue_.pop_front();
          start = true;
        }
        if (start) reactor_->StartWrite(&current_);
      }
      return absl::OkStatus();
    }

    void Close() override {
      absl::MutexLock lock(&mu_);
      closed_ = true;
    }

    // From the reactor's callbacks.
    void WriteDone(bool ok) {
      absl::MutexLock lock(&mu_);
      current_.Clear();
      if (!ok) closed_ = true;
      if (!closed_ && !queue_.empty()) {
        current_ = std::move(queue_.front());
        queue_.pop_front();
        reactor_->StartWrite(&current_);
      } else {
        writing_ = false;
      }
    }

    void Detach() {
      absl::MutexLock lock(&mu_);
      closed_ = true;
      queue_.clear();
    }

   private:
    ResultsReactor* reactor_;
    const size_t capacity_;
    absl::Mutex mu_;
    std::deque<grpc::ByteBuffer> queue_ ABSL_GUARDED_BY(mu_);
    grpc::ByteBuffer current_ ABSL_GUARDED_BY(mu_);
    bool writing_ ABSL_GUARDED_BY(mu_) = false;
    bool closed_ ABSL_GUARDED_BY(mu_) = false;
  };

  ResultsReactor(std::shared_ptr<StageHost> host, size_t capacity)
      : host_(std::move(host)), sink_(std::make_shared<Sink>(this, capacity)) {
    host_->SetSink(sink_);
    StartRead(&buf_);  // only to see the coordinator hang up
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      sink_->Detach();
      Finish(grpc::Status::OK);
      return;
    }
    buf_.Clear();
    StartRead(&buf_);
  }

  void OnWriteDone(bool ok) override { sink_->WriteDone(ok); }

  void OnDone() override {
    sink_->Detach();
    delete this;
  }

 private:
  std::shared_ptr<StageHost> host_;
  std::shared_ptr<Sink> sink_;
  grpc::ByteBuffer buf_;
};

class RejectReactor : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit RejectReactor(grpc::Status s) { Finish(std::move(s)); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  std::string msg(s.message().substr(0, 4096));
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), msg);
}

StageServiceImpl::StageServiceImpl(StageServiceOptions options) : options_(options) {}

StageServiceImpl::~StageServiceImpl() {
  std::map<Key, std::shared_ptr<StageHost>> hosts;
  {
    absl::MutexLock lock(&mu_);
    hosts.swap(hosts_);
  }
}

std::shared_ptr<StageHost> StageServiceImpl::Find(const std::string& model, int stage) {
  absl::MutexLock lock(&mu_);
  auto it = hosts_.find({model, stage});
  return it == hosts_.end() ? nullptr : it->second;
}


grpc::Status StageServiceImpl::LoadStage(grpc::ServerContext*,
                                         grpc::ServerReader<LoadStageRequest>* reader,
                                         LoadStageResponse*) {
  LoadStageRequest req;
  if (!reader->Read(&req) || !req.has_spec()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "LoadStage: the first message must be the stage spec");
  }
  StageSpec spec = req.spec();
  const Graph& graph = spec.stage().graph();
  // Weights arrive in chunks into buffers shaped by the stage's TensorInfos.
  WeightMap weights;
  std::map<std::string, uint64_t> received;
  for (const TensorInfo& info : graph.params()) {
    weights[info.fqn()] = Tensor::Empty(Shape(info.shape().begin(), info.shape().end()));
    received[info.fqn()] = 0;
  }
  while (reader->Read(&req)) {
    if (!req.has_chunk()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "LoadStage: only the first message may be a spec");
    }
    const WeightChunk& c = req.chunk();
    auto it = weights.find(c.fqn());
    if (it == weights.end()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("LoadStage: weight chunk for \"", c.fqn(),
                                       "\", which the stage does not hold"));
    }
    Tensor& t = it->second;
    if (c.offset() > uint64_t(t.byte_size()) ||
        c.data().size() > t.byte_size() - c.offset()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("LoadStage: chunk of \"", c.fqn(),
                                       "\" runs past its ", t.byte_size(), " bytes"));
    }
    std::memcpy(reinterpret_cast<char*>(t.data()) + c.offset(), c.data().data(),
                c.data().size());
    received[c.fqn()] += c.data().size();
  }
  for (const TensorInfo& info : graph.params()) {
    const Tensor& t = weights.at(info.fqn());
    if (received[info.fqn()] != uint64_t(t.byte_size()) ||
        Crc32(t.data(), t.byte_size()) != info.crc32()) {
      return grpc::Status(grpc::StatusCode::DATA_LOSS,
                          absl::StrCat("LoadStage: weights of \"", info.fqn(),
                                       "\" are incomplete or fail their checksum"));
    }
  }
  absl::StatusOr<std::unique_ptr<StageProgram>> program;
  if (options_.backend != nullptr) {
    program = options_.backend->Compile(graph, weights);
  } else {
    CpuBackendOptions cpu;
    cpu.threads = spec.threads() > 0 ? spec.threads() : options_.default_threads;
    program = MakeCpuBackend(cpu)->Compile(graph, weights);
  }
  if (!program.ok()) return ToGrpc(program.status());
  // As many workers as the program can run at once (2 on a GPU: one
  // microbatch's copies overlap the next one's kernels; 1 on the CPU).
  int workers = (*program)->max_concurrent_runs();
  auto host = std::make_shared<StageHost>(spec, *std::move(program),
                                          options_.queue_capacity, workers);
  if (!spec.next_address().empty()) {
    host->SetSink(FrameSender::Create(channels_.To(spec.next_address()), spec.model(),
                                      spec.stage().index() + 1, options_.send_capacity));
  }
  std::shared_ptr<StageHost> old;
  {
    absl::MutexLock lock(&mu_);
    auto& slot = hosts_[{spec.model(), spec.stage().index()}];
    old = std::move(slot);
    slot = host;
  }
  return grpc::Status::OK;  // `old` stops its worker as it goes
}

grpc::Status StageServiceImpl::UnloadStage(grpc::ServerContext*,
                                           const UnloadStageRequest* req,
                                           UnloadStageResponse*) {
  std::shared_ptr<StageHost> old;
  {
    absl::MutexLock lock(&mu_);
    auto it = hosts_.find({req->model(), req->stage()});
    if (it == hosts_.end()) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND,
                          absl::StrCat("stage ", req->stage(), " of model \"",
                                       req->model(), "\" is not loaded here"));
    }
    old = std::move(it->second);
    hosts_.erase(it);
  }
  return grpc::Status::OK;
}

grpc::Status StageServiceImpl::GetStageStats(grpc::ServerContext*,
                                             const StageStatsRequest* req,
                                             StageStatsResponse* resp) {
  std::shared_ptr<StageHost> host = Find(req->model(), req->stage());
  if (host == nullptr) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("stage ", req->stage(), " of model \"",
                                     req->model(), "\" is not loaded here"));
  }
  StageHost::Stats s = host->stats();
  resp->set_frames_processed(s.processed);
  resp->set_frames_dropped_deadline(s.dropped_deadline);
  resp->set_frames_dropped_cancelled(s.dropped_cancelled);
  resp->set_queue_depth(s.queue_depth);
  return grpc::Status::OK;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* StageServiceImpl::Process(
    grpc::CallbackServerContext* ctx) {
  std::string model = Metadata(ctx, kModelKey);
  std::string role = Metadata(ctx, kRoleKey);
  int stage = -1;
  if (!absl::SimpleAtoi(Metadata(ctx, kStageKey), &stage)) {
    return new RejectReactor(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                          "Process: missing pipeserve-stage metadata"));
  }
  std::shared_ptr<StageHost> host = Find(model, stage);
  if (host == nullptr) {
    return new RejectReactor(grpc::Status(
        grpc::StatusCode::FAILED_PRECONDITION,
        absl::StrCat("stage ", stage, " of model \"", model, "\" is not loaded here")));
  }
  if (role == "in") return new InReactor(std::move(host));
  if (role == "results") return new ResultsReactor(std::move(host), options_.send_capacity);
  return new RejectReactor(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                        absl::StrCat("Process: unknown role \"", role, "\"")));
}

}  // namespace pipeserve
