// The device lowering's decisions, read off the plan: fusions, GEMM layouts,
// dtypes, staging, buffer layout. (Its numerics run through the op suite
// in backend_test.cc on the device emulator.)
#include "runtime/cuda/device_plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/conformance/cases.h"
#include "runtime/cuda/device_generation.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;
using Type = DeviceOp::Type;

DevicePlan PlanFor(const Model& m, Precision p,
                   const std::vector<Shape>& shapes,
                   std::optional<LoweredStage>* stage_out = nullptr) {
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, p);
  EXPECT_TRUE(stage.ok()) << stage.status();
  absl::StatusOr<DevicePlan> plan = stage->Plan(shapes);
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (stage_out != nullptr) stage_out->emplace(*std::move(stage));
  return *std::move(plan);
}

std::vector<Type> Compute(const DevicePlan& plan) {
  std::vector<Type> t;
  for (size_t i = plan.compute_begin; i < plan.compute_end; ++i)
    t.push_back(plan.ops[i].type);
  return t;
}

const DeviceOp& OnlyGemm(const DevicePlan& plan) {
  auto it =
      std::find_if(plan.ops.begin(), plan.ops.end(),
                   [](const DeviceOp& op) { return op.type == Type::kGemm; });
  EXPECT_NE(it, plan.ops.end());
  return *it;
}

Model LinearRelu() {
  GraphBuilder b;
  b.Input("x", {-1, 40}).Param("l.weight", {24, 40}).Param("l.bias", {24});
  b.Op("linear", {"x", "l.weight", "l.bias"}, "h", "l")
      .Op("relu", {"h"}, "y")
      .Output("y");
  return b.Build();
}

TEST(DevicePlanTest, LinearThenReluIsOneGemmWithBiasAndReluEpilogue) {
  Model m = LinearRelu();
  LoweredStage stage =
      *LoweredStage::Create(m.graph, m.weights, Precision::kFloat32);
  EXPECT_EQ(stage.fused_relus(), 1);
  DevicePlan plan = *stage.Plan({{16, 40}});
  EXPECT_EQ(Compute(plan), std::vector<Type>{Type::kGemm});
  const GemmOp& g = OnlyGemm(plan).gemm;
  EXPECT_TRUE(g.has_bias);
  EXPECT_TRUE(g.relu);
  // Y^T [24, 16] = op_T(W^T as [40, 24]) · X^T [40, 16], all column-major.
  EXPECT_TRUE(g.trans_a);
  EXPECT_EQ(g.m, 24);
  EXPECT_EQ(g.n, 16);
  EXPECT_EQ(g.k, 40);
  EXPECT_EQ(g.lda, 40);
  EXPECT_EQ(g.ldb, 40);
  EXPECT_EQ(g.ldd, 24);
  EXPECT_EQ(g.a.arena, Arena::kWeights);
  EXPECT_EQ(g.bias.arena, Arena::kWeights);
}

TEST(DevicePlanTest, MmIsANonTransposedGemmWithWeightsAsA) {
  GraphBuilder b;
  b.Input("x", {-1, 3, 32}).Param("w", {32, 16});
  b.Op("matmul", {"x", "w"}, "y").Output("y");
  Model m = b.Build();
  DevicePlan plan = PlanFor(m, Precision::kFloat32, {{5, 3, 32}});
  const GemmOp& g = OnlyGemm(plan).gemm;
  EXPECT_FALSE(g.trans_a);
  EXPECT_EQ(g.m, 16);
  EXPECT_EQ(g.n, 15);  // 5 x 3 rows
  EXPECT_EQ(g.k, 32);
  EXPECT_EQ(g.lda, 16);
  EXPECT_EQ(g.ldb, 32);
  EXPECT_FALSE(g.relu);
  EXPECT_FALSE(g.has_bias);
}

TEST(DevicePlanTest, ReluOfALinearOutputWithAnotherReaderStaysAnOp) {
  GraphBuilder b;
  b.Input("x", {-1, 16}).Param("l.weight", {16, 16});
  b.Op("linear", {"x", "l.weight"}, "h", "l").Op("relu", {"h"}, "r");
  b.Op("add", {"h", "r"}, "y").Output("y");
  Model m = b.Build();
  std::optional<LoweredStage> stage;
  DevicePlan plan = PlanFor(m, Precision::kFloat32, {{4, 16}}, &stage);
  EXPECT_EQ(stage->fused_relus(), 0);
  EXPECT_EQ(Compute(plan),
            (std::vector<Type>{Type::kGemm, Type::kRelu, Type::kBinary}));
}

TEST(DevicePlanTest, Float32PlansConvertNothing) {
  DevicePlan plan = PlanFor(LinearRelu(), Precision::kFloat32, {{16, 40}});
  for (const DeviceOp& op : plan.ops)
    EXPECT_NE(op.type, Type::kConvert) << op.node;
  EXPECT_EQ(plan.inputs[0].type, DType::kF32);
  EXPECT_EQ(OnlyGemm(plan).gemm.ab_type, DType::kF32);
}

TEST(DevicePlanTest, Bf16InputReadOnlyByGemmsIsConvertedWhileStaged) {
  DevicePlan plan = PlanFor(LinearRelu(), Precision::kBF16, {{16, 40}});
  ASSERT_EQ(plan.inputs.size(), 1u);
  EXPECT_EQ(plan.inputs[0].type, DType::kBF16);
  EXPECT_EQ(plan.ops[0].type, Type::kCopyIn);
  EXPECT_EQ(plan.ops[0].bytes, 16 * 40 * 2);  // half the float32 bytes
  EXPECT_EQ(Compute(plan), std::vector<Type>{Type::kGemm});
  const GemmOp& g = OnlyGemm(plan).gemm;
  EXPECT_EQ(g.ab_type, DType::kBF16);
  EXPECT_EQ(g.d_type, DType::kF32);  // an output: float32
}

TEST(DevicePlanTest,
     Bf16InputAlsoReadElementwiseIsStagedFloat32AndConvertedOnDevice) {
  GraphBuilder b;
  b.Input("x", {-1, 16}).Param("w", {16, 16});
  b.Op("mm", {"x", "w"}, "m").Op("add", {"m", "x"}, "y").Output("y");
  DevicePlan plan = PlanFor(b.Build(), Precision::kBF16, {{4, 16}});
  EXPECT_EQ(plan.inputs[0].type, DType::kF32);
  EXPECT_EQ(Compute(plan),
            (std::vector<Type>{Type::kConvert, Type::kGemm, Type::kBinary}));
  EXPECT_EQ(plan.ops[plan.compute_begin].dtype, DType::kBF16);
}

TEST(DevicePlanTest, Bf16GemmFeedingOnlyAGemmWritesBf16Directly) {
  GraphBuilder b;
  b.Input("x", {-1, 32}).Param("w1", {32, 24}).Param("w2", {24, 40});
  b.Op("mm", {"x", "w1"}, "h").Op("mm", {"h", "w2"}, "y").Output("y");
  DevicePlan plan = PlanFor(b.Build(), Precision::kBF16, {{4, 32}});
  EXPECT_EQ(Compute(plan), (std::vector<Type>{Type::kGemm, Type::kGemm}));
  const DeviceOp& first = plan.ops[plan.compute_begin];
  const DeviceOp& second = plan.ops[plan.compute_begin + 1];
  EXPECT_EQ(first.gemm.d_type, DType::kBF16);
  EXPECT_EQ(second.gemm.b.offset, first.gemm.d.offset);
  EXPECT_EQ(second.gemm.d_type, DType::kF32);
}

TEST(DevicePlanTest,
     Bf16LinearWithBiasFeedingAGemmComputesFloat32ThenConverts) {
  GraphBuilder b;
  b.Input("x", {-1, 8})
      .Param("a.weight", {8, 8})
      .Param("a.bias", {8})
      .Param("w", {8, 8});
  b.Op("linear", {"x", "a.weight", "a.bias"}, "h", "a")
      .Op("mm", {"h", "w"}, "y")
      .Output("y");
  DevicePlan plan = PlanFor(b.Build(), Precision::kBF16, {{4, 8}});
  EXPECT_EQ(Compute(plan),
            (std::vector<Type>{Type::kGemm, Type::kConvert, Type::kGemm}));
  EXPECT_EQ(plan.ops[plan.compute_begin].gemm.d_type, DType::kF32);
}

// Every step's float32 result that a GEMM reads gets its GEMM form, an
// elementwise one too (a refactor once returned before the conversion).
TEST(DevicePlanTest, Bf16SumFeedingAGemmIsConvertedAfterTheAdd) {
  GraphBuilder b;
  b.Input("x", {-1, 8}).Input("y", {-1, 8}).Param("w", {8, 8});
  b.Op("add", {"x", "y"}, "s").Op("mm", {"s", "w"}, "z").Output("z");
  DevicePlan plan = PlanFor(b.Build(), Precision::kBF16, {{4, 8}, {4, 8}});
  EXPECT_EQ(Compute(plan),
            (std::vector<Type>{Type::kBinary, Type::kConvert, Type::kGemm}));
}

TEST(DevicePlanTest, Tf32OperandsAreRoundedToTf32EverywhereTheyComeFrom) {
  Model m = LinearRelu();
  std::optional<LoweredStage> stage;
  DevicePlan plan = PlanFor(m, Precision::kTF32, {{16, 40}}, &stage);
  EXPECT_EQ(plan.inputs[0].type, DType::kTF32);
  const GemmOp& g = OnlyGemm(plan).gemm;
  EXPECT_EQ(g.ab_type, DType::kTF32);
  EXPECT_EQ(g.precision, Precision::kTF32);
  // The weight in the arena has its low 13 mantissa bits cleared; the bias
  // (an epilogue input) is exact float32.
  std::vector<char> arena(stage->weight_bytes());
  stage->FillWeights(arena.data());
  const Tensor& w = m.weights.at("l.weight");
  const float* stored =
      reinterpret_cast<const float*>(arena.data() + g.a.offset);
  for (int64_t i = 0; i < w.numel(); ++i) {
    EXPECT_EQ(stored[i], RoundToTf32(w.data()[i]));
    uint32_t bits;
    std::memcpy(&bits, &stored[i], 4);
    ASSERT_EQ(bits & 0x1fffu, 0u);
  }
  const Tensor& bias = m.weights.at("l.bias");
  const float* stored_bias =
      reinterpret_cast<const float*>(arena.data() + g.bias.offset);
  for (int64_t i = 0; i < bias.numel(); ++i)
    EXPECT_EQ(stored_bias[i], bias.data()[i]);
}

TEST(DevicePlanTest, RoundingHelpersRoundToNearestEven) {
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even.
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 0x1p-8f)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 0x1p-8f + 0x1p-20f)),
            1.0f + 0x1p-7f);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  EXPECT_EQ(RoundToTf32(1.0f + 0x1p-11f), 1.0f);  // tie: even
  EXPECT_EQ(RoundToTf32(1.0f + 0x1p-11f + 0x1p-20f), 1.0f + 0x1p-10f);
  EXPECT_EQ(RoundToTf32(-3.0f), -3.0f);
}

TEST(DevicePlanTest, BuffersAreAlignedAndDisjoint) {
  GraphBuilder b;
  b.Input("x", {-1, 12}).Input("col", {-1, 1}).Param("row", {12});
  b.Op("add", {"x", "row"}, "a").Op("sub", {"a", "col"}, "s");
  b.Op("mul", {"s", "x"}, "y").Op("clone", {"y"}, "c").Output("y").Output("c");
  DevicePlan plan = PlanFor(b.Build(), Precision::kFloat32, {{7, 12}, {7, 1}});
  std::vector<std::pair<int64_t, int64_t>> spans;  // activation [begin, end)
  for (const DeviceOp& op : plan.ops) {
    if (op.type == Type::kCopyOut) continue;
    int64_t bytes = op.type == Type::kCopyIn || op.type == Type::kCopy
                        ? op.bytes
                        : op.n * 4;
    EXPECT_EQ(op.dst.offset % kArenaAlignment, 0);
    EXPECT_EQ(op.dst.arena, Arena::kActivations);
    spans.push_back({op.dst.offset, op.dst.offset + bytes});
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    EXPECT_LE(spans[i - 1].second, spans[i].first);
  EXPECT_LE(spans.back().second, plan.activation_bytes);
  EXPECT_EQ(plan.outputs.size(), 2u);
}

TEST(DevicePlanTest, IdentityIsFreeAndAnOutputOfAnInputIsCopiedStraightBack) {
  GraphBuilder b;
  b.Input("x", {-1, 6});
  b.Op("identity", {"x"}, "xo").Output("xo");
  DevicePlan plan = PlanFor(b.Build(), Precision::kBF16, {{3, 6}});
  EXPECT_TRUE(Compute(plan).empty());
  ASSERT_EQ(plan.ops.size(), 2u);
  EXPECT_EQ(plan.ops[0].type, Type::kCopyIn);
  EXPECT_EQ(plan.ops[1].type, Type::kCopyOut);
  EXPECT_EQ(plan.ops[1].src.offset, plan.ops[0].dst.offset);
}

TEST(DevicePlanTest, InputsGoUpInOneCopy) {
  GraphBuilder b;
  b.Input("x", {-1, 12}).Input("y", {-1, 12}).Input("z", {-1, 3});
  b.Op("add", {"x", "y"}, "s").Op("relu", {"z"}, "r").Output("s").Output("r");
  DevicePlan plan =
      PlanFor(b.Build(), Precision::kFloat32, {{7, 12}, {7, 12}, {7, 3}});
  EXPECT_EQ(plan.compute_begin, 1u);  // one kCopyIn for the three inputs
  EXPECT_EQ(plan.ops[0].type, Type::kCopyIn);
  EXPECT_EQ(plan.ops[0].src.offset, 0);
  EXPECT_EQ(plan.ops[0].bytes, plan.inputs[2].staging.offset + 7 * 3 * 4);
}

TEST(DevicePlanTest, OpWithoutADeviceKernelFailsNamingIt) {
  GraphBuilder b;
  b.Input("x", {-1, 4});
  b.Op("relu", {"x"}, "y").Output("y");
  Model m = b.Build();
  m.graph.mutable_nodes(0)->set_op("gelu");
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32);
  ASSERT_FALSE(stage.ok());
  EXPECT_EQ(stage.status().code(), absl::StatusCode::kInvalidArgument);
}

// The kernel gate: layer_norm's kernel has run only in emulation, so the
// CUDA lowering refuses it by default, saying how to open the gate, and
// takes it with CudaOps::kUnconfirmed (--cuda_ops=unconfirmed).
TEST(DevicePlanTest, AnUnconfirmedKernelIsRefusedByDefaultAndTakenWithTheFlag) {
  GraphBuilder b;
  b.Input("x", {-1, 6, 10}).Param("w", {10}).Param("b", {10});
  b.Op("layer_norm", {"x", "w", "b"}, "y", "",
       {{"ndim", AttrI(1)}, {"has_weight", AttrI(1)}, {"has_bias", AttrI(1)}, {"eps", AttrF(1e-5)}})
      .Output("y");
  Model m = b.Build();
  absl::StatusOr<LoweredStage> refused = LoweredStage::Create(m.graph, m.weights, Precision::kFloat32);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("(layer_norm, float32)"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("--cuda_ops=unconfirmed"));
  absl::StatusOr<LoweredStage> taken =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  ASSERT_TRUE(taken.ok()) << taken.status();
  absl::StatusOr<DevicePlan> plan = taken->Plan({{3, 6, 10}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(Compute(*plan), std::vector<Type>{Type::kLayerNorm});
  const DeviceOp& op = plan->ops[plan->compute_begin];
  EXPECT_EQ(op.rows, 18);
  EXPECT_EQ(op.cols, 10);
  EXPECT_FLOAT_EQ(op.eps, 1e-5f);
  EXPECT_TRUE(op.has_weight && op.has_bias);
}

TEST(DevicePlanTest, ShapeErrorsNameTheNode) {
  GraphBuilder b;
  b.Input("x", {-1, 4}).Input("y", {-1, 4});
  b.Op("add", {"x", "y"}, "s").Output("s");
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(b.Build().graph, WeightMap(), Precision::kFloat32);
  ASSERT_TRUE(stage.ok());
  absl::StatusOr<DevicePlan> plan = stage->Plan({{3, 4}, {2, 4}});
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(plan.status().message()),
              HasSubstr("shapes do not broadcast"));
  EXPECT_THAT(std::string(plan.status().message()), HasSubstr("node \""));
}

TEST(DevicePlanTest, StagingRoundTripsTheInputsAndReusesReleasedOutputs) {
  GraphBuilder b;
  b.Input("x", {-1, 5});
  b.Op("relu", {"x"}, "y").Output("y");
  DevicePlan plan = PlanFor(b.Build(), Precision::kFloat32, {{2, 5}});
  Tensor x = Tensor::FromVector({2, 5}, {1, -2, 3, -4, 5, 6, -7, 8, 9, -10});
  std::vector<char> in(plan.staging_in_bytes), out(plan.staging_out_bytes);
  StageInputs(plan, {x}, in.data());
  EXPECT_EQ(
      std::memcmp(in.data() + plan.inputs[0].staging.offset, x.data(), 40), 0);
  std::memcpy(out.data() + plan.outputs[0].staging.offset, x.data(), 40);
  std::vector<Tensor> outputs;
  UnstageOutputs(plan, out.data(), &outputs);
  ASSERT_EQ(outputs.size(), 1u);
  EXPECT_EQ(outputs[0].shape(), (Shape{2, 5}));
  EXPECT_EQ(outputs[0].data()[3], -4.0f);
  const float* first = outputs[0].data();
  UnstageOutputs(plan, out.data(), &outputs);  // nobody else holds it: reused
  EXPECT_EQ(outputs[0].data(), first);
  Tensor held = outputs[0];
  UnstageOutputs(plan, out.data(), &outputs);  // held: a new buffer
  EXPECT_NE(outputs[0].data(), held.data());
}

// A reshape is a view (no op; its input's buffers), its size a host
// integer taken from the input's shape when the plan is made; a permute is
// one strided copy. In bf16 a GEMM output read only through a view by
// another GEMM is written as bfloat16 and never converted.
TEST(DevicePlanTest, ReshapesAreViewsSizesStayOnTheHostAndPermutesCopy) {
  GraphBuilder b;
  b.Input("x", {-1, 6, 8}).Param("w", {3, 4}).Param("w2", {5, 3});
  b.Op("size", {"x"}, "t", "", {{"dim", AttrI(1)}})
      .Op("reshape", {"x", "t"}, "h", "",
          {{"shape", AttrInts({-1, 0, 2, 4})}, {"shape_from", AttrInts({0, 2, 0, 0})}})
      .Op("permute", {"h"}, "p", "", {{"dims", AttrInts({0, 2, 1, 3})}})
      .Op("linear", {"p", "w"}, "q")
      .Op("reshape", {"q"}, "qv", "", {{"shape", AttrInts({-1, 12, 3})}})
      .Op("linear", {"qv", "w2"}, "r")
      .Output("r");
  Model m = b.Build();
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kBF16, true, CudaOps::kUnconfirmed);
  ASSERT_TRUE(stage.ok()) << stage.status();
  absl::StatusOr<DevicePlan> plan = stage->Plan({{5, 6, 8}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(Compute(*plan),
            (std::vector<Type>{Type::kStridedCopy, Type::kConvert, Type::kGemm, Type::kGemm}));
  const DeviceOp& copy = plan->ops[plan->compute_begin];
  EXPECT_EQ(copy.node, "p");
  EXPECT_EQ(copy.copy.n, 5 * 6 * 8);
  EXPECT_EQ(copy.copy.rank, 4);
  EXPECT_EQ(copy.copy.dims[1], 2);  // [B, 2, 6, 4] from [B, 6, 2, 4]
  EXPECT_EQ(copy.copy.src_strides[1], 4);
  EXPECT_EQ(copy.copy.src_strides[2], 8);
  EXPECT_EQ(copy.src.offset, plan->ops[0].dst.offset);  // x itself: the reshape copied nothing
  const DeviceOp& q = plan->ops[plan->compute_begin + 2];
  const DeviceOp& r = plan->ops[plan->compute_begin + 3];
  EXPECT_EQ(q.gemm.d_type, DType::kBF16);
  EXPECT_EQ(r.gemm.b.offset, q.gemm.d.offset);  // qv is q's buffer
  EXPECT_EQ(r.gemm.n, 5 * 12);

  m.graph.add_outputs("t");  // a size cannot leave the device plan
  absl::StatusOr<LoweredStage> refused =
      LoweredStage::Create(m.graph, m.weights, Precision::kBF16, true, CudaOps::kUnconfirmed);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("output \"t\" is a size"));
}

// int64 ids go up as they are and are checked on the host first, with
// the CPU backend's error; a bool comparison result comes back as bool.
TEST(DevicePlanTest, EmbeddingIdsAreCheckedOnTheHostAndIntegersGoUpAsTheyAre) {
  GraphBuilder b;
  b.Input("ids", {-1, 3}).Param("emb", {10, 4});
  b.graph().mutable_inputs(0)->set_dtype(DT_INT64);
  b.Op("reshape", {"ids"}, "flat", "", {{"shape", AttrInts({-1})}})
      .Op("embedding", {"flat", "emb"}, "e")
      .Op("gt", {"e"}, "positive", "", {{"scalar", AttrF(0)}})
      .Output("e")
      .Output("positive");
  Model m = b.Build();
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  ASSERT_TRUE(stage.ok()) << stage.status();
  absl::StatusOr<DevicePlan> plan = stage->Plan({{2, 3}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(Compute(*plan), (std::vector<Type>{Type::kEmbedding, Type::kProgram}));
  ASSERT_EQ(plan->index_checks.size(), 1u);
  EXPECT_EQ(plan->index_checks[0].rows, 10);
  EXPECT_EQ(plan->inputs[0].dtype, DT_INT64);
  EXPECT_EQ(plan->outputs[1].dtype, DT_BOOL);
  Tensor ids = Tensor::Empty({2, 3}, DT_INT64);
  for (int64_t i = 0; i < 6; ++i) ids.data_as<int64_t>()[i] = i;
  EXPECT_TRUE(CheckIndices(*plan, {ids}).ok());
  ids.data_as<int64_t>()[4] = 10;
  absl::Status bad = CheckIndices(*plan, {ids});
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.message(), HasSubstr("embedding id 10 (at flat index 4) is out of range for a "
                                       "table of 10 rows"));
  std::vector<char> in(plan->staging_in_bytes);
  ids.data_as<int64_t>()[4] = 7;
  StageInputs(*plan, {ids}, in.data());
  EXPECT_EQ(std::memcmp(in.data() + plan->inputs[0].staging.offset, ids.raw_data(), 48), 0);
}

// sample_tokens: the picks are made on the device (kernels/sample.h) from
// the logits and the staged sampling inputs, with scratch for the
// penalised logits; only the 3 token ids come back. The host checks the
// parameters before a run as the CPU's sample_tokens does.
TEST(DevicePlanTest, SamplingPicksOnTheDeviceAndOnlyTheTokensComeBack) {
  GraphBuilder b;
  b.Input("h", {-1, 8}).Param("head", {50, 8});
  b.Input("floats", {-1, 4}).Input("ints", {-1, 3}).Input("context", {-1}).Input("ends", {-1});
  for (int i : {2, 3, 4}) b.graph().mutable_inputs(i)->set_dtype(DT_INT64);
  b.Op("linear", {"h", "head"}, "logits")
      .Op("sample_tokens", {"logits", "floats", "ints", "context", "ends"}, "next")
      .Output("next");
  Model m = b.Build();
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  ASSERT_TRUE(stage.ok()) << stage.status();
  absl::StatusOr<DevicePlan> plan = stage->Plan({{3, 8}, {3, 4}, {3, 3}, {5}, {3}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(Compute(*plan), (std::vector<Type>{Type::kGemm, Type::kSample}));
  const DeviceOp& sample = plan->ops[plan->compute_end - 1];
  EXPECT_EQ(sample.rows, 3);
  EXPECT_EQ(sample.cols, 50);
  ASSERT_EQ(plan->ops.size(), plan->compute_end + 1);  // the picks: 3 int64 back
  EXPECT_EQ(plan->ops.back().bytes, 3 * 8);
  EXPECT_EQ(plan->ops.back().src.offset, sample.dst.offset);
  EXPECT_EQ(plan->inputs.size(), 5u);  // floats, ints, context and ends go up too
  ASSERT_EQ(plan->sample_checks.size(), 1u);
  EXPECT_EQ(plan->sample_checks[0].vocab, 50);

  const Tensor h = Tensor::Empty({3, 8});
  const Tensor floats = Tensor::FromVector({3, 4}, {0, 1, 1, 0, 0.7f, 0.5f, 1, 0, 0, 1, 1.2f, 0});
  Tensor ints = Tensor::Empty({3, 3}, DT_INT64);
  for (int64_t i = 0; i < 9; ++i) ints.data_as<int64_t>()[i] = i % 3 == 0 ? 0 : 1;
  const Tensor context = Tensor::Empty({5}, DT_INT64);
  Tensor ends = Tensor::Empty({3}, DT_INT64);
  for (int64_t i = 0; i < 3; ++i) ends.data_as<int64_t>()[i] = 2 * i;
  EXPECT_TRUE(CheckSampleInputs(*plan, {h, floats, ints, context, ends}).ok());
  ends.data_as<int64_t>()[2] = 6;  // past the context
  EXPECT_THAT(std::string(CheckSampleInputs(*plan, {h, floats, ints, context, ends}).message()),
              HasSubstr("node \"next\" (sample_tokens): sample_tokens: sequence 2's context "
                        "ends at 6, outside [2, 5]"));
}

// GELU written out (as GPT-2's MLP has it): eight elementwise ops, each
// read only by the next, run as one program reading x once, with the
// unconfirmed kernels allowed; with the confirmed ones only, op by op. A
// chain whose intermediate is broadcast runs op by op.
TEST(DevicePlanTest, ElementwiseChainsFuseIntoOneProgram) {
  GraphBuilder b;
  b.Input("x", {-1, 16});
  b.Op("mul", {"x"}, "a", "", {{"scalar", AttrF(0.5)}})
      .Op("pow", {"x"}, "p", "", {{"scalar", AttrF(3.0)}})
      .Op("mul", {"p"}, "q", "", {{"scalar", AttrF(0.044715)}})
      .Op("add", {"x", "q"}, "r")
      .Op("mul", {"r"}, "t", "", {{"scalar", AttrF(0.7978845608)}})
      .Op("tanh", {"t"}, "u")
      .Op("add", {"u"}, "w", "", {{"scalar", AttrF(1.0)}})
      .Op("mul", {"a", "w"}, "y")
      .Output("y");
  Model m = b.Build();
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  ASSERT_TRUE(stage.ok()) << stage.status();
  absl::StatusOr<DevicePlan> plan = stage->Plan({{3, 16}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(Compute(*plan), std::vector<Type>{Type::kProgram});
  const DeviceOp& op = plan->ops[plan->compute_begin];
  EXPECT_EQ(op.node, "y (+7 fused)");
  EXPECT_EQ(op.program.num_inputs, 1);
  EXPECT_EQ(op.src.offset, plan->ops[0].dst.offset);  // x
  EXPECT_EQ(op.program.num_ops, 14);

  GraphBuilder bc;
  bc.Input("x", {-1, 16}).Input("row", {1, 16});
  bc.Op("tanh", {"row"}, "t").Op("mul", {"x", "t"}, "y").Output("y");
  m = bc.Build();
  stage = LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  ASSERT_TRUE(stage.ok()) << stage.status();
  plan = stage->Plan({{3, 16}, {1, 16}});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(Compute(*plan), (std::vector<Type>{Type::kUnary, Type::kBinary}));
}

// What the GEMM epilogue cannot express is refused: addmm's beta and alpha
// other than 1 (at load), a bias that is not a row (when planned). So is a
// shape taken from a value that is not a size (a plan is kept per shape).
TEST(DevicePlanTest, WhatTheLoweringCannotExpressIsRefusedNotComputedWrong) {
  GraphBuilder scaled;
  scaled.Input("x", {-1, 2}).Param("b", {3}).Param("w", {2, 3});
  scaled.Op("addmm", {"b", "x", "w"}, "y", "", {{"beta", AttrF(0.5)}, {"alpha", AttrF(2)}})
      .Output("y");
  Model m = scaled.Build();
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  EXPECT_EQ(stage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(stage.status().message(), HasSubstr("addmm with beta 0.5 and alpha 2"));

  GraphBuilder column;
  column.Input("x", {3, 2}).Param("b", {3, 1}).Param("w", {2, 3});
  column.Op("addmm", {"b", "x", "w"}, "y").Output("y");
  m = column.Build();
  stage = LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  ASSERT_TRUE(stage.ok()) << stage.status();
  absl::StatusOr<DevicePlan> plan = stage->Plan({{3, 2}});
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(plan.status().message(), HasSubstr("adds a row of 3 values, not [3,1]"));

  GraphBuilder valued;
  valued.Input("x", {4, 8}).Input("n", {});
  valued.graph().mutable_inputs(1)->set_dtype(DT_INT64);
  valued.Op("slice", {"x", "n"}, "y", "",
            {{"dim", AttrI(1)}, {"start", AttrI(0)}, {"stop", AttrI(0)}, {"stop_from", AttrI(2)}})
      .Output("y");
  m = valued.Build();
  stage = LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  EXPECT_EQ(stage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(stage.status().message(),
              HasSubstr("node \"y\" (slice sized by the value of \"n\", which is not a size"));
}

// What the CUDA backend cannot run is refused at load, naming the node or
// input and the dtype (the CPU backend serves such models).
TEST(DevicePlanTest, OtherDtypesAndTransformerOpsAreRefusedNamingThem) {
  GraphBuilder ids;
  ids.Input("ids", {-1, 8});
  ids.graph().mutable_inputs(0)->set_dtype(DT_INT64);
  ids.Op("add", {"ids", "ids"}, "twice").Output("twice");
  Model m = ids.Build();
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  EXPECT_EQ(stage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(stage.status().message(),
              HasSubstr("the cuda backend has no int64 kernels: node \"twice\" (add) makes a "
                        "int64 value"));

  GraphBuilder norm;
  norm.Input("x", {-1, 4});
  norm.Op("softmax", {"x"}, "p");
  (*norm.graph().mutable_nodes(0)->mutable_attrs())["dim"].set_i(-1);
  norm.Output("p");
  m = norm.Build();
  stage = LoweredStage::Create(m.graph, m.weights, Precision::kFloat32);
  EXPECT_EQ(stage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(stage.status().message(), HasSubstr("(softmax, float32): its CUDA kernel has not "
                                                  "been confirmed on a GPU yet"));
  (*m.graph.mutable_nodes(0)->mutable_attrs())["dim"].set_i(0);
  stage = LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  EXPECT_EQ(stage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(stage.status().message(),
              HasSubstr("no kernel for node \"p\" (softmax over dim 0 of [B,4]; it runs the last dim)"));

  GraphBuilder batched;
  batched.Input("a", {2, -1, 3, 4}).Input("b", {-1, 4, 5});
  batched.Op("matmul", {"a", "b"}, "c").Output("c");
  m = batched.Build();
  stage = LoweredStage::Create(m.graph, m.weights, Precision::kFloat32);
  EXPECT_EQ(stage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(stage.status().message(),
              HasSubstr("node \"c\" (matmul of [2,B,3,4] and [B,4,5]; it runs [..., K] @ [K, N] "
                        "and batches of equal rank)"));
}

// cached_attention runs on tensor cores for a 16-bit prefill chunk with
// whole fragments (the conformance case of head_dim 16: 7 tokens, 2
// sequences), its tiles staged 32 tokens each; in float32, at head_dim 8,
// and for a decode step (a token a sequence) the CUDA-core kernel's
// 8-token tiles.
TEST(DevicePlanTest, PrefillAttentionTakesTensorCoresIn16BitWithWholeFragments) {
  auto attention = [](const std::string& name, DataType t,
                      std::vector<Shape> shapes) -> std::optional<DeviceOp> {
    for (const ConformanceCase& c : ConformanceCases()) {
      if (c.name != name) continue;
      absl::StatusOr<CaseInstance> run = Instantiate(c, t, 3);
      EXPECT_TRUE(run.ok()) << run.status();
      absl::StatusOr<LoweredStage> stage = LoweredStage::Create(
          run->graph, run->weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
      EXPECT_TRUE(stage.ok()) << stage.status();
      if (shapes.empty()) {
        for (const Tensor& x : run->inputs) shapes.push_back(x.shape());
      }
      absl::StatusOr<DevicePlan> plan = stage->Plan(shapes);
      EXPECT_TRUE(plan.ok()) << plan.status();
      EXPECT_EQ(plan->tiles.size(), 1u);
      for (const DeviceOp& op : plan->ops) {
        if (op.type != Type::kAttention) continue;
        EXPECT_EQ(plan->tiles[0].tile,
                  op.tensor_cores ? kernels::kTcQueryTile : kernels::kQueryTile / op.group);
        EXPECT_EQ(plan->tiles[0].capacity, op.num_tiles);
        return op;
      }
    }
    ADD_FAILURE() << name;
    return std::nullopt;
  };
  for (DataType t : {DT_BFLOAT16, DT_FLOAT16}) {
    std::optional<DeviceOp> op = attention("cached_attention_prefill_d16", t, {});
    ASSERT_TRUE(op.has_value());
    EXPECT_TRUE(op->tensor_cores) << TorchName(t);
    EXPECT_EQ(op->num_tiles, kernels::MaxAttentionTiles(7, 2, kernels::kTcQueryTile));
  }
  EXPECT_FALSE(attention("cached_attention_prefill_d16", DT_FLOAT32, {})->tensor_cores);
  EXPECT_FALSE(attention("cached_attention_prefill", DT_BFLOAT16, {})->tensor_cores);  // d 8
  // A decode step: one token for each of the two sequences.
  const std::vector<Shape> decode = {{1, 4, 2, 16}, {1, 2, 2, 16}, {1, 2, 2, 16}, {2}, {2},
                                     {2, 2}, {2}};
  EXPECT_FALSE(attention("cached_attention_prefill_d16", DT_BFLOAT16, decode)->tensor_cores);
  // Keys split over blocks where a step has few (tile, head) blocks and
  // its tables hold many keys, in every float type; none on tensor cores.
  for (DataType t : {DT_FLOAT32, DT_FLOAT16, DT_BFLOAT16}) {
    std::optional<DeviceOp> op = attention("cached_attention_split_keys", t, {});
    ASSERT_TRUE(op.has_value());
    EXPECT_EQ(op->group, 2) << "both heads of the KV head in one block";
    EXPECT_EQ(op->num_tiles, kernels::MaxAttentionTiles(100, 1, kernels::kQueryTile / 2));
    EXPECT_EQ(op->splits, kernels::AttentionSplits(op->num_tiles, 160)) << TorchName(t);
    EXPECT_EQ(op->splits, 3);
    EXPECT_GT(op->partials.offset, 0);  // laid out after the tiles
  }
  // Eight heads on one KV head: a tile a token, no spare tile, 2 splits.
  std::optional<DeviceOp> eight = attention("cached_attention_group8", DT_BFLOAT16, {});
  ASSERT_TRUE(eight.has_value());
  EXPECT_EQ(eight->group, 8);
  EXPECT_EQ(eight->num_tiles, 20);
  EXPECT_EQ(eight->splits, 2);
  EXPECT_EQ(attention("cached_attention_prefill_d16", DT_BFLOAT16, {})->splits, 1);
  EXPECT_EQ(attention("cached_attention_prefill_d16", DT_BFLOAT16, {})->group, 1);  // tensor cores
  EXPECT_EQ(attention("cached_attention_prefill_d16", DT_FLOAT32, {})->group, 2);
  EXPECT_EQ(attention("cached_attention_prefill", DT_FLOAT32, {})->splits, 1);  // 8 keys
  EXPECT_EQ(attention("cached_attention_prefill", DT_FLOAT32, {})->group, 1);   // 2 heads, 2 KV
}

// The kernels index the cache by the layer's kv_heads and head_dim and
// take q's heads as a multiple of them: q or k of other sizes (a graph
// whose views disagree with its attributes) were planned, and on a GPU
// would append out of the layer's rows or divide by zero heads a group.
TEST(DevicePlanTest, AttentionShapesThatDoNotFitTheCacheAreRefused) {
  const ConformanceCase* c = nullptr;
  for (const ConformanceCase& k : ConformanceCases()) {
    if (k.name == "cached_attention_prefill_d16") c = &k;  // 4 heads, 2 KV heads of 16
  }
  ASSERT_NE(c, nullptr);
  absl::StatusOr<CaseInstance> run = Instantiate(*c, DT_FLOAT32, 3);
  ASSERT_TRUE(run.ok()) << run.status();
  absl::StatusOr<LoweredStage> stage = LoweredStage::Create(
      run->graph, run->weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  ASSERT_TRUE(stage.ok()) << stage.status();
  auto plan = [&](Shape q, Shape kv, int64_t positions = 7) {
    return stage->Plan({q, kv, kv, {positions}, {7}, {2, 2}, {2}}).status();
  };
  ASSERT_TRUE(plan({1, 4, 7, 16}, {1, 2, 7, 16}).ok());
  const std::vector<std::pair<Shape, Shape>> bad = {
      {{1, 4, 7, 8}, {1, 2, 7, 8}},    // head_dim 8, the cache's 16
      {{1, 4, 7, 16}, {1, 4, 7, 16}},  // 4 KV heads, the cache's 2
      {{1, 3, 7, 16}, {1, 2, 7, 16}},  // 3 heads on 2 KV heads
      {{1, 1, 7, 16}, {1, 2, 7, 16}},  // fewer heads than KV heads
      {{1, 4, 7, 16}, {1, 2, 6, 16}},  // k of another step
  };
  for (const auto& [q, kv] : bad) {
    absl::Status s = plan(q, kv);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << ShapeToString(q) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("q [")) << s;
  }
  EXPECT_THAT(std::string(plan({1, 4, 7, 16}, {1, 2, 7, 16}, 6).message()),
              HasSubstr("positions [T]"));
}

}  // namespace
}  // namespace pipeserve
