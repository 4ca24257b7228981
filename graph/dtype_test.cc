#include "graph/dtype.h"

#include <cmath>
#include <limits>

#include "gtest/gtest.h"

namespace pipeserve {
namespace {

TEST(DtypeTest, SizesAndNames) {
  EXPECT_EQ(ElementSize(DT_FLOAT32), 4);
  EXPECT_EQ(ElementSize(DT_BFLOAT16), 2);
  EXPECT_EQ(ElementSize(DT_FLOAT16), 2);
  EXPECT_EQ(ElementSize(DT_INT64), 8);
  EXPECT_EQ(ElementSize(DT_INT32), 4);
  EXPECT_EQ(ElementSize(DT_BOOL), 1);
  EXPECT_EQ(ElementSize(DT_INVALID), 0);
  for (DataType t : {DT_FLOAT32, DT_FLOAT16, DT_BFLOAT16, DT_INT64, DT_INT32, DT_BOOL}) {
    absl::StatusOr<DataType> parsed = ParseKServeName(KServeName(t));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, t);
  }
  absl::StatusOr<DataType> bad = ParseKServeName("UINT8");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("\"UINT8\""), std::string::npos);
  EXPECT_FALSE(IsValidDataType(0));
  EXPECT_FALSE(IsValidDataType(99));
}

TEST(DtypeTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(-2.5f)), -2.5f);
  // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: rounds to even (1).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
}

TEST(DtypeTest, HalfMatchesIeee) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(70000.0f), 0x7c00);
  EXPECT_EQ(FloatToHalf(5.9604645e-8f), 0x0001);  // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x0001), 5.9604645e-8f);
  EXPECT_EQ(HalfToFloat(0x3555), 0.333251953125f);
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::nanf("")))));
  for (float f : {0.1f, 3.14159f, -1234.5f, 6.1e-5f, 1e-6f}) {
    float back = HalfToFloat(FloatToHalf(f));
    EXPECT_NEAR(back, f, std::fabs(f) * 1e-3 + 6e-8) << f;
  }
}

}  // namespace
}  // namespace pipeserve
