// Fuzz target: activation frames as they arrive off the network, in
// however many slices gRPC hands over (the input's first byte picks where
// the bytes are cut), then as a stage admits them against its plan.
#include <cstdint>
#include <vector>

#include "grpcpp/support/byte_buffer.h"
#include "server/transport/frame.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t cut = data[0];
  const char* bytes = reinterpret_cast<const char*>(data) + 1;
  const size_t n = size - 1;
  // Slices of 1 + (cut % 61) bytes, or the whole buffer for cut 0.
  std::vector<grpc::Slice> slices;
  size_t step = cut == 0 ? (n == 0 ? 1 : n) : 1 + cut % 61;
  for (size_t off = 0; off < n; off += step) {
    slices.emplace_back(bytes + off, std::min(step, n - off));
  }
  grpc::ByteBuffer bb(slices.data(), slices.size());
  std::vector<pipeserve::Frame> frames;  // a message may hold several
  absl::Status s = pipeserve::FramesFromByteBuffer(bb, &frames);
  if (!s.ok()) return 0;
  if (frames.empty() || frames.size() > pipeserve::kMaxFramesPerMessage) __builtin_trap();
  // Whatever decodes must describe itself consistently and re-encode.
  for (const pipeserve::Frame& frame : frames) {
    if (static_cast<size_t>(frame.header.tensors_size()) != frame.tensors.size()) __builtin_trap();
    for (const pipeserve::Tensor& t : frame.tensors) {
      if (t.numel() > 0 && t.data() == nullptr) __builtin_trap();
      // A stage's kernels walk every position a tensor spans, elements or not.
      if (pipeserve::ShapeExtent(t.shape()) > pipeserve::kMaxDataExtent) __builtin_trap();
    }
    grpc::ByteBuffer again;
    if (!pipeserve::FrameToByteBuffer(frame, &again).ok()) __builtin_trap();
  }
  return 0;
}
