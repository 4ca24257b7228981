#include "runtime/tensor.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

TEST(CheckedSizeTest, CountsAndSizesOrdinaryShapes) {
  EXPECT_EQ(*CheckedElementCount({16, 512}), 8192u);
  EXPECT_EQ(*CheckedElementCount({}), 1u);
  EXPECT_EQ(*CheckedElementCount({0, 512}), 0u);
  EXPECT_EQ(*CheckedByteSize({16, 512}, 4), 32768u);
}

// Regression: [2^31, 2^31] has 2^62 elements, whose float32 size wrapped
// to 0 bytes in the old `n *= d; n * 4` arithmetic, so an empty payload
// "matched" it.
TEST(CheckedSizeTest, SizesPastTwoToTheSixtyTwoAreRefusedNotWrapped) {
  EXPECT_EQ(*CheckedByteSize({int64_t{1} << 53, 32}, 4), uint64_t{1} << 60);
  absl::StatusOr<uint64_t> bytes = CheckedByteSize({int64_t{1} << 31, int64_t{1} << 31}, 4);
  ASSERT_FALSE(bytes.ok());
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bytes.status().message()), HasSubstr("more than 2^62 bytes"));
  absl::StatusOr<uint64_t> n = CheckedElementCount({int64_t{1} << 40, int64_t{1} << 40});
  ASSERT_FALSE(n.ok());
  EXPECT_THAT(std::string(n.status().message()),
              HasSubstr("shape [1099511627776,1099511627776] has more than 2^62 elements"));
}

// Regression: a 0 dimension made the count 0 and the check stopped looking,
// so [0, 2^63-1] passed as an empty tensor.
TEST(CheckedSizeTest, AZeroDimensionDoesNotHideHugeOnes) {
  absl::StatusOr<uint64_t> n = CheckedElementCount({0, INT64_MAX});
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(n.status().message()), HasSubstr("counting a 0 as 1"));
  EXPECT_FALSE(CheckedByteSize({int64_t{1} << 40, 0, int64_t{1} << 40}, 4).ok());
  EXPECT_EQ(*CheckedElementCount({int64_t{1} << 40, 0}), 0u) << "can exist: it holds nothing";
}

TEST(CheckedSizeTest, NegativeDimensionsAndHugeRanksAreRefused) {
  EXPECT_THAT(std::string(CheckedElementCount({4, -1}).status().message()),
              HasSubstr("negative dimension"));
  std::vector<int64_t> deep(kMaxRank + 1, 1);
  EXPECT_THAT(std::string(CheckedElementCount(deep).status().message()),
              HasSubstr("33 dimensions (at most 32)"));
}

// Regression: an empty list (a step's sample_context with no penalised
// sequence) was copied from a null pointer, which UBSan stops at.
TEST(TensorTest, FromInt64sTakesAnEmptyList) {
  Tensor t = Tensor::FromInt64s({0}, {});
  EXPECT_EQ(t.numel(), 0);
  EXPECT_EQ(t.dtype(), DT_INT64);
  EXPECT_EQ(Tensor::FromInt64s({2}, {7, 9}).data_as<int64_t>()[1], 9);
}

TEST(TensorTest, TryEmptyRefusesWhatCannotExist) {
  EXPECT_EQ(Tensor::TryEmpty({int64_t{1} << 50, 1 << 20}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // 2^50 floats pass the arithmetic but no machine has 4 PiB.
  EXPECT_EQ(Tensor::TryEmpty({int64_t{1} << 50}).status().code(),
            absl::StatusCode::kResourceExhausted);
  absl::StatusOr<Tensor> t = Tensor::TryEmpty({2, 3});
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->numel(), 6);
}

}  // namespace
}  // namespace pipeserve
