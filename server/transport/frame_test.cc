#include "server/transport/frame.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

Tensor Iota(Shape s, float start) {
  Tensor t = Tensor::Empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = start + i;
  return t;
}

TEST(FrameTest, RoundTripsHeaderAndTensors) {
  Frame f;
  f.header.set_request_id(42);
  f.header.set_microbatch(3);
  f.header.set_deadline_us(123456789);
  f.Add("x", Iota({2, 3}, 0));
  f.Add("empty", Tensor::Empty({0, 5}));
  f.Add("skip", Iota({4}, 100));
  grpc::ByteBuffer bb;
  ASSERT_TRUE(FrameToByteBuffer(f, &bb).ok());
  Frame g;
  ASSERT_TRUE(FrameFromByteBuffer(bb, &g).ok());
  EXPECT_EQ(g.header.request_id(), 42u);
  EXPECT_EQ(g.header.microbatch(), 3);
  EXPECT_EQ(g.header.deadline_us(), 123456789);
  ASSERT_EQ(g.tensors.size(), 3u);
  EXPECT_EQ(g.tensors[0].shape(), (Shape{2, 3}));
  EXPECT_EQ(g.tensors[0].data()[5], 5.0f);
  EXPECT_EQ(g.tensors[1].numel(), 0);
  ASSERT_NE(g.Find("skip"), nullptr);
  EXPECT_EQ(g.Find("skip")->data()[3], 103.0f);
}

// Two frames' bytes back to back in one message, as a WriteQueue that
// merges sends them.
grpc::ByteBuffer Concat(const std::vector<grpc::ByteBuffer>& parts) {
  std::vector<grpc::Slice> slices;
  for (const grpc::ByteBuffer& bb : parts) {
    std::vector<grpc::Slice> more;
    EXPECT_TRUE(bb.Dump(&more).ok());
    slices.insert(slices.end(), more.begin(), more.end());
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

TEST(FrameTest, AMessageOfSeveralFramesParsesIntoEachInOrder) {
  std::vector<grpc::ByteBuffer> parts(3);
  for (int i = 0; i < 3; ++i) {
    Frame f;
    f.header.set_request_id(10 + i);
    if (i != 1) f.Add("x", Iota({2, 2}, 10.0f * i));  // the middle one has no tensor
    ASSERT_TRUE(FrameToByteBuffer(f, &parts[i]).ok());
  }
  std::vector<Frame> frames;
  ASSERT_TRUE(FramesFromByteBuffer(Concat(parts), &frames).ok());
  ASSERT_EQ(frames.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(frames[i].header.request_id(), 10u + i);
  EXPECT_TRUE(frames[1].tensors.empty());
  ASSERT_EQ(frames[2].tensors.size(), 1u);
  EXPECT_EQ(frames[2].tensors[0].data()[3], 23.0f);
  // Where exactly one frame is expected, more is an error.
  Frame one;
  absl::Status s = FrameFromByteBuffer(Concat(parts), &one);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("holds 3 frames where one was expected"));
}

TEST(FrameTest, FramesSerializedTogetherParseBackInOrder) {
  std::vector<Frame> out(3);
  for (int i = 0; i < 3; ++i) {
    out[i].header.set_request_id(5);
    out[i].header.set_microbatch(i);
    out[i].Add("x", Iota({1 + i, 4}, 100 * i));
  }
  grpc::ByteBuffer bb;
  ASSERT_TRUE(FramesToByteBuffer(out, &bb).ok());
  std::vector<Frame> back;
  ASSERT_TRUE(FramesFromByteBuffer(bb, &back).ok());
  ASSERT_EQ(back.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(back[i].header.microbatch(), i);
    ASSERT_EQ(back[i].tensors.size(), 1u);
    EXPECT_EQ(back[i].tensors[0].shape(), Shape({1 + i, 4}));
    EXPECT_EQ(back[i].tensors[0].data()[1], 100.0f * i + 1);
  }
  // A frame whose headers and tensors disagree fails the whole message.
  out[1].tensors.clear();
  EXPECT_EQ(FramesToByteBuffer(out, &bb).code(), absl::StatusCode::kInternal);
}

TEST(FrameTest, ABadFrameLaterInAMessageIsNamedAndBytesAfterTheLastAreRefused) {
  Frame f;
  f.Add("x", Iota({2, 2}, 0));
  grpc::ByteBuffer good;
  ASSERT_TRUE(FrameToByteBuffer(f, &good).ok());
  grpc::Slice junk("\x05\x00", 2);  // a length prefix cut short
  std::vector<Frame> frames;
  absl::Status s = FramesFromByteBuffer(Concat({good, good, grpc::ByteBuffer(&junk, 1)}), &frames);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("frame 2 of the message: frame shorter than its length prefix"));
  // More frames than a message may hold.
  std::vector<grpc::ByteBuffer> many(kMaxFramesPerMessage + 1, good);
  s = FramesFromByteBuffer(Concat(many), &frames);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("more than 256 frames"));
}

TEST(FrameTest, SendingDoesNotCopyTensorBytes) {
  Frame f;
  Tensor big = Iota({256, 512}, 0);
  f.Add("a", big);
  grpc::ByteBuffer bb;
  ASSERT_TRUE(FrameToByteBuffer(f, &bb).ok());
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(bb.Dump(&slices).ok());
  ASSERT_EQ(slices.size(), 2u);
  // The second slice is the tensor's own storage.
  EXPECT_EQ(static_cast<const void*>(slices[1].begin()),
            static_cast<const void*>(big.data()));
  // And the slice keeps the storage alive after the tensor goes.
  EXPECT_FALSE(big.SoleOwner());
}

TEST(FrameTest, TruncatedFrameIsDataLossNamingTheTensor) {
  Frame f;
  f.Add("x", Iota({4, 4}, 0));
  grpc::ByteBuffer bb;
  ASSERT_TRUE(FrameToByteBuffer(f, &bb).ok());
  grpc::Slice whole;
  ASSERT_TRUE(bb.DumpToSingleSlice(&whole).ok());
  grpc::Slice cut(whole.begin(), whole.size() - 8);
  grpc::ByteBuffer short_bb(&cut, 1);
  Frame g;
  absl::Status s = FrameFromByteBuffer(short_bb, &g);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("frame tensor \"x\" [4,4] needs 64 bytes"));
}

TEST(FrameTest, TensorSpanningSlicesIsCopiedIntact) {
  Frame f;
  f.Add("x", Iota({3, 5}, 1));
  grpc::ByteBuffer bb;
  ASSERT_TRUE(FrameToByteBuffer(f, &bb).ok());
  grpc::Slice whole;
  ASSERT_TRUE(bb.DumpToSingleSlice(&whole).ok());
  // Re-slice at odd offsets so the tensor straddles three slices.
  std::vector<grpc::Slice> parts;
  size_t cuts[] = {0, 7, whole.size() - 33, whole.size() - 5, whole.size()};
  for (int i = 0; i + 1 < 5; ++i) {
    parts.emplace_back(whole.begin() + cuts[i], cuts[i + 1] - cuts[i]);
  }
  grpc::ByteBuffer split(parts.data(), parts.size());
  Frame g;
  ASSERT_TRUE(FrameFromByteBuffer(split, &g).ok());
  for (int i = 0; i < 15; ++i) EXPECT_EQ(g.tensors[0].data()[i], 1.0f + i);
}

// A frame as an attacker would write it: any header, any trailing bytes.
grpc::ByteBuffer RawFrame(const FrameHeader& header, const std::string& payload) {
  std::string head(4, '\0');
  uint32_t n = static_cast<uint32_t>(header.ByteSizeLong());
  for (int i = 0; i < 4; ++i) head[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  header.AppendToString(&head);
  head += payload;
  grpc::Slice s(head.data(), head.size());
  return grpc::ByteBuffer(&s, 1);
}

// Regression: 2^62 elements "needed" 0 bytes after `n * 4` wrapped, so a
// header alone passed for a tensor of 16 EiB.
TEST(FrameTest, ShapeWhoseSizeOverflowsIsInvalidArgument) {
  FrameHeader h;
  auto* t = h.add_tensors();
  t->set_name("x");
  t->add_shape(int64_t{1} << 31);
  t->add_shape(int64_t{1} << 31);
  t->add_shape(int64_t{1} << 31);
  Frame g;
  absl::Status s = FrameFromByteBuffer(RawFrame(h, ""), &g);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("frame tensor \"x\": shape"));
}

TEST(FrameTest, HugeButFiniteShapeWithFewBytesIsDataLossWithoutAllocating) {
  FrameHeader h;
  auto* t = h.add_tensors();
  t->set_name("x");
  t->add_shape(int64_t{1} << 50);
  Frame g;
  absl::Status s = FrameFromByteBuffer(RawFrame(h, "abcd"), &g);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
}

// Regression: an ERROR frame with error_code 0 became an OK status at the
// coordinator, which then merged microbatches that never arrived.
TEST(FrameTest, ErrorFrameWithoutAnErrorCodeIsRefused) {
  FrameHeader h;
  h.set_kind(FrameHeader::ERROR);
  h.set_request_id(7);
  Frame g;
  absl::Status s = FrameFromByteBuffer(RawFrame(h, ""), &g);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("carries no valid error code (0)"));
  h.set_error_code(1000);
  EXPECT_EQ(FrameFromByteBuffer(RawFrame(h, ""), &g).code(), absl::StatusCode::kInvalidArgument);
  h.set_error_code(static_cast<int>(absl::StatusCode::kInternal));
  EXPECT_TRUE(FrameFromByteBuffer(RawFrame(h, ""), &g).ok());
}

TEST(FrameTest, UnknownKindsAndTensorsOnControlFramesAreRefused) {
  FrameHeader h;
  h.set_kind(static_cast<FrameHeader::Kind>(9));
  Frame g;
  EXPECT_THAT(std::string(FrameFromByteBuffer(RawFrame(h, ""), &g).message()),
              HasSubstr("frame kind 9 does not exist"));
  h.set_kind(FrameHeader::CANCEL);
  h.add_tensors()->set_name("x");
  EXPECT_THAT(std::string(FrameFromByteBuffer(RawFrame(h, ""), &g).message()),
              HasSubstr("CANCEL frame carries 1 tensors"));
}

TEST(FrameTest, HeaderLengthPastTheEndIsDataLoss) {
  std::string bytes = "\xff\xff\xff\x7f";
  grpc::Slice s(bytes.data(), bytes.size());
  grpc::ByteBuffer bb(&s, 1);
  Frame g;
  EXPECT_EQ(FrameFromByteBuffer(bb, &g).code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace pipeserve
