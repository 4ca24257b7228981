#include "server/frame_stream.h"

#include <deque>

#include "absl/synchronization/notification.h"

#include "absl/strings/str_cat.h"
#include "grpcpp/generic/generic_stub.h"

namespace pipeserve {

void SetBulkTransferArgs(const std::function<void(const char*, int)>& set) {
  // Activations are large: read the socket in big chunks (fewer syscalls
  // and slices, so a received tensor is more often one contiguous slice
  // that needs no copy) and let a stream run ahead of flow control.
  set(GRPC_ARG_TCP_READ_CHUNK_SIZE, 4 << 20);
  set(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 256 << 10);
  set(GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, 64 << 20);
  set(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
  set(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 16 << 20);
}

grpc::ChannelArguments StageChannelArgs() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  SetBulkTransferArgs([&](const char* k, int v) { args.SetInt(k, v); });
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  return args;
}

std::shared_ptr<grpc::Channel> StageChannels::To(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto& c = channels_[address];
  if (!c) {
    c = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), StageChannelArgs());
  }
  return c;
}

using FrameStub = grpc::TemplatedGenericStub<Frame, Frame>;

// One Process RPC carrying frames to a stage. Owns itself until OnDone.
class FrameSender::Call : public grpc::ClientBidiReactor<Frame, Frame>,
                          public std::enable_shared_from_this<Call> {
 public:
  Call(size_t capacity) : capacity_(capacity) {}

  void Start(grpc::ChannelInterface* channel, std::shared_ptr<grpc::Channel> keep,
             const std::string& model, int stage) {
    channel_ = std::move(keep);
    ctx_.AddMetadata(kModelKey, model);
    ctx_.AddMetadata(kStageKey, absl::StrCat(stage));
    ctx_.AddMetadata(kRoleKey, "in");
    self_ = shared_from_this();
    FrameStub stub(channel_);
    stub.PrepareBidiStreamingCall(&ctx_, kProcessMethod, grpc::StubOptions(), this);
    StartRead(&ignored_);  // the stage never answers; this sees the end
    StartCall();
  }

  // Queues a frame, blocking while the queue is full.
  absl::Status Enqueue(Frame f) {
    bool start = false;
    {
      absl::MutexLock lock(&mu_);
      auto room = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return done_ || queue_.size() < capacity_;
      };
      mu_.Await(absl::Condition(&room));
      if (done_) return absl::UnavailableError(absl::StrCat("stage stream closed: ", error_));
      queue_.push_back(std::move(f));
      if (!writing_) {
        writing_ = true;
        current_ = std::move(queue_.front());
        queue_.pop_front();
        start = true;
      }
    }
    if (start) StartWrite(&current_);
    return absl::OkStatus();
  }

  bool broken() {
    absl::MutexLock lock(&mu_);
    return done_;
  }

  void Cancel() { ctx_.TryCancel(); }
  bool WaitDone(absl::Duration t) { return finished_.WaitForNotificationWithTimeout(t); }

  void OnWriteDone(bool ok) override {
    bool more = false;
    {
      absl::MutexLock lock(&mu_);
      current_ = Frame();  // release the tensors just sent
      if (!ok) {
        MarkDone("write failed");
      } else if (!queue_.empty()) {
        current_ = std::move(queue_.front());
        queue_.pop_front();
        more = true;
      } else {
        writing_ = false;
      }
    }
    if (more) StartWrite(&current_);
  }

  void OnReadDone(bool) override {
    absl::MutexLock lock(&mu_);
    MarkDone("the stage ended the stream");
  }

  void OnDone(const grpc::Status& s) override {
    {
      absl::MutexLock lock(&mu_);
      MarkDone(s.ok() ? std::string("finished") : s.error_message());
      queue_.clear();
    }
    finished_.Notify();
    self_.reset();  // may delete this
  }

 private:
  void MarkDone(const std::string& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!done_) error_ = why;
    done_ = true;
  }

  const size_t capacity_;
  std::shared_ptr<grpc::Channel> channel_;
  grpc::ClientContext ctx_;
  std::shared_ptr<Call> self_;
  Frame ignored_;
  Frame current_;
  absl::Notification finished_;
  absl::Mutex mu_;
  std::deque<Frame> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  std::string error_ ABSL_GUARDED_BY(mu_);
};

FrameSender::FrameSender(std::shared_ptr<grpc::Channel> channel, std::string model,
                         int stage, size_t capacity)
    : channel_(std::move(channel)),
      model_(std::move(model)),
      stage_(stage),
      capacity_(std::max<size_t>(1, capacity)) {}

std::shared_ptr<FrameSender> FrameSender::Create(std::shared_ptr<grpc::Channel> channel,
                                                 std::string model, int stage,
                                                 size_t queue_capacity) {
  return std::shared_ptr<FrameSender>(
      new FrameSender(std::move(channel), std::move(model), stage, queue_capacity));
}

FrameSender::~FrameSender() { Close(); }

absl::Status FrameSender::Send(Frame frame) {
  std::shared_ptr<Call> call;
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return absl::UnavailableError("frame sender closed");
    if (call_ == nullptr || call_->broken()) {
      call_ = std::make_shared<Call>(capacity_);
      call_->Start(channel_.get(), channel_, model_, stage_);
    }
    call = call_;
  }
  return call->Enqueue(std::move(frame));
}

void FrameSender::Close() {
  std::shared_ptr<Call> call;
  {
    absl::MutexLock lock(&mu_);
    closed_ = true;
    call = std::move(call_);
  }
  if (call) {
    call->Cancel();
    call->WaitDone(absl::Seconds(5));
  }
}

namespace {

class ResultsCall : public ResultsReceiver,
                    public grpc::ClientBidiReactor<Frame, Frame> {
 public:
  ResultsCall(std::function<void(Frame)> on_frame,
              std::function<void(const grpc::Status&)> on_done)
      : on_frame_(std::move(on_frame)), on_done_(std::move(on_done)) {}

  void Start(std::shared_ptr<grpc::Channel> channel, const std::string& model,
             int stage, std::shared_ptr<ResultsCall> self) {
    channel_ = std::move(channel);
    self_ = std::move(self);
    ctx_.AddMetadata(kModelKey, model);
    ctx_.AddMetadata(kStageKey, absl::StrCat(stage));
    ctx_.AddMetadata(kRoleKey, "results");
    FrameStub stub(channel_);
    stub.PrepareBidiStreamingCall(&ctx_, kProcessMethod, grpc::StubOptions(), this);
    StartRead(&frame_);
    StartCall();
  }

  void Cancel() override { ctx_.TryCancel(); }
  bool WaitDone(absl::Duration t) override { return finished_.WaitForNotificationWithTimeout(t); }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows
    on_frame_(std::move(frame_));
    frame_ = Frame();
    StartRead(&frame_);
  }

  void OnDone(const grpc::Status& s) override {
    on_done_(s);
    finished_.Notify();
    self_.reset();
  }

 private:
  std::function<void(Frame)> on_frame_;
  std::function<void(const grpc::Status&)> on_done_;
  std::shared_ptr<grpc::Channel> channel_;
  std::shared_ptr<ResultsCall> self_;
  grpc::ClientContext ctx_;
  Frame frame_;
  absl::Notification finished_;
};

}  // namespace

std::shared_ptr<ResultsReceiver> ResultsReceiver::Start(
    std::shared_ptr<grpc::Channel> channel, const std::string& model, int stage,
    std::function<void(Frame)> on_frame,
    std::function<void(const grpc::Status&)> on_done) {
  auto call = std::make_shared<ResultsCall>(std::move(on_frame), std::move(on_done));
  call->Start(std::move(channel), model, stage, call);
  return call;
}

}  // namespace pipeserve
