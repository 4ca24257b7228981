#include "graph/validate.h"

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// x [B, 8] -> mm(w [8, 4]) -> relu -> y
GraphBuilder SmallModel() {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("w", {8, 4});
  b.Op("mm", {"x", "w"}, "h").Op("relu", {"h"}, "y").Output("y");
  return b;
}

void ExpectInvalid(const Graph& g, const std::string& substring) {
  absl::StatusOr<ValueShapes> r = ValidateGraph(g);
  ASSERT_FALSE(r.ok()) << "expected an error containing: " << substring;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(substring));
}

TEST(ValidateTest, ValidGraphGetsShapesWithSymbolicBatch) {
  absl::StatusOr<ValueShapes> r = ValidateGraph(SmallModel().Build().graph);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->at("h"), (Shape{-1, 4}));
  EXPECT_EQ(r->at("y"), (Shape{-1, 4}));
  EXPECT_EQ(r->at("w"), (Shape{8, 4}));
}

TEST(ValidateTest, UnknownOpIsNamed) {
  GraphBuilder b = SmallModel();
  b.graph().mutable_nodes(2)->set_op("fft_rfft");
  ExpectInvalid(b.graph(), "node \"y\" (fft_rfft): unknown op \"fft_rfft\"");
}

TEST(ValidateTest, UndefinedValueIsNamed) {
  GraphBuilder b = SmallModel();
  b.graph().mutable_nodes(2)->set_inputs(0, "nowhere");
  ExpectInvalid(b.graph(),
                "node \"y\" (relu): input \"nowhere\" is not defined");
}

TEST(ValidateTest, CycleIsReportedWithItsPath) {
  GraphBuilder b;
  b.Input("x", {-1, 4});
  b.Op("add", {"x", "c"}, "a").Op("relu", {"a"}, "c").Output("c");
  ExpectInvalid(b.graph(), "cycle: a <- c <- a");
}

TEST(ValidateTest, ForwardReferenceWithoutCycleNeedsTopologicalOrder) {
  GraphBuilder b;
  b.Input("x", {-1, 4});
  b.Op("relu", {"b"}, "a").Op("relu", {"x"}, "b").Output("a");
  ExpectInvalid(b.graph(), "uses value \"b\" before node \"b\" defines it");
}

TEST(ValidateTest, DuplicateNodeNameIsNamed) {
  GraphBuilder b = SmallModel();
  b.graph().mutable_nodes(2)->set_name("h");
  ExpectInvalid(b.graph(), "duplicate node name \"h\"");
}

TEST(ValidateTest, ValueDefinedTwiceIsNamed) {
  GraphBuilder b = SmallModel();
  b.graph().mutable_nodes(2)->set_outputs(0, "h");
  ExpectInvalid(b.graph(), "value \"h\" is defined more than once");
}

TEST(ValidateTest, DuplicateInputNameIsNamed) {
  GraphBuilder b = SmallModel();
  b.Input("x", {-1, 8});
  ExpectInvalid(b.graph(), "duplicate model input name \"x\"");
}

TEST(ValidateTest, ShapeMismatchNamesNodeAndShapes) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("w", {4, 4});
  b.Op("mm", {"x", "w"}, "h").Output("h");
  ExpectInvalid(b.graph(),
                "node \"h\" (mm): mm inner dimensions differ: [B,8] and [4,4]");
}

TEST(ValidateTest, BroadcastMismatchNamesShapes) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Input("y", {-1, 6});
  b.Op("add", {"x", "y"}, "s").Output("s");
  ExpectInvalid(b.graph(), "shapes do not broadcast: [B,8] and [B,6]");
}

TEST(ValidateTest, FixedSizesDoNotBroadcast) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("p", {3, 7});
  b.Op("add", {"x", "p"}, "s").Output("s");
  ExpectInvalid(b.graph(), "shapes do not broadcast: [B,8] and [3,7]");
}

// A free dimension (-1) is only known at run time: validation takes the
// fixed size it meets; the run checks it (cpu_backend_test).
TEST(ValidateTest, FreeDimensionTakesTheFixedSizeItMeets) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("p", {3, 8});
  b.Op("add", {"x", "p"}, "s").Output("s");
  absl::StatusOr<ValueShapes> r = ValidateGraph(b.graph());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->at("s"), (Shape{3, 8}));
}

TEST(ValidateTest, DtypeMismatchOnInputIsNamed) {
  GraphBuilder b = SmallModel();
  b.graph().mutable_inputs(0)->set_dtype(DT_INVALID);
  ExpectInvalid(b.graph(), "input \"x\": dtype DT_INVALID is not supported");
}

TEST(ValidateTest, DtypeMismatchOnParameterIsNamed) {
  GraphBuilder b = SmallModel();
  b.graph().mutable_params(0)->set_dtype(DT_INVALID);
  ExpectInvalid(b.graph(), "parameter \"w\": dtype DT_INVALID");
}

TEST(ValidateTest, MissingParameterIsNamed) {
  GraphBuilder b = SmallModel();
  b.graph().clear_params();
  ExpectInvalid(b.graph(), "parameter \"w\" is missing");
}

TEST(ValidateTest, ParameterByteSizeMustMatchShape) {
  GraphBuilder b = SmallModel();
  b.graph().mutable_params(0)->set_byte_size(100);
  ExpectInvalid(b.graph(),
                "parameter \"w\": byte_size 100 does not match shape [8,4] "
                "(128 bytes of float32)");
}

TEST(ValidateTest, WrongArityIsNamed) {
  GraphBuilder b = SmallModel();
  b.graph().mutable_nodes(2)->add_inputs("x");
  ExpectInvalid(b.graph(), "node \"y\" (relu): expects 1 inputs and 1 outputs, got 2");
}

TEST(ValidateTest, UndefinedModelOutputIsNamed) {
  GraphBuilder b = SmallModel();
  b.Output("ghost");
  ExpectInvalid(b.graph(), "model output \"ghost\" is not defined");
}

TEST(ValidateTest, BatchedInputNeedsBatchDimension) {
  GraphBuilder b = SmallModel();
  b.graph().mutable_inputs(0)->set_shape(0, 16);
  ExpectInvalid(b.graph(), "input \"x\": a batched input needs dim 0 = -1");
}

TEST(ValidateTest, LinearChecksWeightAndBias) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Param("l.weight", {4, 8}).Param("l.bias", {5});
  b.Op("linear", {"x", "l.weight", "l.bias"}, "y", "l").Output("y");
  ExpectInvalid(b.graph(), "linear bias must be [out] for weight: [5] and [4,8]");
}

// Regression: the cycle search recursed once per node, so a chain of a
// million nodes whose first node reads the last one's output overflowed
// the stack (a crash, not an error).
TEST(ValidateTest, MillionNodeCycleIsAnErrorNotAStackOverflow) {
  constexpr int kNodes = 1000000;
  Graph g;
  ValueSpec* x = g.add_inputs();
  x->set_name("x");
  x->set_dtype(DT_FLOAT32);
  x->add_shape(-1);
  x->add_shape(4);
  x->set_batched(true);
  for (int i = 0; i < kNodes; ++i) {
    Node* n = g.add_nodes();
    n->set_name(absl::StrCat("n", i));
    n->set_op("relu");
    n->add_inputs(i == 0 ? absl::StrCat("v", kNodes - 1) : absl::StrCat("v", i - 1));
    n->add_outputs(absl::StrCat("v", i));
  }
  g.add_outputs(absl::StrCat("v", kNodes - 1));
  absl::StatusOr<ValueShapes> r = ValidateGraph(g);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("cycle: n0 <- n999999 <- n999998"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("(1000001 nodes)"));
  EXPECT_LT(r.status().message().size(), 400u);
}

// Regression: [2^53, 512] float32 needs 2^64 bytes, which wrapped to 0, so
// a parameter claiming 0 bytes passed.
TEST(ValidateTest, ParameterShapeWhoseSizeOverflowsIsInvalid) {
  GraphBuilder b = SmallModel();
  TensorInfo* w = b.graph().mutable_params(0);
  w->clear_shape();
  w->add_shape(int64_t{1} << 53);
  w->add_shape(512);
  w->set_byte_size(0);
  ExpectInvalid(b.graph(), "parameter \"w\": shape [9007199254740992,512] needs more than 2^62 bytes");
}

TEST(ValidateTest, InputShapeWhoseSizeOverflowsIsInvalid) {
  GraphBuilder b;
  b.Input("x", {-1, int64_t{1} << 40, int64_t{1} << 40}).Op("relu", {"x"}, "y").Output("y");
  ExpectInvalid(b.graph(), "input \"x\": shape [1,1099511627776,1099511627776] has more than 2^62 elements");
}

// Regression: the reshape's size product wrapped ([2^62 + 1, 4] to 4
// elements), so a hostile upload's view of 4 floats was read as 2^64 (a
// select at 2^40 then read 16 TiB past it on the stage server).
TEST(ValidateTest, AReshapeWhoseSizesOverflowIsInvalid) {
  GraphBuilder b;
  b.Input("x", {4});
  b.Op("reshape", {"x"}, "r", "", {{"shape", AttrInts({(int64_t{1} << 62) + 1, 4})}})
      .Output("r");
  ExpectInvalid(b.graph(), "node \"r\" (reshape): reshape to 4611686018427387905,4: more than 2^62");
}

// Regression: nothing bounded an inferred shape's rank, so a chain of
// 100,000 unsqueezes (a 4.7 MB upload) made validation hold 5e9 dims.
TEST(ValidateTest, AnInferredShapeBeyondTheRankLimitIsInvalid) {
  GraphBuilder b;
  b.Input("x", {-1, 2});
  std::string at = "x";
  for (int i = 0; i < 40; ++i) {
    const std::string next = absl::StrCat("u", i);
    b.Op("unsqueeze", {at}, next, "", {{"dim", AttrI(0)}});
    at = next;
  }
  b.Output(at);
  ExpectInvalid(b.graph(), "node \"u30\" (unsqueeze): its output shape has 33 dimensions");
}

// Regression: an amax over a dimension of size 0 was accepted (and gave
// -inf), and a mean over integers; PyTorch refuses both. Over a size only
// known at run time, or with an empty output, an amax is fine.
TEST(ValidateTest, AnAmaxOverNothingAndAnIntegerMeanAreInvalid) {
  auto amax = [](Shape x, std::vector<int64_t> dims) {
    GraphBuilder b;
    b.Input("x", x);
    b.Op("amax", {"x"}, "m", "", {{"dims", AttrInts(dims)}}).Output("m");
    return b.graph();
  };
  ExpectInvalid(amax({-1, 0}, {1}),
                "node \"m\" (amax): amax over a dimension of size 0 (input [B,0]) has no value");
  EXPECT_TRUE(ValidateGraph(amax({-1, 3}, {1})).ok());
  EXPECT_TRUE(ValidateGraph(amax({4, 0}, {0})).ok()) << "an empty output";
  GraphBuilder b;
  b.Input("x", {-1, 3});
  b.graph().mutable_inputs(0)->set_dtype(DT_INT64);
  b.Op("mean", {"x"}, "m", "", {{"dims", AttrInts({1})}}).Output("m");
  ExpectInvalid(b.graph(), "node \"m\" (mean): needs a floating-point input, got int64");
}

}  // namespace
}  // namespace pipeserve
