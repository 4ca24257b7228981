// The client ends of a stage server's Process streams (callback API):
//
// - FrameSender: a FrameSink that writes frames to a stage ("in" role).
//   One write in flight, a bounded queue behind it; Send blocks while the
//   queue is full, so a slow stage slows its upstream (backpressure). A
//   broken stream is replaced by a new one on the next Send.
// - ResultsReceiver: subscribes to a last stage's outputs ("results" role)
//   and hands each frame to a callback.
//
//   auto to_stage0 = FrameSender::Create(channel, "example", 0, 4);
//   RETURN_IF_ERROR(to_stage0->Send(std::move(frame)));
#ifndef PIPESERVE_SERVER_FRAME_STREAM_H_
#define PIPESERVE_SERVER_FRAME_STREAM_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "server/frame_sink.h"

namespace pipeserve {

inline constexpr char kProcessMethod[] = "/pipeserve.StageService/Process";
inline constexpr char kModelKey[] = "pipeserve-model";
inline constexpr char kStageKey[] = "pipeserve-stage";
inline constexpr char kRoleKey[] = "pipeserve-role";

// Channel arguments for stage traffic: no message size limit (frames carry
// whole activations), keepalive so dead peers are noticed.
grpc::ChannelArguments StageChannelArgs();

// The bulk-transfer tuning of StageChannelArgs, for a ServerBuilder too:
//   SetBulkTransferArgs([&](const char* k, int v) { builder.AddChannelArgument(k, v); });
void SetBulkTransferArgs(const std::function<void(const char*, int)>& set);

// One channel (one HTTP/2 connection) per stage server address, made with
// StageChannelArgs on first use. Thread-safe.
class StageChannels {
 public:
  std::shared_ptr<grpc::Channel> To(const std::string& address);

 private:
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_ ABSL_GUARDED_BY(mu_);
};

class FrameSender : public FrameSink {
 public:
  static std::shared_ptr<FrameSender> Create(std::shared_ptr<grpc::Channel> channel,
                                             std::string model, int stage,
                                             size_t queue_capacity);
  ~FrameSender() override;

  absl::Status Send(Frame frame) override;
  // Cancels the stream and waits (up to 5 s) for gRPC to finish with it.
  void Close() override;

  class Call;

 private:
  FrameSender(std::shared_ptr<grpc::Channel> channel, std::string model,
              int stage, size_t capacity);

  const std::shared_ptr<grpc::Channel> channel_;
  const std::string model_;
  const int stage_;
  const size_t capacity_;
  absl::Mutex mu_;
  std::shared_ptr<Call> call_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

class ResultsReceiver {
 public:
  // Starts the subscription. `on_frame` runs on a gRPC thread for each
  // frame; `on_done` once, when the stream ends (with its status).
  static std::shared_ptr<ResultsReceiver> Start(
      std::shared_ptr<grpc::Channel> channel, const std::string& model,
      int stage, std::function<void(Frame)> on_frame,
      std::function<void(const grpc::Status&)> on_done);

  // Ends the subscription (on_done follows).
  virtual void Cancel() = 0;
  // Waits up to `timeout` for the stream to finish; true if it did.
  virtual bool WaitDone(absl::Duration timeout) = 0;
  virtual ~ResultsReceiver() = default;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_FRAME_STREAM_H_
