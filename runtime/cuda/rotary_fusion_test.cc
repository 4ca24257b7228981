// Llama's rotary embedding written out (x * cos + cat(-x[..., D/2:],
// x[..., :D/2]) * sin) on the CUDA lowering: one kernel when the
// unconfirmed kernels are allowed, whichever side of each mul the tables
// are on; op by op when the halves are not the halves or an intermediate
// has another reader or the tables have a row per sequence; and the same
// values as the CPU backend's run, on the device emulator, with tables of
// a row per token or one row for all. A rotary read only by
// cached_attention, as its q or k, is no kernel at all: the attention
// kernels rotate as they read.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/conformance/cases.h"
#include "runtime/conformance/reference.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cuda/device_emulator.h"
#include "runtime/cuda/device_plan.h"
#include "runtime/random_tensor.h"

namespace pipeserve {
namespace {

struct Variant {
  bool tables_first = false;  // mul(cos, x) and mul(sin, cat)
  int64_t split = 4;          // where the slices cut D = 8
  bool neg_out = false;       // the neg is also an output
  bool per_batch = false;     // tables [-1, 1, -1, 8], batched (a row per sequence too)
};

// x [-1, 4, -1, 8] (batch, heads, tokens, D); cos and sin [-1, 8], not
// batched (a row per token, as the exporter's embedding of positions).
Model RotaryGraph(const Variant& v) {
  GraphBuilder b;
  if (v.per_batch) {
    b.Input("x", {-1, 4, -1, 8}).Input("cos", {-1, 1, -1, 8}).Input("sin", {-1, 1, -1, 8});
  } else {
    b.Input("x", {-1, 4, -1, 8}).Input("cos", {-1, 8}).Input("sin", {-1, 8});
    for (int i : {1, 2}) b.graph().mutable_inputs(i)->set_batched(false);
  }
  auto mul = [&](const std::string& a, const std::string& t, const std::string& out) {
    b.Op("mul", v.tables_first ? std::vector<std::string>{t, a} : std::vector<std::string>{a, t},
         out);
  };
  mul("x", "cos", "plain");
  b.Op("slice", {"x"}, "high", "", {{"dim", AttrI(3)}, {"start", AttrI(v.split)}, {"step", AttrI(1)}})
      .Op("neg", {"high"}, "negated")
      .Op("slice", {"x"}, "low", "", {{"dim", AttrI(3)}, {"stop", AttrI(v.split)}, {"step", AttrI(1)}})
      .Op("cat", {"negated", "low"}, "turned", "", {{"dim", AttrI(-1)}});
  mul("turned", "sin", "rotated");
  b.Op("add", {"plain", "rotated"}, "y").Output("y");
  if (v.neg_out) b.Output("negated");
  return b.Build();
}

std::vector<DeviceOp::Type> ComputeOf(const Model& m, const std::vector<Shape>& shapes) {
  absl::StatusOr<LoweredStage> stage =
      LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
  EXPECT_TRUE(stage.ok()) << stage.status();
  if (!stage.ok()) return {};
  absl::StatusOr<DevicePlan> plan = stage->Plan(shapes);
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return {};
  std::vector<DeviceOp::Type> t;
  for (size_t i = plan->compute_begin; i < plan->compute_end; ++i) t.push_back(plan->ops[i].type);
  return t;
}

TEST(RotaryFusion, TheWrittenOutRotaryIsOneKernelUnlessItIsNotQuiteRotary) {
  const std::vector<Shape> shapes = {{2, 4, 3, 8}, {3, 8}, {3, 8}};
  const std::vector<DeviceOp::Type> one = {DeviceOp::Type::kRotary};
  EXPECT_EQ(ComputeOf(RotaryGraph({}), shapes), one);
  EXPECT_EQ(ComputeOf(RotaryGraph({.tables_first = true}), shapes), one);
  const std::vector<Shape> per_batch = {{2, 4, 3, 8}, {2, 1, 3, 8}, {2, 1, 3, 8}};
  for (const Variant& v : {Variant{.split = 3}, Variant{.neg_out = true},
                           Variant{.per_batch = true}}) {
    const std::vector<DeviceOp::Type> ops = ComputeOf(RotaryGraph(v), v.per_batch ? per_batch : shapes);
    EXPECT_EQ(std::count(ops.begin(), ops.end(), DeviceOp::Type::kRotary), 0);
    EXPECT_GT(ops.size(), 2u);
  }
}

TEST(RotaryFusion, TheEmulatorMatchesTheCpuBackend) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kFloat32);
  for (const Variant& v : {Variant{}, Variant{.tables_first = true}, Variant{.split = 3},
                           Variant{.per_batch = true}}) {
    for (int64_t table_rows : {3, 1}) {  // a row per token, or one for all
      Model m = RotaryGraph(v);
      const Shape table = v.per_batch ? Shape{2, 1, table_rows, 8} : Shape{table_rows, 8};
      auto want = cpu->Compile(m.graph, m.weights);
      auto got = emulator->Compile(m.graph, m.weights);
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_TRUE(got.ok()) << got.status();
      const std::vector<Tensor> in = {RandomTensor({2, 4, 3, 8}, 1), RandomTensor(table, 2),
                                      RandomTensor(table, 3)};
      absl::StatusOr<std::vector<Tensor>> a = (*want)->Run(in), b = (*got)->Run(in);
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      double err = 0;
      for (int64_t i = 0; i < (*a)[0].numel(); ++i) {
        err = std::max(err, static_cast<double>(std::fabs((*a)[0].data()[i] - (*b)[0].data()[i])));
      }
      EXPECT_LE(err, 1e-6) << "split " << v.split << ", tables first " << v.tables_first
                           << ", table rows " << table_rows;
    }
  }
}

// x [1, heads, T, 16] rotated by cos and sin [T, 16] into `out`.
void Rotate(GraphBuilder& b, const std::string& x, const std::string& out) {
  b.Op("mul", {x, "cos"}, out + "_plain")
      .Op("slice", {x}, out + "_high", "", {{"dim", AttrI(3)}, {"start", AttrI(8)}, {"step", AttrI(1)}})
      .Op("neg", {out + "_high"}, out + "_negated")
      .Op("slice", {x}, out + "_low", "", {{"dim", AttrI(3)}, {"stop", AttrI(8)}, {"step", AttrI(1)}})
      .Op("cat", {out + "_negated", out + "_low"}, out + "_turned", "", {{"dim", AttrI(-1)}})
      .Op("mul", {out + "_turned", "sin"}, out + "_rotated")
      .Op("add", {out + "_plain", out + "_rotated"}, out);
}

// Llama's attention as the exporter writes it for generation: q and k
// rotated, then cached_attention (4 heads, 2 KV heads, head_dim 16) in
// type t; `q_out` also returns the rotated q (a second reader).
Model RopeAttentionGraph(DataType t, bool q_out) {
  GraphBuilder b;
  b.Input("q_raw", {1, 4, -1, 16}).Input("k_raw", {1, 2, -1, 16}).Input("v", {1, 2, -1, 16});
  b.Input("cos", {-1, 16}).Input("sin", {-1, 16});
  b.Input("positions", {-1}).Input("seq", {-1}).Input("blocks", {-1, 2}).Input("seq_ids", {-1});
  for (ValueSpec& in : *b.graph().mutable_inputs()) {  // a step's tokens, not a batch
    const bool ints = in.name() == "positions" || in.name() == "seq" || in.name() == "blocks" ||
                      in.name() == "seq_ids";
    in.set_dtype(ints ? DT_INT64 : t);
    in.set_batched(false);
  }
  Rotate(b, "q_raw", "q");
  Rotate(b, "k_raw", "k");
  b.Op("cached_attention", {"q", "k", "v", "positions", "seq", "blocks", "seq_ids"}, "out", "",
       {{"scale", AttrF(0.25)}, {"layer", AttrI(0)}, {"block_size", AttrI(4)},
        {"num_blocks", AttrI(4)}, {"heads", AttrI(4)}, {"kv_heads", AttrI(2)},
        {"head_dim", AttrI(16)}});
  b.Output("out");
  if (q_out) b.Output("q");
  return b.Build();
}

// A step of two sequences: seven prefill tokens (more tokens than
// sequences), or with `decode` one more token each over the cache the
// prefill filled. Rotary tables of a row per token, or of `one_row`.
std::vector<Tensor> RopeAttentionInputs(DataType t, bool decode = false, bool one_row = false) {
  std::mt19937 rng(decode ? 12 : 11);
  std::uniform_real_distribution<double> u(-1, 1);
  auto random = [&](const Shape& s) {
    std::vector<double> v(NumElements(s));
    for (double& x : v) x = u(rng);
    return TensorOf(s, t, v);
  };
  const int64_t n = decode ? 2 : 7, rows = one_row ? 1 : n;
  const Tensor positions = decode ? TensorOf({2}, DT_INT64, {5, 2})
                                  : TensorOf({7}, DT_INT64, {0, 0, 1, 2, 1, 3, 4});
  const Tensor seq = decode ? TensorOf({2}, DT_INT64, {0, 1})
                            : TensorOf({7}, DT_INT64, {0, 1, 0, 0, 1, 0, 0});
  return {random({1, 4, n, 16}), random({1, 2, n, 16}), random({1, 2, n, 16}),
          random({rows, 16}),    random({rows, 16}),    positions,
          seq,                   TensorOf({2, 2}, DT_INT64, {3, 0, 1, 2}),
          TensorOf({2}, DT_INT64, {0, 1})};
}

TEST(RotaryFusion, ARotaryReadOnlyByTheAttentionIsFoldedIntoIt) {
  for (bool q_out : {false, true}) {
    Model m = RopeAttentionGraph(DT_BFLOAT16, q_out);
    absl::StatusOr<LoweredStage> stage =
        LoweredStage::Create(m.graph, m.weights, Precision::kFloat32, true, CudaOps::kUnconfirmed);
    ASSERT_TRUE(stage.ok()) << stage.status();
    std::vector<Shape> shapes;
    for (const Tensor& x : RopeAttentionInputs(DT_BFLOAT16)) shapes.push_back(x.shape());
    absl::StatusOr<DevicePlan> plan = stage->Plan(shapes);
    ASSERT_TRUE(plan.ok()) << plan.status();
    int rotaries = 0;
    const DeviceOp* attention = nullptr;
    for (size_t i = plan->compute_begin; i < plan->compute_end; ++i) {
      rotaries += plan->ops[i].type == DeviceOp::Type::kRotary;
      if (plan->ops[i].type == DeviceOp::Type::kAttention) attention = &plan->ops[i];
    }
    ASSERT_NE(attention, nullptr);
    EXPECT_EQ(rotaries, q_out ? 1 : 0);  // a q also returned is rotated on its own
    EXPECT_EQ(attention->rope_q.on, !q_out);
    EXPECT_TRUE(attention->rope_k.on);
    EXPECT_EQ(attention->paged.rope_k.op.d, 16);
    EXPECT_EQ(attention->paged.rope_k.op.tokens, 7);
    EXPECT_EQ(attention->paged.rope_k.op.table_rows, 7);
    EXPECT_TRUE(attention->tensor_cores);
  }
}

// The folded rotation on both attention kernels (float32: CUDA cores;
// bfloat16: tensor cores for the prefill) against the CPU backend's
// op-by-op run: a prefill, then a decode step over the keys it rotated
// into the cache, with tables of a row per token or one row.
TEST(RotaryFusion, TheFoldedRotaryOnTheEmulatorMatchesTheCpuBackend) {
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  std::unique_ptr<ComputeBackend> emulator = MakeDeviceEmulatorBackend(Precision::kFloat32);
  for (DataType t : {DT_FLOAT32, DT_BFLOAT16}) {
    for (bool q_out : {false, true}) {
      for (bool one_row : {false, true}) {
        Model m = RopeAttentionGraph(t, q_out);
        auto want = cpu->Compile(m.graph, m.weights);
        auto got = emulator->Compile(m.graph, m.weights);
        ASSERT_TRUE(want.ok()) << want.status();
        ASSERT_TRUE(got.ok()) << got.status();
        for (bool decode : {false, true}) {
          const std::vector<Tensor> in = RopeAttentionInputs(t, decode, one_row);
          absl::StatusOr<std::vector<Tensor>> a = (*want)->Run(in), b = (*got)->Run(in);
          ASSERT_TRUE(a.ok()) << a.status();
          ASSERT_TRUE(b.ok()) << b.status();
          // bfloat16: the CPU rounds after each op of the rotary, the kernels once.
          const double tol = t == DT_FLOAT32 ? 1e-5 : 2e-2;
          for (size_t k = 0; k < a->size(); ++k) {
            EXPECT_LE(RelativeError((*b)[k], ToRef((*a)[k])), tol)
                << TorchName(t) << ", q out " << q_out << ", one row " << one_row
                << (decode ? ", decode" : ", prefill") << ", output " << k;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace pipeserve
