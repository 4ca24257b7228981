#include "server/coordinator/kserve_request.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// Inputs x [B, 4] and y [B, 4]; one output "out" [B, 4].
Plan TwoInputPlan() {
  Plan plan;
  for (const char* name : {"x", "y"}) {
    ValueSpec* v = plan.add_inputs();
    v->set_name(name);
    v->set_dtype(DT_FLOAT32);
    v->add_shape(-1);
    v->add_shape(4);
    v->set_batched(true);
  }
  ValueSpec* out = plan.add_outputs();
  out->set_name("out");
  out->add_shape(-1);
  out->add_shape(4);
  out->set_batched(true);
  return plan;
}

inference::ModelInferRequest Request(std::vector<int64_t> x_shape, size_t x_bytes) {
  inference::ModelInferRequest req;
  req.set_model_name("m");
  auto* x = req.add_inputs();
  x->set_name("x");
  x->set_datatype("FP32");
  for (int64_t d : x_shape) x->add_shape(d);
  req.add_raw_input_contents(std::string(x_bytes, '\0'));
  auto* y = req.add_inputs();
  y->set_name("y");
  y->set_datatype("FP32");
  y->add_shape(2);
  y->add_shape(4);
  req.add_raw_input_contents(std::string(32, '\0'));
  return req;
}

void ExpectInvalid(const absl::StatusOr<std::vector<Tensor>>& r, const std::string& text) {
  ASSERT_FALSE(r.ok()) << "expected: " << text;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(text));
}

TEST(ParseInferInputsTest, RawInputsBecomeTensorsInThePlansOrder) {
  inference::ModelInferRequest req = Request({2, 4}, 32);
  std::swap(*req.mutable_inputs(0), *req.mutable_inputs(1));
  std::swap(*req.mutable_raw_input_contents(0), *req.mutable_raw_input_contents(1));
  req.mutable_raw_input_contents(1)->assign(std::string(31, '\0') + "\x3f");
  auto r = ParseInferInputs(req, TwoInputPlan());
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0].shape(), (Shape{2, 4}));
  EXPECT_NE((*r)[0].data()[7], 0.0f) << "x's bytes went to x";
}

// Regression: [1<<53, 32] with no bytes went to Tensor::Empty first, which
// threw std::bad_alloc (UNKNOWN "Unexpected error in RPC handling").
TEST(ParseInferInputsTest, HugeShapeWithoutItsBytesIsRefusedBeforeAllocating) {
  ExpectInvalid(ParseInferInputs(Request({int64_t{1} << 53, 32}, 0), TwoInputPlan()),
                "input \"x\": raw contents hold 0 bytes, but FP32 [9007199254740992,32] needs "
                "1152921504606846976");
}

// Regression: element counts overflowed, so 2^62 elements "needed" 0 bytes
// and an empty payload matched.
TEST(ParseInferInputsTest, ShapeWhoseSizeOverflowsIsRefused) {
  ExpectInvalid(ParseInferInputs(Request({int64_t{1} << 31, int64_t{1} << 31}, 0), TwoInputPlan()),
                "input \"x\": shape [2147483648,2147483648] needs more than 2^62 bytes");
  ExpectInvalid(ParseInferInputs(Request({-1, 4}, 0), TwoInputPlan()),
                "input \"x\": shape [B,4] has a negative dimension");
  ExpectInvalid(ParseInferInputs(Request(std::vector<int64_t>(40, 1), 4), TwoInputPlan()),
                "input \"x\": shape has 40 dimensions (at most 32)");
}

// Regression: [2^40, 0] holds no element, so it needed (and matched) 0
// bytes; split into microbatches of 2^38 rows, it hung a stage's kernel.
TEST(ParseInferInputsTest, AnEmptyShapeSpanningHugeDimensionsIsRefused) {
  ExpectInvalid(ParseInferInputs(Request({int64_t{1} << 40, 0}, 0), TwoInputPlan()),
                "input \"x\": shape [1099511627776,0] spans more than 2^31 positions");
  ExpectInvalid(ParseInferInputs(Request({0, INT64_MAX}, 0), TwoInputPlan()), "input \"x\"");
}

// Regression: ModelStreamInfer with typed contents and shape [1<<50]
// aborted the coordinator (bad_alloc on a request thread).
TEST(ParseInferInputsTest, TypedContentsAreCountedBeforeAllocating) {
  inference::ModelInferRequest req;
  req.set_model_name("m");
  auto* x = req.add_inputs();
  x->set_name("x");
  x->set_datatype("FP32");
  x->add_shape(int64_t{1} << 50);
  x->mutable_contents()->add_fp32_contents(1.0f);
  ExpectInvalid(ParseInferInputs(req, TwoInputPlan()),
                "input \"x\": contents.fp32_contents holds 1 values, but [1125899906842624] needs "
                "1125899906842624");
}

TEST(ParseInferInputsTest, NamesDatatypesAndContentsAreChecked) {
  Plan plan = TwoInputPlan();
  inference::ModelInferRequest req = Request({2, 4}, 32);
  req.mutable_inputs(1)->set_name("z");
  ExpectInvalid(ParseInferInputs(req, plan), "unexpected input \"z\" (the model's inputs: x, y)");
  req = Request({2, 4}, 32);
  req.mutable_inputs(1)->set_name("x");
  ExpectInvalid(ParseInferInputs(req, plan), "input \"x\" is given twice");
  req = Request({2, 4}, 32);
  req.mutable_inputs()->RemoveLast();
  req.mutable_raw_input_contents()->RemoveLast();
  ExpectInvalid(ParseInferInputs(req, plan), "missing input \"y\"");
  req = Request({2, 4}, 32);
  req.mutable_inputs(0)->set_datatype("FP64");
  ExpectInvalid(ParseInferInputs(req, plan), "input \"x\": datatype FP64 is not supported");
  req = Request({2, 4}, 32);
  req.mutable_inputs(0)->mutable_contents()->add_fp32_contents(1);
  ExpectInvalid(ParseInferInputs(req, plan), "contents must be empty when raw_input_contents");
  req = Request({2, 4}, 32);
  req.mutable_raw_input_contents()->RemoveLast();
  ExpectInvalid(ParseInferInputs(req, plan), "raw_input_contents has 1 entries for 2 inputs");
  req = Request({2, 4}, 32);
  req.mutable_inputs(1)->set_name(std::string(1 << 20, 'n'));
  auto r = ParseInferInputs(req, plan);
  ASSERT_FALSE(r.ok());
  EXPECT_LT(r.status().message().size(), 300u) << "a long name is not echoed whole";
}

TEST(ChooseOutputsTest, AllByDefaultOrThoseNamedOnce) {
  Plan plan = TwoInputPlan();
  inference::ModelInferRequest req;
  EXPECT_EQ(*ChooseOutputs(req, plan), std::vector<int>({0}));
  req.add_outputs()->set_name("out");
  EXPECT_EQ(*ChooseOutputs(req, plan), std::vector<int>({0}));
  req.add_outputs()->set_name("out");
  EXPECT_THAT(std::string(ChooseOutputs(req, plan).status().message()),
              HasSubstr("output \"out\" is requested twice"));
  req.mutable_outputs(1)->set_name("nope");
  EXPECT_THAT(std::string(ChooseOutputs(req, plan).status().message()),
              HasSubstr("unknown output \"nope\""));
}

// Token ids and a padding mask: INT64 and BOOL, typed and raw.
Plan TokenPlan() {
  Plan plan;
  for (auto [name, dtype] : {std::pair<const char*, DataType>{"ids", DT_INT64},
                             std::pair<const char*, DataType>{"mask", DT_BOOL}}) {
    ValueSpec* v = plan.add_inputs();
    v->set_name(name);
    v->set_dtype(dtype);
    v->add_shape(-1);
    v->add_shape(-1);
    v->set_batched(true);
  }
  return plan;
}

TEST(ParseInferInputsTest, Int64AndBoolInputsTypedOrRaw) {
  inference::ModelInferRequest req;
  auto* ids = req.add_inputs();
  ids->set_name("ids");
  ids->set_datatype("INT64");
  ids->add_shape(1);
  ids->add_shape(3);
  for (int64_t v : {50256, 7, -1}) ids->mutable_contents()->add_int64_contents(v);
  auto* mask = req.add_inputs();
  mask->set_name("mask");
  mask->set_datatype("BOOL");
  mask->add_shape(1);
  mask->add_shape(3);
  for (bool v : {false, false, true}) mask->mutable_contents()->add_bool_contents(v);
  auto r = ParseInferInputs(req, TokenPlan());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)[0].dtype(), DT_INT64);
  EXPECT_EQ((*r)[0].data_as<int64_t>()[0], 50256);
  EXPECT_EQ((*r)[0].data_as<int64_t>()[2], -1);
  EXPECT_EQ((*r)[1].dtype(), DT_BOOL);
  EXPECT_EQ((*r)[1].data_as<uint8_t>()[2], 1);

  // The same as raw contents; a BOOL byte must be 0 or 1.
  inference::ModelInferRequest raw = req;
  for (auto& in : *raw.mutable_inputs()) in.clear_contents();
  int64_t values[3] = {50256, 7, -1};
  raw.add_raw_input_contents(std::string(reinterpret_cast<char*>(values), 24));
  raw.add_raw_input_contents(std::string("\0\0\1", 3));
  r = ParseInferInputs(raw, TokenPlan());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)[0].data_as<int64_t>()[1], 7);
  raw.mutable_raw_input_contents(1)->assign("\0\2\1", 3);
  ExpectInvalid(ParseInferInputs(raw, TokenPlan()), "input \"mask\": BOOL byte 1 is 2");

  // Wrong datatype for the model, and typed contents in the wrong field.
  inference::ModelInferRequest wrong = req;
  wrong.mutable_inputs(0)->set_datatype("FP32");
  ExpectInvalid(ParseInferInputs(wrong, TokenPlan()),
                "input \"ids\": datatype FP32 does not match the model's INT64");
  wrong = req;
  wrong.mutable_inputs(0)->mutable_contents()->clear_int64_contents();
  wrong.mutable_inputs(0)->mutable_contents()->add_int_contents(1);
  ExpectInvalid(ParseInferInputs(wrong, TokenPlan()),
                "input \"ids\": contents.int64_contents holds 0 values, but [1,3] needs 3");
}

TEST(ParseInferInputsTest, HalfPrecisionComesOnlyRaw) {
  Plan plan;
  ValueSpec* v = plan.add_inputs();
  v->set_name("x");
  v->set_dtype(DT_BFLOAT16);
  v->add_shape(2);
  inference::ModelInferRequest req;
  auto* x = req.add_inputs();
  x->set_name("x");
  x->set_datatype("BF16");
  x->add_shape(2);
  x->mutable_contents()->add_fp32_contents(1.0f);
  ExpectInvalid(ParseInferInputs(req, plan),
                "input \"x\": BF16 has no typed contents field in KServe v2; send it in "
                "raw_input_contents");
  x->clear_contents();
  req.add_raw_input_contents(std::string("\x80\x3f\x00\x40", 4));  // 1.0, 2.0
  auto r = ParseInferInputs(req, plan);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(Bf16ToFloat((*r)[0].data_as<uint16_t>()[1]), 2.0f);
}

}  // namespace
}  // namespace pipeserve
