// Activation frames: what flows along a pipeline's gRPC streams. A frame is
// a FrameHeader (request id, microbatch, deadline, tensor names and shapes)
// plus the tensors' bytes, which travel outside protobuf:
//
//   wire: [uint32 LE header length][FrameHeader bytes][tensor 0 bytes]...
//
// One gRPC message holds one frame or several back to back (a sender
// coalesces the frames queued for a stream into one write: see
// WriteQueue), so a receiver reads them with FramesFromByteBuffer.
//
// Sending takes no copy of tensor bytes (each becomes a gRPC slice that
// holds a reference to the tensor's storage); receiving wraps the received
// slice when a tensor lies inside one, else copies it once. gRPC picks this
// up through SerializationTraits<Frame>, so ClientBidiReactor<Frame, Frame>
// and TemplatedGenericStub<Frame, Frame> work with frames directly.
//
//   Frame f;
//   f.header.set_request_id(7);
//   f.Add("x", x_tensor);
//   grpc::ByteBuffer bb;
//   RETURN_IF_ERROR(FrameToByteBuffer(f, &bb));
#ifndef PIPESERVE_SERVER_TRANSPORT_FRAME_H_
#define PIPESERVE_SERVER_TRANSPORT_FRAME_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/impl/serialization_traits.h"
#include "grpcpp/support/status.h"
#include "proto/pipeserve_service.pb.h"
#include "runtime/tensor.h"

namespace pipeserve {

struct Frame {
  FrameHeader header;
  // tensors[i] is described by header.tensors(i).
  std::vector<Tensor> tensors;

  // Appends a named tensor (header entry and data).
  void Add(const std::string& name, const Tensor& t);
  // The tensor called `name`, or nullptr.
  const Tensor* Find(const std::string& name) const;
};

// The deadline a frame carries (FrameHeader::deadline_us), or
// InfiniteFuture when it has none.
absl::Time FrameDeadline(const Frame& frame);

// Now, on the clock of every time a frame carries (deadline_us, sent_us,
// trace spans): the kernel's clock, which every process on a host reads
// alike. (absl::Now() may interpolate the cycle counter per process; mixed
// with the kernel's clock, a trace's spans came out of order.)
absl::Time FrameClockNow();

// Serializes `frame`; tensor bytes are referenced, not copied.
absl::Status FrameToByteBuffer(const Frame& frame, grpc::ByteBuffer* out);
// Serializes `frames` back to back into one message (read back with
// FramesFromByteBuffer); tensor bytes are referenced, not copied.
absl::Status FramesToByteBuffer(absl::Span<const Frame> frames, grpc::ByteBuffer* out);

// Process-wide counts of received tensor bytes that were wrapped in place
// and that had to be copied (they spanned gRPC slices).
struct FrameReceiveStats {
  uint64_t wrapped_bytes = 0;
  uint64_t copied_bytes = 0;
  // Messages parsed by FramesFromByteBuffer, and the frames they held.
  uint64_t messages = 0;
  uint64_t frames = 0;
  // The largest slice gRPC handed over in one message. A tensor larger
  // than this cannot be wrapped: it spans slices and is copied.
  uint64_t largest_slice = 0;
};
FrameReceiveStats GetFrameReceiveStats();

// Parses a frame from bytes that came off the network, trusting nothing:
// kDataLoss for a truncated or malformed buffer (naming what is short);
// kInvalidArgument for a frame kind that does not exist, a shape that
// cannot exist (negative or overflowing, see CheckedByteSize), an ERROR
// frame without an error code, or tensors on a frame that is not DATA.
// Nothing is allocated beyond the bytes actually received. Expects exactly
// one frame (kDataLoss for more).
absl::Status FrameFromByteBuffer(const grpc::ByteBuffer& in, Frame* frame);

// Most frames one message may hold.
inline constexpr size_t kMaxFramesPerMessage = 256;
// Frames queued for one stream are sent together in messages of up to this
// many bytes (a WriteQueue's merge_bytes); a larger frame goes alone.
inline constexpr size_t kFrameMergeBytes = size_t{4} << 20;
// A frame goes as one gRPC message, which holds at most 2 GiB (stage
// servers take messages up to --max_message_mb, 2047 MiB by default): a
// stage whose outputs for one microbatch come to more fails that
// microbatch instead of breaking its link.
inline constexpr uint64_t kMaxFrameTensorBytes = uint64_t{2046} << 20;

// Parses every frame of a message (one or more back to back), with the
// checks of FrameFromByteBuffer on each; an error in a later frame names
// it ("frame 2 of the message: ..."). kInvalidArgument beyond
// kMaxFramesPerMessage frames.
absl::Status FramesFromByteBuffer(const grpc::ByteBuffer& in, std::vector<Frame>* frames);

}  // namespace pipeserve

namespace grpc {

template <>
class SerializationTraits<pipeserve::Frame, void> {
 public:
  static Status Serialize(const pipeserve::Frame& frame, ByteBuffer* bb,
                          bool* own_buffer);
  static Status Deserialize(ByteBuffer* bb, pipeserve::Frame* frame);
};

}  // namespace grpc

#endif  // PIPESERVE_SERVER_TRANSPORT_FRAME_H_
