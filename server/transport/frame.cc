#include "server/transport/frame.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace pipeserve {
namespace {

// Releases the tensor storage a zero-copy slice referenced.
void ReleaseStorage(void* user_data) {
  delete static_cast<std::shared_ptr<const void>*>(user_data);
}

// Reads sequentially across a list of slices.
class SliceReader {
 public:
  explicit SliceReader(const std::vector<grpc::Slice>& slices) : slices_(slices) {}

  uint64_t remaining() const { return remaining_; }

  void Init() {
    remaining_ = 0;
    for (const grpc::Slice& s : slices_) remaining_ += s.size();
  }

  // Copies n bytes into dst.
  void Copy(void* dst, uint64_t n) {
    char* out = static_cast<char*>(dst);
    while (n > 0) {
      const grpc::Slice& s = slices_[index_];
      uint64_t take = std::min<uint64_t>(n, s.size() - offset_);
      std::memcpy(out, s.begin() + offset_, take);
      out += take;
      Advance(take);
      n -= take;
    }
  }

  // A pointer to the next n bytes if they lie in one slice (and the slice
  // index, to keep it alive), else nullptr; does not advance.
  const uint8_t* Contiguous(uint64_t n, size_t* slice_index) {
    SkipEmpty();
    if (index_ >= slices_.size()) return nullptr;
    const grpc::Slice& s = slices_[index_];
    if (s.size() - offset_ < n) return nullptr;
    *slice_index = index_;
    return s.begin() + offset_;
  }

  void Advance(uint64_t n) {
    remaining_ -= n;
    while (n > 0) {
      uint64_t left = slices_[index_].size() - offset_;
      if (n < left) {
        offset_ += n;
        return;
      }
      n -= left;
      ++index_;
      offset_ = 0;
    }
    SkipEmpty();
  }

 private:
  void SkipEmpty() {
    while (index_ < slices_.size() && offset_ == slices_[index_].size()) {
      ++index_;
      offset_ = 0;
    }
  }

  const std::vector<grpc::Slice>& slices_;
  size_t index_ = 0;
  uint64_t offset_ = 0;
  uint64_t remaining_ = 0;
};

std::atomic<uint64_t> g_wrapped_bytes{0};
std::atomic<uint64_t> g_copied_bytes{0};
std::atomic<uint64_t> g_messages{0};
std::atomic<uint64_t> g_frames{0};
std::atomic<uint64_t> g_largest_slice{0};

void NoteSliceSize(uint64_t size) {
  uint64_t seen = g_largest_slice.load(std::memory_order_relaxed);
  while (size > seen && !g_largest_slice.compare_exchange_weak(seen, size)) {
  }
}

}  // namespace

absl::Time FrameClockNow() { return absl::FromChrono(std::chrono::system_clock::now()); }

absl::Time FrameDeadline(const Frame& frame) {
  int64_t us = frame.header.deadline_us();
  return us == 0 ? absl::InfiniteFuture() : absl::FromUnixMicros(us);
}

FrameReceiveStats GetFrameReceiveStats() {
  return {g_wrapped_bytes.load(), g_copied_bytes.load(), g_messages.load(), g_frames.load(),
          g_largest_slice.load()};
}

void Frame::Add(const std::string& name, const Tensor& t) {
  FrameHeader::TensorMeta* meta = header.add_tensors();
  meta->set_name(name);
  for (int64_t d : t.shape()) meta->add_shape(d);
  if (t.dtype() != DT_FLOAT32) meta->set_dtype(t.dtype());
  tensors.push_back(t);
}

const Tensor* Frame::Find(const std::string& name) const {
  for (int i = 0; i < header.tensors_size() && i < static_cast<int>(tensors.size()); ++i) {
    if (header.tensors(i).name() == name) return &tensors[i];
  }
  return nullptr;
}

absl::Status FrameToByteBuffer(const Frame& frame, grpc::ByteBuffer* out) {
  return FramesToByteBuffer(absl::MakeConstSpan(&frame, 1), out);
}

absl::Status FramesToByteBuffer(absl::Span<const Frame> frames, grpc::ByteBuffer* out) {
  std::vector<grpc::Slice> slices;
  for (const Frame& frame : frames) {
    if (static_cast<size_t>(frame.header.tensors_size()) != frame.tensors.size()) {
      return absl::InternalError(absl::StrCat(
          "frame has ", frame.header.tensors_size(), " tensor headers but ",
          frame.tensors.size(), " tensors"));
    }
  }
  for (const Frame& frame : frames) {
    std::string head(4, '\0');
    uint32_t n = static_cast<uint32_t>(frame.header.ByteSizeLong());
    for (int i = 0; i < 4; ++i) head[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    frame.header.AppendToString(&head);
    slices.emplace_back(head.data(), head.size());  // copies the small header
    for (const Tensor& t : frame.tensors) {
      if (t.byte_size() == 0) continue;
      auto* keep = new std::shared_ptr<const void>(t.storage());
      slices.emplace_back(static_cast<void*>(t.raw_data()), t.byte_size(),
                          &ReleaseStorage, keep);
    }
  }
  *out = grpc::ByteBuffer(slices.data(), slices.size());
  return absl::OkStatus();
}

namespace {

// Reads a frame's header (after its length prefix) into frame->header and
// checks its kind, error code and that only DATA frames carry tensors.
absl::Status ParseHeader(SliceReader& reader, Frame* frame) {
  if (reader.remaining() < 4) return absl::DataLossError("frame shorter than its length prefix");
  uint8_t len_bytes[4];
  reader.Copy(len_bytes, 4);
  uint32_t header_len = len_bytes[0] | (len_bytes[1] << 8) | (len_bytes[2] << 16) |
                        (uint32_t{len_bytes[3]} << 24);
  if (reader.remaining() < header_len) {
    return absl::DataLossError(absl::StrCat("frame header of ", header_len,
                                            " bytes is truncated"));
  }
  std::string header(header_len, '\0');
  reader.Copy(header.data(), header_len);
  frame->tensors.clear();
  if (!frame->header.ParseFromString(header)) {
    return absl::DataLossError("frame header is not a valid FrameHeader");
  }
  const FrameHeader& h = frame->header;
  if (!FrameHeader::Kind_IsValid(h.kind())) {
    return absl::InvalidArgumentError(absl::StrCat("frame kind ", h.kind(), " does not exist"));
  }
  if (h.kind() == FrameHeader::ERROR &&
      (h.error_code() <= 0 || h.error_code() > static_cast<int>(absl::StatusCode::kUnauthenticated))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ERROR frame for request ", h.request_id(), " carries no valid error code (",
        h.error_code(), ")"));
  }
  if (h.kind() != FrameHeader::DATA && h.tensors_size() > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        FrameHeader::Kind_Name(h.kind()), " frame carries ", h.tensors_size(), " tensors"));
  }
  return absl::OkStatus();
}

// Reads the tensor `meta` describes, wrapping the received bytes where
// they lie in one element-aligned region, copying them otherwise.
absl::StatusOr<Tensor> ReadTensor(SliceReader& reader,
                                  const std::shared_ptr<std::vector<grpc::Slice>>& held,
                                  const FrameHeader::TensorMeta& meta) {
  Shape shape(meta.shape().begin(), meta.shape().end());
  DataType dtype = meta.dtype() == DT_INVALID ? DT_FLOAT32 : meta.dtype();
  if (!IsValidDataType(dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "frame tensor \"", meta.name(), "\": unknown dtype ", static_cast<int>(meta.dtype())));
  }
  const int align = ElementSize(dtype);
  absl::StatusOr<uint64_t> size = CheckedDataByteSize(shape, align);
  if (!size.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame tensor \"", meta.name(), "\": ", size.status().message()));
  }
  const uint64_t bytes = *size;
  if (reader.remaining() < bytes) {
    return absl::DataLossError(absl::StrCat(
        "frame tensor \"", meta.name(), "\" ", ShapeToString(shape), " needs ",
        bytes, " bytes, ", reader.remaining(), " left"));
  }
  size_t slice_index = 0;
  const uint8_t* p = bytes > 0 ? reader.Contiguous(bytes, &slice_index) : nullptr;
  if (p != nullptr && reinterpret_cast<uintptr_t>(p) % align == 0) {
    reader.Advance(bytes);
    g_wrapped_bytes += bytes;
    return Tensor::Wrap(held, const_cast<uint8_t*>(p), shape, dtype);
  }
  Tensor t = Tensor::Empty(shape, dtype);
  reader.Copy(t.raw_data(), bytes);
  g_copied_bytes += bytes;
  return t;
}

// Parses the frame at `reader`'s position, leaving it after the frame's
// tensors. Tensors lying in one aligned slice wrap it (kept alive by
// `held`), others are copied once.
absl::Status ParseFrame(SliceReader& reader, const std::shared_ptr<std::vector<grpc::Slice>>& held,
                        Frame* frame) {
  RETURN_IF_ERROR(ParseHeader(reader, frame));
  for (const FrameHeader::TensorMeta& meta : frame->header.tensors()) {
    ASSIGN_OR_RETURN(Tensor t, ReadTensor(reader, held, meta));
    frame->tensors.push_back(std::move(t));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status FramesFromByteBuffer(const grpc::ByteBuffer& in, std::vector<Frame>* frames) {
  frames->clear();
  auto held = std::make_shared<std::vector<grpc::Slice>>();  // keeps wrapped tensors' bytes
  grpc::Status st = in.Dump(held.get());
  if (!st.ok()) return absl::DataLossError("cannot read frame bytes");
  for (const grpc::Slice& s : *held) NoteSliceSize(s.size());
  SliceReader reader(*held);
  reader.Init();
  do {
    if (frames->size() == kMaxFramesPerMessage) {
      return absl::InvalidArgumentError(absl::StrCat(
          "message holds more than ", kMaxFramesPerMessage, " frames"));
    }
    frames->emplace_back();
    absl::Status s = ParseFrame(reader, held, &frames->back());
    if (!s.ok()) {
      if (frames->size() == 1) return s;
      return absl::Status(s.code(), absl::StrCat("frame ", frames->size() - 1,
                                                 " of the message: ", s.message()));
    }
  } while (reader.remaining() > 0);
  g_messages += 1;
  g_frames += frames->size();
  return absl::OkStatus();
}

absl::Status FrameFromByteBuffer(const grpc::ByteBuffer& in, Frame* frame) {
  std::vector<Frame> frames;
  RETURN_IF_ERROR(FramesFromByteBuffer(in, &frames));
  if (frames.size() != 1) {
    return absl::DataLossError(
        absl::StrCat("message holds ", frames.size(), " frames where one was expected"));
  }
  *frame = std::move(frames[0]);
  return absl::OkStatus();
}

}  // namespace pipeserve

namespace grpc {

Status SerializationTraits<pipeserve::Frame, void>::Serialize(
    const pipeserve::Frame& frame, ByteBuffer* bb, bool* own_buffer) {
  *own_buffer = true;
  absl::Status s = pipeserve::FrameToByteBuffer(frame, bb);
  return s.ok() ? Status::OK
                : Status(StatusCode::INTERNAL, std::string(s.message()));
}

Status SerializationTraits<pipeserve::Frame, void>::Deserialize(
    ByteBuffer* bb, pipeserve::Frame* frame) {
  absl::Status s = pipeserve::FrameFromByteBuffer(*bb, frame);
  bb->Clear();
  return s.ok() ? Status::OK
                : Status(StatusCode::INTERNAL, std::string(s.message()));
}

}  // namespace grpc
