#include "runtime/signature.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

google::protobuf::RepeatedPtrField<ValueSpec> Specs(const std::string& name, Shape shape,
                                                     DataType dtype = DT_INT64) {
  google::protobuf::RepeatedPtrField<ValueSpec> specs;
  ValueSpec* v = specs.Add();
  v->set_name(name);
  v->set_dtype(dtype);
  v->set_batched(true);
  for (int64_t d : shape) v->add_shape(d);
  return specs;
}

TEST(CheckTensorsMatchTest, GivesTheBatchOfMatchingTensors) {
  absl::StatusOr<int64_t> batch =
      CheckTensorsMatch(Specs("ids", {-1, -1}), {Tensor::Zeros({3, 7}, DT_INT64)});
  ASSERT_TRUE(batch.ok()) << batch.status();
  EXPECT_EQ(*batch, 3);
}

// Regression: token ids INT64 [2^40, 0] carry no bytes, so every size check
// passed them; the coordinator split them into 2^38-row microbatches and an
// attention kernel looped 2^40 times over nothing, hanging the stage.
TEST(CheckTensorsMatchTest, AZeroDimensionBesideHugeOnesIsRefusedNamingTheInput) {
  for (const Shape& shape : {Shape{int64_t{1} << 40, 0}, Shape{0, int64_t{1} << 40}}) {
    absl::StatusOr<int64_t> batch =
        CheckTensorsMatch(Specs("ids", {-1, -1}), {Tensor::Zeros(shape, DT_INT64)});
    ASSERT_FALSE(batch.ok()) << ShapeToString(shape);
    EXPECT_EQ(batch.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(batch.status().message()), HasSubstr("input \"ids\""));
  }
  EXPECT_TRUE(CheckTensorsMatch(Specs("ids", {-1, -1}), {Tensor::Zeros({1 << 20, 0}, DT_INT64)}).ok())
      << "an empty batch within the bound is fine";
}

}  // namespace
}  // namespace pipeserve
