// Small hand-checked cases that pin the reference's semantics. Numbers
// marked "torch" came from PyTorch 1.13 in float64; the others are worked
// by hand in the comment beside them.
#include "runtime/conformance/reference.h"

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "graph/dtype.h"
#include "graph/op_schema.h"
#include "gtest/gtest.h"
#include "proto/model.pb.h"
#include "runtime/sampler.h"
#include "runtime/tensor.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// A node under construction: N("slice").I("dim", 0).I("step", 2).
struct N {
  explicit N(const std::string& op) { node.set_op(op); }
  N& I(const std::string& key, int64_t v) {
    (*node.mutable_attrs())[key].set_i(v);
    return *this;
  }
  N& F(const std::string& key, double v) {
    (*node.mutable_attrs())[key].set_f(v);
    return *this;
  }
  N& S(const std::string& key, const std::string& v) {
    (*node.mutable_attrs())[key].set_s(v);
    return *this;
  }
  N& Ints(const std::string& key, const std::vector<int64_t>& v) {
    auto* list = (*node.mutable_attrs())[key].mutable_ints()->mutable_v();
    list->Assign(v.begin(), v.end());
    return *this;
  }
  Node node;
};

RefTensor Ref(Shape shape, std::vector<double> v, DataType dtype = DT_FLOAT32) {
  return RefTensor{std::move(shape), dtype, std::move(v)};
}

absl::StatusOr<RefTensor> Apply(const N& n, const std::vector<RefTensor>& in) {
  return ReferenceOp(n.node, in);
}

// `r` is OK with exactly this shape and dtype, and values within `tol`.
void ExpectRef(const absl::StatusOr<RefTensor>& r, const Shape& shape,
               DataType dtype, const std::vector<double>& want,
               double tol = 1e-12) {
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->shape, shape);
  EXPECT_EQ(r->dtype, dtype) << TorchName(r->dtype);
  ASSERT_EQ(r->v.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(want[i])) {
      EXPECT_TRUE(std::isnan(r->v[i])) << "at " << i << ": " << r->v[i];
    } else if (std::isinf(want[i])) {
      EXPECT_EQ(r->v[i], want[i]) << "at " << i;
    } else {
      EXPECT_NEAR(r->v[i], want[i], tol) << "at " << i;
    }
  }
}

void ExpectError(const absl::StatusOr<RefTensor>& r, absl::StatusCode code,
                 const std::string& part) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), code) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(part));
}

const double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- coverage and conversion ------------------------------------------------

TEST(ReferenceTest, EveryOpOfTheSchemaIsImplementedButParamAndPipeSplit) {
  for (const std::string& op : KnownOps()) {
    absl::StatusOr<RefTensor> r = ReferenceOp(N(op).node, {});
    if (op == "param" || op == "pipe_split") {
      EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented) << op;
    } else {
      // No inputs: an arity or attribute error, never "unknown op".
      EXPECT_NE(r.status().code(), absl::StatusCode::kUnimplemented)
          << op << r.status();
    }
  }
  ExpectError(ReferenceOp(N("conv2d").node, {}),
              absl::StatusCode::kUnimplemented, "conv2d");
}

TEST(ReferenceTest, ToRefWidensEveryTypeExactly) {
  Tensor f = Tensor::FromVector({2}, {1.5f, -0.1f});
  RefTensor rf = ToRef(f);
  EXPECT_EQ(rf.dtype, DT_FLOAT32);
  EXPECT_EQ(rf.v, (std::vector<double>{1.5, static_cast<double>(-0.1f)}));
  Tensor b = Tensor::Empty({1}, DT_BFLOAT16);
  b.data_as<uint16_t>()[0] = FloatToBf16(3.0f);
  EXPECT_EQ(ToRef(b).v, std::vector<double>{3.0});
  Tensor i = Tensor::FromInt64s({2}, {-7, int64_t{1} << 40});
  EXPECT_EQ(ToRef(i).v, (std::vector<double>{-7.0, 1099511627776.0}));
  EXPECT_EQ(ToRef(i).dtype, DT_INT64);
}

TEST(ReferenceTest, InputsTheSchemaRefusesAreInvalidArguments) {
  ExpectError(Apply(N("add"), {Ref({2}, {1, 2}), Ref({3}, {1, 2, 3})}),
              absl::StatusCode::kInvalidArgument, "add: ");
  ExpectError(Apply(N("add"), {Ref({2}, {1, 2}), Ref({2}, {1, 2}, DT_INT64)}),
              absl::StatusCode::kInvalidArgument, "different dtypes");
  ExpectError(Apply(N("relu"), {Ref({2}, {1})}),
              absl::StatusCode::kInvalidArgument, "1 values for shape [2]");
}

// ---- elementwise ------------------------------------------------------------

TEST(ReferenceTest, BinaryOpsBroadcastNumpyStyle) {
  // [2, 1] - [3]: each row's value minus each column's.
  ExpectRef(Apply(N("sub"), {Ref({2, 1}, {10, 20}), Ref({3}, {1, 2, 3})}),
            {2, 3}, DT_FLOAT32, {9, 8, 7, 19, 18, 17});
  ExpectRef(Apply(N("mul"), {Ref({}, {2}), Ref({2, 2}, {1, 2, 3, 4})}), {2, 2},
            DT_FLOAT32, {2, 4, 6, 8});
}

TEST(ReferenceTest, ScalarOperandIsOnTheRightUnlessReverse) {
  const RefTensor x = Ref({3}, {1, 2, 4});
  ExpectRef(Apply(N("div").F("scalar", 2), {x}), {3}, DT_FLOAT32, {0.5, 1, 2});
  ExpectRef(Apply(N("div").F("scalar", 2).I("reverse", 1), {x}), {3},
            DT_FLOAT32, {2, 1, 0.5});
  ExpectRef(Apply(N("sub").F("scalar", 1).I("reverse", 1), {x}), {3},
            DT_FLOAT32, {0, -1, -3});
  ExpectRef(Apply(N("pow").F("scalar", 2).I("reverse", 1), {x}), {3},
            DT_FLOAT32, {2, 4, 16});
  ExpectRef(Apply(N("pow").F("scalar", 0.5), {x}), {3}, DT_FLOAT32,
            {1, std::sqrt(2.0), 2});
}

TEST(ReferenceTest, IntegerFloorDivRoundsTowardMinusInfinity) {
  // torch.div(a, b, rounding_mode="floor") gives [-4, -4, 3, 3, -2] (torch).
  ExpectRef(Apply(N("floordiv"), {Ref({5}, {-7, 7, -7, 7, 6}, DT_INT64),
                                  Ref({5}, {2, -2, -2, 2, -3}, DT_INT64)}),
            {5}, DT_INT64, {-4, -4, 3, 3, -2});
  // int "div" truncates (the exporter sends true division as float).
  ExpectRef(Apply(N("div").F("scalar", 2), {Ref({2}, {-7, 7}, DT_INT32)}), {2},
            DT_INT32, {-3, 3});
  ExpectError(Apply(N("floordiv").F("scalar", 0), {Ref({1}, {5}, DT_INT64)}),
              absl::StatusCode::kInvalidArgument, "division by zero");
  ExpectError(Apply(N("add").F("scalar", 0.5), {Ref({1}, {5}, DT_INT64)}),
              absl::StatusCode::kInvalidArgument, "scalar 0.5");
}

TEST(ReferenceTest, FloatFloorDivIsTheFloorOfTheExactQuotient) {
  // 1 // float32(0.1) is 9 in torch (0.1f is a bit above a tenth), although
  // 1 / 0.1f rounds to 10; -7.5 // 2 and 7.5 // -2 are -4 (torch).
  const double tenth = static_cast<float>(0.1);
  ExpectRef(Apply(N("floordiv"),
                  {Ref({3}, {1, -7.5, 7.5}), Ref({3}, {tenth, 2, -2})}),
            {3}, DT_FLOAT32, {9, -4, -4});
}

TEST(ReferenceTest, IntegerPowFollowsTorch) {
  // [2, 1, -1, -1] ** [-1, -3, -3, -2] is [0, 1, -1, 1] (torch); 3 ** 4.
  ExpectRef(Apply(N("pow"), {Ref({5}, {2, 1, -1, -1, 3}, DT_INT64),
                             Ref({5}, {-1, -3, -3, -2, 4}, DT_INT64)}),
            {5}, DT_INT64, {0, 1, -1, 1, 81});
  ExpectError(Apply(N("pow").F("scalar", -1), {Ref({1}, {2}, DT_INT64)}),
              absl::StatusCode::kInvalidArgument, "negative integer powers");
}

TEST(ReferenceTest, BoolArithmeticStaysBool) {
  // torch: True + True is True.
  ExpectRef(
      Apply(N("add"), {Ref({2}, {1, 0}, DT_BOOL), Ref({2}, {1, 1}, DT_BOOL)}),
      {2}, DT_BOOL, {1, 1});
}

TEST(ReferenceTest, MaximumAndMinimumPropagateNaN) {
  ExpectRef(Apply(N("maximum"), {Ref({2}, {1, kNaN}), Ref({2}, {2, 0})}), {2},
            DT_FLOAT32, {2, kNaN});
  ExpectRef(Apply(N("minimum").F("scalar", 0), {Ref({3}, {-1, kNaN, 3})}), {3},
            DT_FLOAT32, {-1, kNaN, 0});
}

TEST(ReferenceTest, ComparisonsAndLogicalOpsGiveBool) {
  const RefTensor a = Ref({2, 2}, {1, 2, 3, 4});
  const RefTensor b = Ref({2}, {2, 3});
  ExpectRef(Apply(N("lt"), {a, b}), {2, 2}, DT_BOOL, {1, 1, 0, 0});
  ExpectRef(Apply(N("ge"), {a, b}), {2, 2}, DT_BOOL, {0, 0, 1, 1});
  ExpectRef(Apply(N("eq"), {a, Ref({2}, {1, 4})}), {2, 2}, DT_BOOL,
            {1, 0, 0, 1});
  ExpectRef(Apply(N("ne").F("scalar", 3), {a}), {2, 2}, DT_BOOL, {1, 1, 0, 1});
  ExpectRef(Apply(N("gt").F("scalar", 3).I("reverse", 1), {a}), {2, 2}, DT_BOOL,
            {1, 1, 0, 0});
  ExpectRef(Apply(N("le"), {Ref({1}, {kNaN}), Ref({1}, {kNaN})}), {1}, DT_BOOL,
            {0});
  const RefTensor p = Ref({4}, {0, 0, 1, 1}, DT_BOOL),
                  q = Ref({4}, {0, 1, 0, 1}, DT_BOOL);
  ExpectRef(Apply(N("logical_and"), {p, q}), {4}, DT_BOOL, {0, 0, 0, 1});
  ExpectRef(Apply(N("logical_or"), {p, q}), {4}, DT_BOOL, {0, 1, 1, 1});
  ExpectRef(Apply(N("logical_not"), {Ref({3}, {0, 2, -1}, DT_INT64)}), {3},
            DT_BOOL, {1, 0, 0});
}

TEST(ReferenceTest, UnaryOpsAtHandPoints) {
  const RefTensor x = Ref({3}, {-2, 0, 4});
  ExpectRef(Apply(N("relu"), {Ref({3}, {-2, kNaN, 4})}), {3}, DT_FLOAT32,
            {0, kNaN, 4});
  ExpectRef(Apply(N("relu"), {Ref({2}, {-2, 3}, DT_INT64)}), {2}, DT_INT64,
            {0, 3});
  ExpectRef(Apply(N("neg"), {x}), {3}, DT_FLOAT32, {2, 0, -4});
  ExpectRef(Apply(N("abs"), {x}), {3}, DT_FLOAT32, {2, 0, 4});
  ExpectRef(Apply(N("clone"), {x}), {3}, DT_FLOAT32, {-2, 0, 4});
  ExpectRef(Apply(N("identity"), {x}), {3}, DT_FLOAT32, {-2, 0, 4});
  ExpectRef(Apply(N("sqrt"), {Ref({2}, {4, 2.25})}), {2}, DT_FLOAT32, {2, 1.5});
  ExpectRef(Apply(N("rsqrt"), {Ref({2}, {4, 0.25})}), {2}, DT_FLOAT32,
            {0.5, 2});
  ExpectRef(Apply(N("exp"), {Ref({1}, {1})}), {1}, DT_FLOAT32, {M_E});
  ExpectRef(Apply(N("log"), {Ref({2}, {M_E, 0})}), {2}, DT_FLOAT32,
            {1, -HUGE_VAL});
  ExpectRef(Apply(N("sigmoid"), {x}), {3}, DT_FLOAT32,
            {1 / (1 + std::exp(2.0)), 0.5, 1 / (1 + std::exp(-4.0))});
  ExpectRef(Apply(N("silu"), {x}), {3}, DT_FLOAT32,
            {-2 / (1 + std::exp(2.0)), 0, 4 / (1 + std::exp(-4.0))});
  ExpectRef(Apply(N("tanh"), {Ref({1}, {0.5})}), {1}, DT_FLOAT32,
            {0.46211715726000974});
  ExpectRef(Apply(N("cos"), {Ref({1}, {M_PI})}), {1}, DT_FLOAT32, {-1});
  ExpectRef(Apply(N("sin"), {Ref({1}, {M_PI / 2})}), {1}, DT_FLOAT32, {1});
}

TEST(ReferenceTest, GeluErfAndTanhApproximations) {
  const RefTensor x = Ref({3}, {-1, 0.5, 2});
  // F.gelu(x) and F.gelu(x, approximate="tanh") (torch).
  const std::vector<double> erf = {-0.15865525393145702, 0.34573123063700656,
                                   1.9544997361036416};
  ExpectRef(Apply(N("gelu"), {x}), {3}, DT_FLOAT32, erf);
  ExpectRef(Apply(N("gelu").S("approximate", "none"), {x}), {3}, DT_FLOAT32,
            erf);
  ExpectRef(Apply(N("gelu").S("approximate", "tanh"), {x}), {3}, DT_FLOAT32,
            {-0.15880800939172324, 0.34571400982514394, 1.954597694087775});
  ExpectError(Apply(N("gelu").S("approximate", "fast"), {x}),
              absl::StatusCode::kInvalidArgument, "\"fast\"");
}

TEST(ReferenceTest, WhereBroadcastsAllThree) {
  // cond [2, 1], a [3], b [] -> [2, 3].
  ExpectRef(Apply(N("where"), {Ref({2, 1}, {1, 0}, DT_BOOL),
                               Ref({3}, {1, 2, 3}), Ref({}, {-HUGE_VAL})}),
            {2, 3}, DT_FLOAT32, {1, 2, 3, -HUGE_VAL, -HUGE_VAL, -HUGE_VAL});
}

// ---- normalisation and reductions ------------------------------------------

TEST(ReferenceTest, SoftmaxRowsSumToOneAndMatchTorch) {
  ExpectRef(
      Apply(N("softmax").I("dim", -1), {Ref({3}, {1, 2, 3})}), {3}, DT_FLOAT32,
      {0.09003057317038045, 0.2447284710547976, 0.6652409557748218});  // torch
  ExpectRef(Apply(N("log_softmax").I("dim", 0), {Ref({3}, {1, 2, 3})}), {3},
            DT_FLOAT32,
            {-2.4076059644443806, -1.4076059644443804,
             -0.4076059644443804});  // torch
  // Along dim 0 of [[1, -1], [3, 0.5]]: each column sums to 1 (torch).
  absl::StatusOr<RefTensor> r =
      Apply(N("softmax").I("dim", 0), {Ref({2, 2}, {1, -1, 3, 0.5})});
  ExpectRef(r, {2, 2}, DT_FLOAT32,
            {0.11920292202211755, 0.18242552380635632, 0.8807970779778823,
             0.8175744761936437});
  EXPECT_NEAR(r->v[0] + r->v[2], 1, 1e-15);
  EXPECT_NEAR(r->v[1] + r->v[3], 1, 1e-15);
  // Large logits do not overflow; a row of -inf is NaN, as in torch.
  ExpectRef(Apply(N("softmax").I("dim", 1),
                  {Ref({2, 2}, {1000, 1000, -HUGE_VAL, -HUGE_VAL})}),
            {2, 2}, DT_FLOAT32, {0.5, 0.5, kNaN, kNaN});
}

TEST(ReferenceTest, LayerNormWithWeightAndBias) {
  // F.layer_norm(x, (3,), w, b, eps=1e-5) (torch).
  ExpectRef(Apply(N("layer_norm")
                      .I("ndim", 1)
                      .F("eps", 1e-5)
                      .I("has_weight", 1)
                      .I("has_bias", 1),
                  {Ref({2, 3}, {1, 2, 4, -1, 0, 3}), Ref({3}, {1, 2, 0.5}),
                   Ref({3}, {0, 1, -1})}),
            {2, 3}, DT_FLOAT32,
            {-1.069041531450298, 0.46547923427485083, -0.3318490428435641,
             -0.9805789785364645, 0.2155368171708284, -0.313594715024475});
  // Over the last two dims, no weight or bias, eps 0.1 (torch).
  const double a = 1.2909944487358056, b = 0.43033148291193524;
  ExpectRef(Apply(N("layer_norm").I("ndim", 2).F("eps", 0.1),
                  {Ref({2, 2, 2}, {0, 1, 2, 3, 4, 5, 6, 7})}),
            {2, 2, 2}, DT_FLOAT32, {-a, -b, b, a, -a, -b, b, a});
}

TEST(ReferenceTest, ReductionsOverDimsWithKeepdim) {
  const RefTensor x = Ref({2, 3}, {1, 2, 3, 4, 5, 6});
  ExpectRef(Apply(N("sum").Ints("dims", {1}).I("keepdim", 1), {x}), {2, 1},
            DT_FLOAT32, {6, 15});
  ExpectRef(Apply(N("sum").Ints("dims", {0}), {x}), {3}, DT_FLOAT32, {5, 7, 9});
  ExpectRef(Apply(N("mean").Ints("dims", {}), {x}), {}, DT_FLOAT32, {3.5});
  ExpectRef(Apply(N("mean").Ints("dims", {0, 1}).I("keepdim", 1), {x}), {1, 1},
            DT_FLOAT32, {3.5});
  ExpectRef(Apply(N("amax").Ints("dims", {-1}), {x}), {2}, DT_FLOAT32, {3, 6});
  ExpectRef(Apply(N("amax").Ints("dims", {0}), {Ref({2, 2}, {1, kNaN, 3, 0})}),
            {2}, DT_FLOAT32, {3, kNaN});
  ExpectRef(Apply(N("sum").Ints("dims", {0}), {Ref({3}, {-1, 5, 7}, DT_INT64)}),
            {}, DT_INT64, {11});
  ExpectError(Apply(N("mean").Ints("dims", {0}), {Ref({2}, {1, 2}, DT_INT64)}),
              absl::StatusCode::kInvalidArgument, "needs a floating-point input, got int64");
}

// ---- products ---------------------------------------------------------------

TEST(ReferenceTest, MatmulOfVectorsAndBroadcastBatches) {
  const RefTensor v = Ref({3}, {1, -2, 3});
  // v @ [[0, 1], [2, 3], [4, 5]] = [8, 10]; [[0, 1, 2], [3, 4, 5]] @ v =
  // [4, 10]; v @ v = 14 (rank 0).
  ExpectRef(Apply(N("matmul"), {v, Ref({3, 2}, {0, 1, 2, 3, 4, 5})}), {2},
            DT_FLOAT32, {8, 10});
  ExpectRef(Apply(N("matmul"), {Ref({2, 3}, {0, 1, 2, 3, 4, 5}), v}), {2},
            DT_FLOAT32, {4, 10});
  ExpectRef(Apply(N("matmul"), {v, v}), {}, DT_FLOAT32, {14});
  // arange(12).view(2, 1, 2, 3) @ (arange(18).view(3, 3, 2) - 5) (torch).
  std::vector<double> a(12), b(18);
  for (int i = 0; i < 12; ++i) a[i] = i;
  for (int i = 0; i < 18; ++i) b[i] = i - 5;
  ExpectRef(Apply(N("matmul"), {Ref({2, 1, 2, 3}, a), Ref({3, 3, 2}, b)}),
            {2, 3, 2, 2}, DT_FLOAT32,
            {-5,  -2,  -32, -20, 13, 16, 40, 52,  31,  34,  112, 124,
             -59, -38, -86, -56, 67, 88, 94, 124, 193, 214, 274, 304});
}

TEST(ReferenceTest, MmLinearAndAddmm) {
  const RefTensor a = Ref({2, 2}, {1, 2, 3, 4}), b = Ref({2, 2}, {5, 6, 7, 8});
  ExpectRef(Apply(N("mm"), {a, b}), {2, 2}, DT_FLOAT32, {19, 22, 43, 50});
  // linear: x [1, 2, 2] @ W^T + bias, W = [[1, 0], [1, 1], [0, -1]].
  ExpectRef(Apply(N("linear"),
                  {Ref({1, 2, 2}, {1, 2, 3, 4}),
                   Ref({3, 2}, {1, 0, 1, 1, 0, -1}), Ref({3}, {10, 20, 30})}),
            {1, 2, 3}, DT_FLOAT32, {11, 23, 28, 13, 27, 26});
  ExpectRef(Apply(N("linear"), {Ref({2}, {1, 2}), Ref({1, 2}, {3, 4})}), {1},
            DT_FLOAT32, {11});
  // addmm: bias [2] broadcast over rows; 0.5 * bias + 2 * (a @ b).
  ExpectRef(
      Apply(N("addmm").F("beta", 0.5).F("alpha", 2), {Ref({2}, {2, 4}), a, b}),
      {2, 2}, DT_FLOAT32, {39, 46, 87, 102});
  ExpectRef(Apply(N("addmm"), {Ref({2, 1}, {1, -1}), a, b}), {2, 2}, DT_FLOAT32,
            {20, 23, 42, 49});
  // beta = 0 ignores the bias, NaN included (torch.addmm's rule).
  ExpectRef(Apply(N("addmm").F("beta", 0), {Ref({}, {kNaN}), a, b}), {2, 2},
            DT_FLOAT32, {19, 22, 43, 50});
}

// ---- data movement ----------------------------------------------------------

TEST(ReferenceTest, EmbeddingGathersRowsAndNamesAnIdOutOfRange) {
  const RefTensor w = Ref({3, 2}, {0, 1, 10, 11, 20, 21});
  ExpectRef(Apply(N("embedding"), {Ref({2, 2}, {2, 0, 1, 1}, DT_INT64), w}),
            {2, 2, 2}, DT_FLOAT32, {20, 21, 0, 1, 10, 11, 10, 11});
  ExpectError(Apply(N("embedding"), {Ref({2}, {1, 3}, DT_INT64), w}),
              absl::StatusCode::kInvalidArgument,
              "embedding id 3 (at flat index 1)");
  ExpectError(Apply(N("embedding"), {Ref({1}, {-1}, DT_INT32), w}),
              absl::StatusCode::kInvalidArgument, "embedding id -1");
}

TEST(ReferenceTest, ReshapeInfersMinusOneAndKeepsOrder) {
  const RefTensor x = Ref({2, 3}, {1, 2, 3, 4, 5, 6});
  ExpectRef(Apply(N("reshape").Ints("shape", {3, -1}), {x}), {3, 2}, DT_FLOAT32,
            {1, 2, 3, 4, 5, 6});
  ExpectRef(Apply(N("unsqueeze").I("dim", -1), {x}), {2, 3, 1}, DT_FLOAT32,
            {1, 2, 3, 4, 5, 6});
  // squeeze leaves a listed dim that is not 1.
  ExpectRef(Apply(N("squeeze").Ints("dims", {0, 2}), {Ref({2, 1, 1}, {7, 8})}),
            {2, 1}, DT_FLOAT32, {7, 8});
}

TEST(ReferenceTest, PermuteAndExpand) {
  // x [2, 3, 1] permuted to [3, 1, 2]: out[j, 0, i] = x[i, j, 0].
  ExpectRef(Apply(N("permute").Ints("dims", {1, 2, 0}),
                  {Ref({2, 3, 1}, {1, 2, 3, 4, 5, 6})}),
            {3, 1, 2}, DT_FLOAT32, {1, 4, 2, 5, 3, 6});
  // expand [2, 1] to [2, 2, 3] with -1 keeping dim 1's 2.
  ExpectRef(Apply(N("expand").Ints("shape", {2, -1, 3}), {Ref({2, 1}, {1, 2})}),
            {2, 2, 3}, DT_FLOAT32, {1, 1, 1, 2, 2, 2, 1, 1, 1, 2, 2, 2});
}

TEST(ReferenceTest, SliceWithNegativeBoundsStepAndClamping) {
  std::vector<double> ten(10);
  for (int i = 0; i < 10; ++i) ten[i] = i;
  const RefTensor x = Ref({10}, ten);
  // x[-8:-1:3] = [2, 5, 8]; x[-100:3] = [0, 1, 2]; x[7:100:2] = [7, 9];
  // x[5:2] is empty.
  ExpectRef(
      Apply(N("slice").I("dim", 0).I("start", -8).I("stop", -1).I("step", 3),
            {x}),
      {3}, DT_FLOAT32, {2, 5, 8});
  ExpectRef(Apply(N("slice").I("dim", 0).I("start", -100).I("stop", 3), {x}),
            {3}, DT_FLOAT32, {0, 1, 2});
  ExpectRef(
      Apply(N("slice").I("dim", 0).I("start", 7).I("stop", 100).I("step", 2),
            {x}),
      {2}, DT_FLOAT32, {7, 9});
  ExpectRef(Apply(N("slice").I("dim", 0).I("start", 5).I("stop", 2), {x}), {0},
            DT_FLOAT32, {});
  // Along the last dim of [2, 3], stop absent: x[:, 1:].
  ExpectRef(Apply(N("slice").I("dim", -1).I("start", 1),
                  {Ref({2, 3}, {1, 2, 3, 4, 5, 6})}),
            {2, 2}, DT_FLOAT32, {2, 3, 5, 6});
}

TEST(ReferenceTest, SelectRemovesTheDim) {
  const RefTensor x = Ref({2, 3}, {1, 2, 3, 4, 5, 6});
  ExpectRef(Apply(N("select").I("dim", 1).I("index", -1), {x}), {2}, DT_FLOAT32,
            {3, 6});
  ExpectRef(Apply(N("select").I("dim", 0).I("index", 1), {x}), {3}, DT_FLOAT32,
            {4, 5, 6});
}

TEST(ReferenceTest, CatAndStack) {
  const RefTensor a = Ref({2, 1}, {1, 2}), b = Ref({2, 2}, {3, 4, 5, 6});
  ExpectRef(Apply(N("cat").I("dim", 1), {a, b}), {2, 3}, DT_FLOAT32,
            {1, 3, 4, 2, 5, 6});
  ExpectRef(Apply(N("cat").I("dim", 0), {Ref({1, 2}, {1, 2}), b}), {3, 2},
            DT_FLOAT32, {1, 2, 3, 4, 5, 6});
  const RefTensor c = Ref({2}, {1, 2}), d = Ref({2}, {3, 4});
  ExpectRef(Apply(N("stack").I("dim", 0), {c, d}), {2, 2}, DT_FLOAT32,
            {1, 2, 3, 4});
  ExpectRef(Apply(N("stack").I("dim", -1), {c, d}), {2, 2}, DT_FLOAT32,
            {1, 3, 2, 4});
}

TEST(ReferenceTest, TriuAndTrilWithDiagonal) {
  const RefTensor x = Ref({3, 3}, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  ExpectRef(Apply(N("triu").I("diagonal", 1), {x}), {3, 3}, DT_FLOAT32,
            {0, 2, 3, 0, 0, 6, 0, 0, 0});
  ExpectRef(Apply(N("tril"), {x}), {3, 3}, DT_FLOAT32,
            {1, 0, 0, 4, 5, 0, 7, 8, 9});
  ExpectRef(
      Apply(N("tril").I("diagonal", -1), {Ref({1, 2, 3}, {1, 2, 3, 4, 5, 6})}),
      {1, 2, 3}, DT_FLOAT32, {0, 0, 0, 4, 0, 0});
}

// ---- creation and types -----------------------------------------------------

TEST(ReferenceTest, ArangeFullAndSize) {
  ExpectRef(Apply(N("arange").I("end", 4).I("dtype", DT_INT64), {}), {4},
            DT_INT64, {0, 1, 2, 3});
  // arange(2, -5, -3) = [2, -1, -4]; arange(3, 3) is empty.
  ExpectRef(Apply(N("arange")
                      .I("start", 2)
                      .I("end", -5)
                      .I("step", -3)
                      .I("dtype", DT_INT64),
                  {}),
            {3}, DT_INT64, {2, -1, -4});
  ExpectRef(
      Apply(N("arange").I("start", 3).I("end", 3).I("dtype", DT_FLOAT32), {}),
      {0}, DT_FLOAT32, {});
  ExpectRef(Apply(N("full")
                      .Ints("shape", {2, 1})
                      .F("value", -HUGE_VAL)
                      .I("dtype", DT_FLOAT32),
                  {}),
            {2, 1}, DT_FLOAT32, {-HUGE_VAL, -HUGE_VAL});
  ExpectRef(
      Apply(N("full").Ints("shape", {}).F("value", 0.1).I("dtype", DT_BFLOAT16),
            {}),
      {}, DT_BFLOAT16, {0.1});  // unrounded: the oracle's value
  ExpectRef(
      Apply(N("full").Ints("shape", {2}).F("value", 3).I("dtype", DT_INT32),
            {}),
      {2}, DT_INT32, {3, 3});
  ExpectRef(
      Apply(N("size").I("dim", -1), {Ref({2, 5}, std::vector<double>(10))}), {},
      DT_INT64, {5});
}

TEST(ReferenceTest, CastTruncatesToIntAndRoundsToNearestEven) {
  // .to(torch.int64) of [-1.9, 1.9, 2.5, -0.5] is [-1, 1, 2, 0] (torch).
  ExpectRef(
      Apply(N("cast").I("dtype", DT_INT64), {Ref({4}, {-1.9, 1.9, 2.5, -0.5})}),
      {4}, DT_INT64, {-1, 1, 2, 0});
  // bfloat16 keeps 8 significant bits: 1 + 2^-8 is a tie and goes to the
  // even 1; 1 + 3 * 2^-8 goes to the even 1 + 2^-6 (torch).
  ExpectRef(Apply(N("cast").I("dtype", DT_BFLOAT16),
                  {Ref({4}, {1 + std::ldexp(1, -8), 1 + 3 * std::ldexp(1, -8),
                             -2.7, static_cast<float>(1e-3)})}),
            {4}, DT_BFLOAT16, {1.0, 1.015625, -2.703125, 0.00099945068359375},
            0);
  // float16: ties to even likewise; 65520 overflows to inf (torch).
  ExpectRef(Apply(N("cast").I("dtype", DT_FLOAT16),
                  {Ref({3}, {1 + std::ldexp(1, -11), 1 + 3 * std::ldexp(1, -11),
                             65520})}),
            {3}, DT_FLOAT16, {1.0, 1.001953125, HUGE_VAL}, 0);
  ExpectRef(Apply(N("cast").I("dtype", DT_BOOL), {Ref({3}, {0, -0.5, kNaN})}),
            {3}, DT_BOOL, {0, 1, 1});
  ExpectRef(
      Apply(N("cast").I("dtype", DT_FLOAT32), {Ref({2}, {1, 0}, DT_BOOL)}), {2},
      DT_FLOAT32, {1, 0});
  ExpectError(Apply(N("cast").I("dtype", DT_INT32), {Ref({1}, {1e10})}),
              absl::StatusCode::kInvalidArgument, "undefined");
}

// ---- generation -------------------------------------------------------------

// Two sequences interleaved in one prefill step: seq [0, 1, 0, 1, 0] at
// positions [0, 0, 1, 1, 2]; two query heads share one key/value head.
std::vector<RefTensor> PrefillStep(std::vector<double> positions) {
  std::vector<double> q(20), k(10), v(10);
  for (int i = 0; i < 20; ++i) q[i] = (i - 10) * 0.25;
  for (int i = 0; i < 10; ++i) k[i] = ((i * 7) % 5 - 2) * 0.5;
  for (int i = 0; i < 10; ++i) v[i] = i - 4.5;
  return {Ref({1, 2, 5, 2}, q),
          Ref({1, 1, 5, 2}, k),
          Ref({1, 1, 5, 2}, v),
          Ref({5}, std::move(positions), DT_INT64),
          Ref({5}, {0, 1, 0, 1, 0}, DT_INT64),
          Ref({2, 1}, {0, 1}, DT_INT64),
          Ref({2}, {7, 9}, DT_INT64)};
}

TEST(ReferenceTest, CachedAttentionPrefillIsCausalAttentionPerSequence) {
  // softmax(q_s k_s^T * 0.5 + causal mask) v_s for each sequence s's own
  // tokens, each query head against the one key/value head (torch).
  ExpectRef(Apply(N("cached_attention")
                      .F("scale", 0.5)
                      .I("kv_heads", 1)
                      .I("head_dim", 2),
                  PrefillStep({0, 0, 1, 1, 2})),
            {1, 2, 5, 2}, DT_FLOAT32,
            {-4.5,
             -3.5,
             -2.5,
             -1.5,
             -2.9898373248074184,
             -1.9898373248074184,
             -0.5624796628920625,
             0.4375203371079375,
             -0.762242382814202,
             0.23775761718579796,
             -4.5,
             -3.5,
             -2.5,
             -1.5,
             -2.3751625065049753,
             -1.3751625065049753,
             0.04812317792153281,
             1.0481231779215328,
             0.9161465950891069,
             1.9161465950891068});
}

TEST(ReferenceTest, CachedAttentionRefusesWhatNeedsACache) {
  ExpectError(Apply(N("cached_attention").F("scale", 0.5),
                    PrefillStep({3, 0, 4, 1, 5})),
              absl::StatusCode::kUnimplemented,
              "sequence 0 starts at position 3");
  ExpectError(Apply(N("cached_attention").F("scale", 0.5),
                    PrefillStep({0, 0, 0, 1, 2})),
              absl::StatusCode::kInvalidArgument, "not 0..2 once each");
}

TEST(ReferenceTest, SampleTokensPicksAsTheCpuSamplerPicks) {
  // floats: temperature, top_p, repetition_penalty, frequency_penalty; top_p
  // and top_k do not matter to a greedy row.
  std::vector<RefTensor> in = {
      Ref({2, 3}, {1, 3, 3, 5, 0, 4}), Ref({2, 4}, {0, 1, 1, 0, 0, 0.5, 1, 0}),
      Ref({2, 3}, {0, 1, 0, 5, 2, 0}, DT_INT64), Ref({2}, {0, 1}, DT_INT64),
      Ref({2}, {0, 2}, DT_INT64)};
  ExpectRef(Apply(N("sample_tokens"), in), {2}, DT_INT64, {1, 0});
  in[1].v[6] = 3;  // row 1's context (0 and 1): 5 / 3 and 0 * 3, so 4 wins
  ExpectRef(Apply(N("sample_tokens"), in), {2}, DT_INT64, {1, 2});
  in[1].v[6] = 1;
  in[1].v[4] = 0.8;  // row 1 at temperature 0.8 with top-k 1: its largest
  in[2].v[3] = 1;
  ExpectRef(Apply(N("sample_tokens"), in), {2}, DT_INT64, {1, 0});
  in[1].v[7] = 6;  // 6 off each of the 2 tokens generated (0 and 1): 4 wins
  in[2].v[5] = 2;
  ExpectRef(Apply(N("sample_tokens"), in), {2}, DT_INT64, {1, 2});
  in[4].v[1] = 3;  // past the context: the CPU's error
  ExpectError(Apply(N("sample_tokens"), in), absl::StatusCode::kInvalidArgument,
              "sequence 1's context ends at 3");
}

// The reference's own picks (written apart from the CPU's sampler) agree
// with the sampler on rows that draw: temperature, top-k, top-p, seeds and
// penalties over random logits and contexts.
TEST(ReferenceTest, SampleTokensDrawsAsTheSamplerDefinesThem) {
  std::mt19937 rng(3);
  std::normal_distribution<double> logit(0, 2);
  std::uniform_real_distribution<double> unit(0, 1);
  std::uniform_int_distribution<int> token(0, 39);
  const int64_t rows = 200, vocab = 40, per_row = 6;
  std::vector<double> logits(rows * vocab), floats, ints, context, ends;
  for (double& v : logits) v = static_cast<float>(logit(rng));
  for (int64_t r = 0; r < rows; ++r) {
    floats.insert(floats.end(), {static_cast<float>(r % 5 == 0 ? 0 : 0.3 + unit(rng)),
                                 static_cast<float>(r % 3 == 0 ? 1 : 0.2 + 0.8 * unit(rng)),
                                 static_cast<float>(r % 2 == 0 ? 1 : 1.3),
                                 static_cast<float>(r % 4 == 0 ? 0.5 : 0)});
    ints.insert(ints.end(), {static_cast<double>(r % 7 == 0 ? 0 : r % 7 + 3),
                             static_cast<double>(r * 31 + 1), static_cast<double>(r % 4)});
    for (int i = 0; i < per_row; ++i) context.push_back(token(rng));
    ends.push_back(static_cast<double>(context.size()));
  }
  const int64_t c = static_cast<int64_t>(context.size());
  absl::StatusOr<RefTensor> got = Apply(
      N("sample_tokens"),
      {Ref({rows, vocab}, logits), Ref({rows, 4}, floats), Ref({rows, 3}, ints, DT_INT64),
       Ref({c}, context, DT_INT64), Ref({rows}, ends, DT_INT64)});
  ASSERT_TRUE(got.ok()) << got.status();
  for (int64_t r = 0; r < rows; ++r) {
    SamplingParams p;
    p.temperature = static_cast<float>(floats[r * 4]);
    p.top_p = static_cast<float>(floats[r * 4 + 1]);
    p.repetition_penalty = static_cast<float>(floats[r * 4 + 2]);
    p.frequency_penalty = static_cast<float>(floats[r * 4 + 3]);
    p.top_k = static_cast<int64_t>(ints[r * 3]);
    p.seed = static_cast<uint64_t>(ints[r * 3 + 1]);
    std::vector<float> row(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
    std::vector<int64_t> seen(context.begin() + r * per_row, context.begin() + (r + 1) * per_row);
    EXPECT_EQ(got->v[r], SampleToken(row, p, seen, static_cast<int64_t>(ints[r * 3 + 2])))
        << "row " << r;
  }
}

// Backend against backend: a NaN on one side only (an element the device
// emulator left unwritten) or another shape is never "close".
TEST(ReferenceTest, MaxRelativeDifferenceCountsAnUnwrittenElementAsWrong) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const Tensor want = Tensor::FromVector({3}, {1.0f, -4.0f, 2.0f});
  EXPECT_DOUBLE_EQ(MaxRelativeDifference(Tensor::FromVector({3}, {1.0f, -4.0f, 3.0f}), want),
                   0.25);
  EXPECT_EQ(MaxRelativeDifference(Tensor::FromVector({3}, {1.0f, nan, 2.0f}), want), INFINITY);
  EXPECT_EQ(MaxRelativeDifference(Tensor::FromVector({1, 3}, {1.0f, -4.0f, 2.0f}), want),
            INFINITY);
  const Tensor both = Tensor::FromVector({2}, {nan, 1.0f});
  EXPECT_EQ(MaxRelativeDifference(both, both), 0.0);
  // An infinity must be matched, and does not hide the other errors.
  const float inf = std::numeric_limits<float>::infinity();
  const Tensor with_inf = Tensor::FromVector({3}, {inf, -4.0f, 2.0f});
  EXPECT_DOUBLE_EQ(MaxRelativeDifference(Tensor::FromVector({3}, {inf, -4.0f, 3.0f}), with_inf),
                   0.25);
  EXPECT_EQ(MaxRelativeDifference(Tensor::FromVector({3}, {-inf, -4.0f, 2.0f}), with_inf),
            INFINITY);
  EXPECT_EQ(MaxRelativeDifference(Tensor::FromVector({3}, {5.0f, -4.0f, 2.0f}), with_inf),
            INFINITY);
}

}  // namespace
}  // namespace pipeserve
