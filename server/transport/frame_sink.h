// Where frames go: the next stage's stream, the coordinator's results
// stream, or (in tests and in-process clusters) straight into a stage.
// Small on purpose, so stage and coordinator cores can be tested without a
// network.
#ifndef PIPESERVE_SERVER_TRANSPORT_FRAME_SINK_H_
#define PIPESERVE_SERVER_TRANSPORT_FRAME_SINK_H_

#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/transport/frame.h"

namespace pipeserve {

class FrameSink {
 public:
  virtual ~FrameSink() = default;

  // Queues `frame` for sending. Blocks while the sink's queue is full (this
  // is how backpressure travels upstream), but not past `deadline`:
  // kDeadlineExceeded then, and the frame is not sent. kUnavailable once
  // the sink is closed or its stream broke (a sink that can reconnect
  // tries again on the next Send). Thread-safe.
  virtual absl::Status Send(Frame frame, absl::Time deadline) = 0;

  // Queues `*frames` (of one request, in order) to go together: a sink on
  // a stream sends them as one message, all or none. Takes out of
  // `*frames` what it queued, so after an error it holds exactly the
  // frames not sent, and a retry sends no frame twice. This default sends
  // them one by one and stops at the first error.
  virtual absl::Status SendAll(std::vector<Frame>* frames, absl::Time deadline) {
    size_t sent = 0;
    absl::Status s;
    while (sent < frames->size()) {
      s = Send((*frames)[sent], deadline);  // a copy: kept if it fails
      if (!s.ok()) break;
      ++sent;
    }
    frames->erase(frames->begin(), frames->begin() + sent);
    return s;
  }

  // Wakes any blocked Send and makes later ones fail. Thread-safe.
  virtual void Close() = 0;

  // Why frames this sink took never arrived (a stream the far end refused,
  // or one that ended, not by Close, with frames it took still unwritten),
  // or OK. Once set it stays: a request those frames carried will not be
  // answered through this sink, so whoever waits on it must treat the path
  // as broken. Thread-safe.
  virtual absl::Status Lost() const { return absl::OkStatus(); }
};

// A sink on a stream: Send and SendAll both queue their frames as one
// message through Push, which takes them all or none.
class MessageSink : public FrameSink {
 public:
  absl::Status Send(Frame frame, absl::Time deadline) override {
    return Push(absl::MakeConstSpan(&frame, 1), deadline);
  }
  absl::Status SendAll(std::vector<Frame>* frames, absl::Time deadline) override {
    absl::Status s = Push(*frames, deadline);
    if (s.ok()) frames->clear();
    return s;
  }

 protected:
  // Queues `frames` as one message (all of them, or none on an error).
  virtual absl::Status Push(absl::Span<const Frame> frames, absl::Time deadline) = 0;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_TRANSPORT_FRAME_SINK_H_
