// The client ends of a stage server's frame streams (callback API):
//
// - FrameSender: a FrameSink writing frames into a stage (StageService/
//   Process). One write in flight and a bounded queue behind it (a
//   WriteQueue); Send blocks while the queue is full, up to the frame's
//   deadline, so a slow stage slows its upstream. A broken stream is
//   replaced by a new one on the next Send.
// - ResultsSubscription: receives a last stage's outputs
//   (StageService/Results) and hands each frame to a callback.
//
//   auto to_stage0 = FrameSender::Create(channels, "10.0.0.5:9000", key, 8);
//   RETURN_IF_ERROR(to_stage0->Send(std::move(frame), deadline));
#ifndef PIPESERVE_SERVER_TRANSPORT_FRAME_STREAM_H_
#define PIPESERVE_SERVER_TRANSPORT_FRAME_STREAM_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/pipeserve_service.pb.h"
#include "server/transport/channels.h"
#include "server/transport/frame_sink.h"

namespace pipeserve {

inline constexpr char kProcessMethod[] = "/pipeserve.StageService/Process";
inline constexpr char kResultsMethod[] = "/pipeserve.StageService/Results";
// Process metadata naming the stage.
inline constexpr char kModelKey[] = "pipeserve-model";
inline constexpr char kDeploymentKey[] = "pipeserve-deployment";
inline constexpr char kStageKey[] = "pipeserve-stage";
inline constexpr char kReplicaKey[] = "pipeserve-replica";
// Initial metadata a stage server sends once a Results subscription is in
// place.
inline constexpr char kSubscribedKey[] = "pipeserve-subscribed";

// "stage 2 of \"example\" (deployment 7f3a...)", for messages.
std::string StageKeyName(const StageKey& key);

class FrameSender : public MessageSink {
 public:
  static std::shared_ptr<FrameSender> Create(std::shared_ptr<StageChannels> channels,
                                             std::string address, StageKey key,
                                             size_t queue_capacity);
  ~FrameSender() override;

  // Cancels the stream and waits (up to 5 s) for gRPC to finish with it.
  void Close() override;
  // Set once a stream that carried frames was refused, or ended other than
  // by Close with frames unwritten (FrameSink::Lost).
  absl::Status Lost() const override;

  class Call;
  struct LostState;

 private:
  FrameSender(std::shared_ptr<StageChannels> channels, std::string address, StageKey key,
              size_t capacity);
  // `frames` as one message on the current stream (a new one if it broke).
  absl::Status Push(absl::Span<const Frame> frames, absl::Time deadline) override;

  const std::shared_ptr<StageChannels> channels_;
  const std::string address_;
  const StageKey key_;
  const size_t capacity_;
  const std::shared_ptr<LostState> lost_;  // shared with calls that outlive this
  absl::Mutex mu_;
  std::shared_ptr<Call> call_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

class ResultsSubscription {
 public:
  // Subscribes to the outputs of last stage `key` at `address` and returns
  // once the stage server has put the subscription in place (or with its
  // error, e.g. kNotFound for a stage it does not hold). `on_frame` runs on
  // a gRPC thread for each frame; `on_done` once, when the stream ends
  // after a successful start (with its status).
  static absl::StatusOr<std::unique_ptr<ResultsSubscription>> Start(
      std::shared_ptr<StageChannels> channels, const std::string& address, const StageKey& key,
      std::function<void(Frame)> on_frame, std::function<void(const absl::Status&)> on_done,
      absl::Time deadline);

  // Cancels the stream and waits (up to 5 s) for it to end.
  ~ResultsSubscription();

  class Call;

 private:
  explicit ResultsSubscription(std::shared_ptr<Call> call) : call_(std::move(call)) {}
  std::shared_ptr<Call> call_;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_FRAME_STREAM_H_
