#include "server/transport/frame_stream.h"

#include <algorithm>
#include <atomic>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/grpc_status.h"
#include "grpcpp/generic/generic_stub.h"
#include "server/transport/write_queue.h"

namespace pipeserve {

std::string StageKeyName(const StageKey& key) {
  return absl::StrCat("stage ", key.stage(), key.replica() > 0 ? absl::StrCat(" replica ", key.replica()) : "",
                      " of \"", key.model(), "\" (deployment ", absl::Hex(key.deployment()), ")");
}

struct FrameSender::LostState {
  mutable absl::Mutex mu;
  absl::Status status ABSL_GUARDED_BY(mu);
};

// One Process call carrying frames to a stage. Owns itself until OnDone.
class FrameSender::Call : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>,
                          public std::enable_shared_from_this<Call> {
 public:
  Call(size_t capacity, std::shared_ptr<LostState> lost, std::string where)
      : lost_(std::move(lost)),
        where_(std::move(where)),
        queue_(
            capacity, [this](const grpc::ByteBuffer* m) { StartWrite(m); },
            // No write starts after the queue closes: the hold that let
            // writes start from other threads can go.
            [this] { RemoveHold(); }, kFrameMergeBytes) {}

  void Start(StageChannels& channels, const std::string& address, const StageKey& key) {
    channels.Prepare(&ctx_);
    ctx_.AddMetadata(kModelKey, key.model());
    ctx_.AddMetadata(kDeploymentKey, absl::StrCat(key.deployment()));
    ctx_.AddMetadata(kStageKey, absl::StrCat(key.stage()));
    ctx_.AddMetadata(kReplicaKey, absl::StrCat(key.replica()));
    self_ = shared_from_this();
    channel_ = channels.To(address);
    grpc::GenericStub stub(channel_);
    stub.PrepareBidiStreamingCall(&ctx_, kProcessMethod, grpc::StubOptions(), this);
    AddHold();             // writes start from Send's threads, not reactions
    StartRead(&ignored_);  // the stage never answers; this sees the end
    StartCall();
  }

  absl::Status Push(absl::Span<const Frame> frames, absl::Time deadline) {
    grpc::ByteBuffer bb;
    absl::Status s = FramesToByteBuffer(frames, &bb);
    if (!s.ok()) return s;
    // Before the push: the stream may end (and OnDone look) the moment
    // the message is in the queue.
    carried_.store(true);
    return queue_.Push(std::move(bb), deadline, frames.size());
  }

  bool broken() const { return queue_.closed(); }

  void Cancel() {
    cancelled_.store(true);
    ctx_.TryCancel();
    queue_.Close("the frame sender was closed");
  }
  bool WaitDone(absl::Duration t) { return finished_.WaitForNotificationWithTimeout(t); }

  void OnWriteDone(bool ok) override { queue_.WriteDone(ok); }

  void OnReadDone(bool) override { queue_.Close("the stage ended the stream"); }

  void OnDone(const grpc::Status& s) override {
    const std::string why = s.ok() ? std::string("the stream finished")
                                   : absl::StrCat("the stream failed: ", s.error_message());
    queue_.Close(why);
    // The far end refused the stream (the stage is not loaded there: a
    // server replaced under the same name), or frames it took were never
    // written: they are lost. A stream that ends after writing all it
    // took (an idle link that broke) loses nothing; the next Send opens
    // another.
    const bool refused = s.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
                         s.error_code() == grpc::StatusCode::NOT_FOUND;
    if (carried_.load() && !cancelled_.load() && (refused || queue_.dropped() > 0)) {
      absl::MutexLock lock(&lost_->mu);
      if (lost_->status.ok()) {
        lost_->status = absl::UnavailableError(
            absl::StrCat("frames sent to ", where_, " may be lost: ", why));
      }
    }
    finished_.Notify();
    self_.reset();  // may delete this
  }

 private:
  const std::shared_ptr<LostState> lost_;
  const std::string where_;  // "stage 2 of ... at host:port"
  std::atomic<bool> carried_{false}, cancelled_{false};
  grpc::ClientContext ctx_;
  std::shared_ptr<grpc::Channel> channel_;
  std::shared_ptr<Call> self_;
  grpc::ByteBuffer ignored_;
  WriteQueue queue_;
  absl::Notification finished_;
};

FrameSender::FrameSender(std::shared_ptr<StageChannels> channels, std::string address,
                         StageKey key, size_t capacity)
    : channels_(std::move(channels)),
      address_(std::move(address)),
      key_(std::move(key)),
      capacity_(std::max<size_t>(1, capacity)),
      lost_(std::make_shared<LostState>()) {}

std::shared_ptr<FrameSender> FrameSender::Create(std::shared_ptr<StageChannels> channels,
                                                 std::string address, StageKey key,
                                                 size_t queue_capacity) {
  return std::shared_ptr<FrameSender>(
      new FrameSender(std::move(channels), std::move(address), std::move(key), queue_capacity));
}

FrameSender::~FrameSender() { Close(); }

absl::Status FrameSender::Push(absl::Span<const Frame> frames, absl::Time deadline) {
  std::shared_ptr<Call> call;
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return absl::UnavailableError("the frame sender is closed");
    if (call_ == nullptr || call_->broken()) {
      call_ = std::make_shared<Call>(capacity_, lost_,
                                     absl::StrCat(StageKeyName(key_), " at ", address_));
      call_->Start(*channels_, address_, key_);
    }
    call = call_;
  }
  absl::Status s = call->Push(frames, deadline);
  if (s.code() == absl::StatusCode::kUnavailable) {
    return absl::UnavailableError(
        absl::StrCat("sending to ", StageKeyName(key_), " at ", address_, ": ", s.message()));
  }
  return s;
}

absl::Status FrameSender::Lost() const {
  absl::MutexLock lock(&lost_->mu);
  return lost_->status;
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

// One Results call: the request goes out as the only message, frames come
// back until the stream ends. Owns itself until OnDone.
class ResultsSubscription::Call
    : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>,
      public std::enable_shared_from_this<Call> {
 public:
  Call(std::function<void(Frame)> on_frame, std::function<void(const absl::Status&)> on_done)
      : on_frame_(std::move(on_frame)), on_done_(std::move(on_done)) {}

  void Start(StageChannels& channels, const std::string& address, const StageKey& key) {
    ResultsRequest req;
    *req.mutable_key() = key;
    std::string bytes = req.SerializeAsString();
    grpc::Slice slice(bytes.data(), bytes.size());
    request_ = grpc::ByteBuffer(&slice, 1);
    channels.Prepare(&ctx_);
    self_ = shared_from_this();
    channel_ = channels.To(address);
    grpc::GenericStub stub(channel_);
    stub.PrepareBidiStreamingCall(&ctx_, kResultsMethod, grpc::StubOptions(), this);
    StartWriteLast(&request_, grpc::WriteOptions());
    StartRead(&buf_);
    StartCall();
  }

  // Waits until the server confirmed the subscription (its initial
  // metadata) or the call ended.
  absl::Status WaitStarted(absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    auto known = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return started_ || done_; };
    if (!mu_.AwaitWithDeadline(absl::Condition(&known), deadline)) {
      return absl::DeadlineExceededError("the stage server did not confirm the subscription");
    }
    if (started_) return absl::OkStatus();
    return final_status_;
  }

  void Cancel() { ctx_.TryCancel(); }
  bool WaitDone(absl::Duration t) { return finished_.WaitForNotificationWithTimeout(t); }

  void OnReadInitialMetadataDone(bool ok) override {
    // A refusal comes back trailers-only, with no initial metadata: only
    // the marker tells a subscription in place from one about to fail.
    const auto& md = ctx_.GetServerInitialMetadata();
    bool subscribed = ok && md.find(kSubscribedKey) != md.end();
    absl::MutexLock lock(&mu_);
    started_ = subscribed;
  }

  void OnWriteDone(bool) override {}

  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows
    std::vector<Frame> frames;  // the stage may have merged several
    absl::Status s = FramesFromByteBuffer(buf_, &frames);
    buf_.Clear();
    if (!s.ok()) {
      // A malformed frame from the stage ends the subscription.
      {
        absl::MutexLock lock(&mu_);
        decode_error_ = s;
      }
      ctx_.TryCancel();
      return;
    }
    for (Frame& frame : frames) on_frame_(std::move(frame));
    StartRead(&buf_);
  }

  void OnDone(const grpc::Status& s) override {
    bool report;
    absl::Status status = FromGrpcStatus(s);
    {
      absl::MutexLock lock(&mu_);
      if (!decode_error_.ok()) status = decode_error_;
      if (status.ok()) status = absl::UnavailableError("the stage ended the results stream");
      final_status_ = status;
      report = started_;
      done_ = true;
    }
    if (report) on_done_(status);
    finished_.Notify();
    self_.reset();  // may delete this
  }

 private:
  const std::function<void(Frame)> on_frame_;
  const std::function<void(const absl::Status&)> on_done_;
  grpc::ClientContext ctx_;
  std::shared_ptr<grpc::Channel> channel_;
  std::shared_ptr<Call> self_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer buf_;
  absl::Notification finished_;
  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_status_ ABSL_GUARDED_BY(mu_);
  absl::Status decode_error_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<std::unique_ptr<ResultsSubscription>> ResultsSubscription::Start(
    std::shared_ptr<StageChannels> channels, const std::string& address, const StageKey& key,
    std::function<void(Frame)> on_frame, std::function<void(const absl::Status&)> on_done,
    absl::Time deadline) {
  auto call = std::make_shared<Call>(std::move(on_frame), std::move(on_done));
  call->Start(*channels, address, key);
  absl::Status started = call->WaitStarted(deadline);
  if (!started.ok()) {
    call->Cancel();
    call->WaitDone(absl::Seconds(5));
    return absl::Status(started.code(),
                        absl::StrCat("subscribing to the results of ", StageKeyName(key), " at ",
                                     address, ": ", started.message()));
  }
  return std::unique_ptr<ResultsSubscription>(new ResultsSubscription(std::move(call)));
}

ResultsSubscription::~ResultsSubscription() {
  call_->Cancel();
  call_->WaitDone(absl::Seconds(5));
}

}  // namespace pipeserve
