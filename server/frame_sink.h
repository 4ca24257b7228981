// Where a stage sends the frames it made: the next stage's stream, or the
// coordinator's results stream. Small on purpose, so the stage core can be
// tested without a network.
#ifndef PIPESERVE_SERVER_FRAME_SINK_H_
#define PIPESERVE_SERVER_FRAME_SINK_H_

#include "absl/status/status.h"
#include "server/frame.h"

namespace pipeserve {

class FrameSink {
 public:
  virtual ~FrameSink() = default;

  // Queues `frame` for sending. Blocks while the sink's queue is full: this
  // is how backpressure travels upstream. kUnavailable once the sink is
  // closed (the stream broke or ended). Thread-safe.
  virtual absl::Status Send(Frame frame) = 0;

  // Wakes any blocked Send and makes later ones fail. Thread-safe.
  virtual void Close() = 0;
};

}  // namespace pipeserve

#endif  // PIPESERVE_SERVER_FRAME_SINK_H_
