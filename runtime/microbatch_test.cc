#include "runtime/microbatch.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(ChunkSizesTest, FollowsTensorSplit) {
  EXPECT_THAT(ChunkSizes(37, 4), ElementsAre(10, 9, 9, 9));
  EXPECT_THAT(ChunkSizes(16, 4), ElementsAre(4, 4, 4, 4));
  EXPECT_THAT(ChunkSizes(256, 16), ::testing::Each(16));
  // Fewer rows than chunks: one row each, min(batch, chunks) chunks.
  EXPECT_THAT(ChunkSizes(3, 8), ElementsAre(1, 1, 1));
  EXPECT_THAT(ChunkSizes(5, 1), ElementsAre(5));
}

Tensor Iota(Shape shape) {
  Tensor t = Tensor::Empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = float(i);
  return t;
}

TEST(SplitMicrobatchesTest, SplitsBatchedAndReplicatesTheRest) {
  Tensor x = Iota({5, 2}), w = Iota({3});
  auto mbs = SplitMicrobatches({x, w}, {true, false}, 2);
  ASSERT_TRUE(mbs.ok()) << mbs.status();
  ASSERT_EQ(mbs->size(), 2u);
  EXPECT_THAT((*mbs)[0][0].shape(), ElementsAre(3, 2));
  EXPECT_THAT((*mbs)[1][0].shape(), ElementsAre(2, 2));
  EXPECT_EQ((*mbs)[1][0].data()[0], 6.0f);  // row 3 starts at element 6
  EXPECT_EQ((*mbs)[1][1].data(), w.data());  // replicated, same storage
}

TEST(SplitMicrobatchesTest, DisagreeingBatchesAreAnError) {
  auto mbs = SplitMicrobatches({Iota({5, 2}), Iota({4, 2})}, {true, true}, 2);
  ASSERT_FALSE(mbs.ok());
  EXPECT_THAT(std::string(mbs.status().message()),
              HasSubstr("batched inputs disagree on the batch size: 5 and 4"));
}

TEST(ConcatRowsTest, InvertsSplit) {
  Tensor x = Iota({7, 3});
  auto mbs = SplitMicrobatches({x}, {true}, 3);
  ASSERT_TRUE(mbs.ok());
  std::vector<Tensor> parts;
  for (auto& mb : *mbs) parts.push_back(mb[0]);
  auto merged = ConcatRows(parts);
  ASSERT_TRUE(merged.ok());
  EXPECT_THAT(merged->shape(), ElementsAre(7, 3));
  for (int i = 0; i < 21; ++i) EXPECT_EQ(merged->data()[i], float(i));
}

TEST(ConcatRowsTest, MismatchedTrailingDimsAreAnError) {
  auto merged = ConcatRows({Iota({2, 3}), Iota({2, 4})});
  ASSERT_FALSE(merged.ok());
  EXPECT_THAT(std::string(merged.status().message()),
              HasSubstr("cannot concatenate [2,4] with [2,3]"));
}

// Regression: a microbatch that came back with fewer outputs (an injected
// frame) was indexed past its end.
TEST(MergeMicrobatchesTest, MissingOutputsAreAnErrorNotARead) {
  std::vector<std::vector<Tensor>> outs = {{Tensor::Zeros({2, 3})}, {}};
  absl::StatusOr<std::vector<Tensor>> merged = MergeMicrobatches({true}, outs);
  ASSERT_FALSE(merged.ok());
  EXPECT_EQ(merged.status().message(), "microbatch 1 has 0 outputs, expected 1");
}

}  // namespace
}  // namespace pipeserve
