#include "runtime/cuda/broadcast_index.h"

#include <algorithm>
#include <random>

#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using Shape = std::vector<int64_t>;

// Flat index into an operand of `shape` for output coordinates `coord`,
// the slow way: align right, size-1 dims repeat.
int64_t NaiveOffset(const Shape& shape, const Shape& coord) {
  int64_t idx = 0, stride = 1;
  for (int e = static_cast<int>(shape.size()) - 1,
           d = static_cast<int>(coord.size()) - 1;
       e >= 0; --e, --d) {
    if (shape[e] != 1) idx += coord[d] * stride;
    stride *= shape[e];
  }
  return idx;
}

Shape Broadcast(const Shape& a, const Shape& b) {
  size_t r = std::max(a.size(), b.size());
  Shape out(r);
  for (size_t i = 0; i < r; ++i) {
    int64_t da = i < r - a.size() ? 1 : a[i - (r - a.size())];
    int64_t db = i < r - b.size() ? 1 : b[i - (r - b.size())];
    out[i] = da == 1 ? db : da;
  }
  return out;
}

void ExpectMatchesNaive(const Shape& a, const Shape& b) {
  Shape out = Broadcast(a, b);
  BroadcastIndex ix;
  ASSERT_TRUE(MakeBroadcastIndex(a, b, out, &ix));
  int64_t n = 1;
  for (int64_t d : out) n *= d;
  for (int64_t i = 0; i < n; ++i) {
    Shape coord(out.size());
    for (int64_t d = static_cast<int64_t>(out.size()) - 1, f = i; d >= 0; --d) {
      coord[d] = f % out[d];
      f /= out[d];
    }
    int64_t ia, ib;
    ix.Offsets(i, &ia, &ib);
    ASSERT_EQ(ia, NaiveOffset(a, coord)) << "element " << i;
    ASSERT_EQ(ib, NaiveOffset(b, coord)) << "element " << i;
  }
}

TEST(BroadcastIndexTest, SameShapesMergeIntoOneContiguousDimension) {
  BroadcastIndex ix;
  ASSERT_TRUE(MakeBroadcastIndex({4, 3, 5}, {4, 3, 5}, {4, 3, 5}, &ix));
  EXPECT_EQ(ix.rank, 1);
  EXPECT_EQ(ix.dims[0], 60);
  EXPECT_EQ(ix.a_stride[0], 1);
  EXPECT_EQ(ix.b_stride[0], 1);
}

TEST(BroadcastIndexTest, RowVectorKeepsTwoDimensionsWithZeroStride) {
  BroadcastIndex ix;
  ASSERT_TRUE(MakeBroadcastIndex({5, 12}, {12}, {5, 12}, &ix));
  ASSERT_EQ(ix.rank, 2);
  EXPECT_EQ(ix.b_stride[0], 0);
  EXPECT_EQ(ix.b_stride[1], 1);
  ExpectMatchesNaive({5, 12}, {12});
}

TEST(BroadcastIndexTest, ColumnAndScalarLikeOperands) {
  ExpectMatchesNaive({5, 12}, {5, 1});
  ExpectMatchesNaive({5, 1}, {5, 12});
  ExpectMatchesNaive({1}, {3, 4});
  ExpectMatchesNaive({1, 1}, {1});
  ExpectMatchesNaive({2, 1, 4}, {3, 1});
}

TEST(BroadcastIndexTest, RandomShapesMatchTheNaiveIndexing) {
  std::mt19937 rng(7);
  for (int t = 0; t < 300; ++t) {
    int ra = 1 + rng() % 5, rb = 1 + rng() % 5;
    int r = std::max(ra, rb);
    Shape out(r);
    for (int64_t& d : out) d = 1 + rng() % 4;
    Shape a(out.end() - ra, out.end()), b(out.end() - rb, out.end());
    for (int64_t& d : a)
      if (rng() % 3 == 0) d = 1;
    for (int64_t& d : b)
      if (rng() % 3 == 0) d = 1;
    ExpectMatchesNaive(a, b);
  }
}

TEST(BroadcastIndexTest, ShapesThatDoNotBroadcastAreRefused) {
  BroadcastIndex ix;
  EXPECT_FALSE(MakeBroadcastIndex({5, 3}, {4}, {5, 3}, &ix));
  EXPECT_FALSE(MakeBroadcastIndex({2, 5, 3}, {3}, {5, 3}, &ix));
}

TEST(BroadcastIndexTest, TooManyDimensionsAfterMergingAreRefused) {
  // Alternating repeat patterns cannot merge: 9 dimensions stay.
  Shape a = {2, 1, 2, 1, 2, 1, 2, 1, 2};
  Shape b = {1, 2, 1, 2, 1, 2, 1, 2, 1};
  BroadcastIndex ix;
  EXPECT_FALSE(MakeBroadcastIndex(a, b, Broadcast(a, b), &ix));
}

}  // namespace
}  // namespace pipeserve
