// The CPU backend's graph-level fusions, seen from outside: a fused
// program gives what the unfused one gives, and the profile
// (PIPESERVE_CPU_PROFILE) names the fused steps it ran.
#include "runtime/cpu/cpu_backend.h"

#include <malloc.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "partitioner/graph_builder.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/random_tensor.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// The pre-norm transformer's residual stream: h = x + pos, y = norm(h),
// z = h + y (h read again after the norm). With `late_weight`, the norm's
// weight is computed after the add, so the add cannot carry the norm.
Model ResidualStream(bool late_weight) {
  GraphBuilder b(7);
  b.Input("x", {-1, 4, 40});
  b.Param("pos", {4, 40});
  b.Param("ln.weight", {40});
  b.Param("ln.bias", {40});
  b.Op("add", {"x", "pos"}, "h");
  std::string weight = "ln.weight";
  if (late_weight) {
    b.Op("mul", {"ln.weight"}, "w2", "", {{"scalar", AttrF(2.0)}});
    weight = "w2";
  }
  b.Op("layer_norm", {"h", weight, "ln.bias"}, "y", "ln",
       {{"ndim", AttrI(1)}, {"eps", AttrF(1e-5)}, {"has_weight", AttrI(1)}, {"has_bias", AttrI(1)}});
  b.Op("add", {"h", "y"}, "z");
  b.Output("y");
  b.Output("z");
  return b.Build();
}

// Llama's residual stream: h = x + pos, y = RMSNorm(h) written out as
// w * (h * rsqrt(mean(h^2, -1, keepdim) + eps)), z = h + y. Without
// `residual`, the norm reads the model input x directly.
Model RmsStream(bool residual) {
  GraphBuilder b(8);
  b.Input("x", {-1, 4, 40});
  b.Param("pos", {4, 40});
  b.Param("norm.weight", {40});
  std::string h = "x";
  if (residual) {
    b.Op("add", {"x", "pos"}, "h");
    h = "h";
  }
  AttrValue dims;
  dims.mutable_ints()->add_v(-1);
  b.Op("pow", {h}, "sq", "norm", {{"scalar", AttrF(2.0)}});
  b.Op("mean", {"sq"}, "ms", "norm", {{"dims", dims}, {"keepdim", AttrI(1)}});
  b.Op("add", {"ms"}, "mse", "norm", {{"scalar", AttrF(1e-6)}});
  b.Op("rsqrt", {"mse"}, "inv", "norm");
  b.Op("mul", {h, "inv"}, "normed", "norm");
  b.Op("mul", {"norm.weight", "normed"}, "y", "norm");
  b.Op("add", {h, "y"}, "z");
  b.Output("y");
  b.Output("z");
  return b.Build();
}

// The same model in bfloat16: inputs, parameters and weights.
// `m` in a 16-bit dtype: its inputs and weights.
Model To16(Model m, DataType type) {
  for (ValueSpec& in : *m.graph.mutable_inputs()) in.set_dtype(type);
  for (TensorInfo& p : *m.graph.mutable_params()) {
    p.set_dtype(type);
    p.set_byte_size(p.byte_size() / 2);
  }
  for (auto& [fqn, w] : m.weights) w = FromFloat32(w, type);
  return m;
}

// float32 copies of 16-bit outputs.
std::vector<Tensor> Widened(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(ToFloat32(t));
  return out;
}

struct Ran {
  std::vector<Tensor> outputs;
  std::string profile;  // what the program printed when destroyed
};

Ran RunTwice(const Model& m, bool fuse, const Tensor& x) {
  CpuBackendOptions o;
  o.fuse_elementwise = fuse;
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend(o);
  absl::StatusOr<std::unique_ptr<StageProgram>> prog = cpu->Compile(m.graph, m.weights);
  EXPECT_TRUE(prog.ok()) << prog.status();
  if (!prog.ok()) return {};
  Ran r;
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<std::vector<Tensor>> out = (*prog)->Run({x});
    EXPECT_TRUE(out.ok()) << out.status();
    if (out.ok()) r.outputs = *out;
  }
  ::testing::internal::CaptureStderr();
  prog->reset();
  r.profile = ::testing::internal::GetCapturedStderr();
  return r;
}

class CpuBackendFusionTest : public ::testing::Test {
 protected:
  // The profile flag is read once per process, at the first compile.
  static void SetUpTestSuite() { setenv("PIPESERVE_CPU_PROFILE", "1", 1); }
};

void ExpectSameBits(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].shape(), b[i].shape());
    EXPECT_EQ(std::memcmp(a[i].raw_data(), b[i].raw_data(), a[i].byte_size()), 0)
        << "output " << i;
  }
}

TEST_F(CpuBackendFusionTest, AResidualAddAndTheLayerNormAfterItRunAsOneStep) {
  const Model m = ResidualStream(/*late_weight=*/false);
  const Tensor x = RandomTensor({3, 4, 40}, 11);
  Ran fused = RunTwice(m, true, x), plain = RunTwice(m, false, x);
  EXPECT_THAT(fused.profile, HasSubstr("add + layer_norm (fused)"));
  EXPECT_THAT(plain.profile, Not(HasSubstr("add + layer_norm (fused)")));
  EXPECT_THAT(plain.profile, HasSubstr("layer_norm"));
  // Same arithmetic, one pass: the same bits, both the norm and the sum
  // the later add reads.
  ExpectSameBits(fused.outputs, plain.outputs);
}

TEST_F(CpuBackendFusionTest, ANormWhoseWeightIsMadeAfterTheAddIsNotFused) {
  const Model m = ResidualStream(/*late_weight=*/true);
  const Tensor x = RandomTensor({2, 4, 40}, 12);
  Ran fused = RunTwice(m, true, x), plain = RunTwice(m, false, x);
  EXPECT_THAT(fused.profile, Not(HasSubstr("add + layer_norm (fused)")));
  ExpectSameBits(fused.outputs, plain.outputs);
}

// Outputs equal to within `rel` of the norm of the reference.
void ExpectClose(const std::vector<Tensor>& a, const std::vector<Tensor>& ref, double rel) {
  ASSERT_EQ(a.size(), ref.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].shape(), ref[i].shape());
    double num = 0, den = 0;
    for (int64_t k = 0; k < a[i].numel(); ++k) {
      const double d = a[i].data()[k] - ref[i].data()[k];
      num += d * d;
      den += static_cast<double>(ref[i].data()[k]) * ref[i].data()[k];
    }
    EXPECT_LE(std::sqrt(num / den), rel) << "output " << i;
  }
}

TEST_F(CpuBackendFusionTest, TheRmsNormPatternAndTheResidualAddBeforeItRunAsOneStep) {
  const Model m = RmsStream(/*residual=*/true);
  const Tensor x = RandomTensor({3, 4, 40}, 13);
  Ran fused = RunTwice(m, true, x), plain = RunTwice(m, false, x);
  EXPECT_THAT(fused.profile, HasSubstr("add + RMSNorm (fused)"));
  EXPECT_THAT(fused.profile, Not(HasSubstr("rsqrt")));
  EXPECT_THAT(plain.profile, HasSubstr("rsqrt"));
  // One rounding instead of five: equal to float32 precision.
  ExpectClose(fused.outputs, plain.outputs, 1e-6);
}

TEST_F(CpuBackendFusionTest, AnRmsNormOfAModelInputRunsAsOneStep) {
  const Model m = RmsStream(/*residual=*/false);
  const Tensor x = RandomTensor({2, 4, 40}, 14);
  Ran fused = RunTwice(m, true, x), plain = RunTwice(m, false, x);
  EXPECT_THAT(fused.profile, HasSubstr("RMSNorm (fused)"));
  EXPECT_THAT(fused.profile, Not(HasSubstr("add + RMSNorm")));
  ExpectClose(fused.outputs, plain.outputs, 1e-6);
}

// Regression: a lone bfloat16 RMSNorm (no residual add, so no sum to
// write) was refused at run time with "needs one dtype throughout".
TEST_F(CpuBackendFusionTest, SixteenBitNormsRunFused) {
  for (DataType type : {DT_BFLOAT16, DT_FLOAT16}) {
    for (bool residual : {false, true}) {
      const Model m = To16(RmsStream(residual), type);
      const Tensor x = FromFloat32(RandomTensor({2, 4, 40}, 15), type);
      Ran fused = RunTwice(m, true, x), plain = RunTwice(m, false, x);
      EXPECT_THAT(fused.profile,
                  HasSubstr(residual ? "add + RMSNorm (fused)" : "RMSNorm (fused)"))
          << TorchName(type);
      // One rounding against five, in bfloat16 (8 significant bits) or
      // float16 (11).
      ExpectClose(Widened(fused.outputs), Widened(plain.outputs), 1e-2);
    }
    const Model ln = To16(ResidualStream(/*late_weight=*/false), type);
    const Tensor x = FromFloat32(RandomTensor({2, 4, 40}, 16), type);
    Ran fused = RunTwice(ln, true, x), plain = RunTwice(ln, false, x);
    EXPECT_THAT(fused.profile, HasSubstr("add + layer_norm (fused)")) << TorchName(type);
    ExpectSameBits(fused.outputs, plain.outputs);
  }
}

// Regression: an op whose output does not fit in memory threw
// std::bad_alloc out of Run (Tensor::Empty), which ended the process that
// served it. x [B, 1] @ y [1, N] with B = N = 2^21 asks for 16 TiB.
TEST(CpuBackendTest, AnOutputLargerThanMemoryIsResourceExhaustedNotACrash) {
  GraphBuilder b;
  b.Input("x", {-1, 1}).Input("y", {1, -1});
  b.Op("mm", {"x", "y"}, "out").Output("out");
  Model m = b.Build();
  auto program = MakeCpuBackend({})->Compile(m.graph, m.weights);
  ASSERT_TRUE(program.ok()) << program.status();
  const int64_t n = int64_t{1} << 21;
  absl::StatusOr<std::vector<Tensor>> out =
      (*program)->Run({Tensor::Zeros({n, 1}), Tensor::Zeros({1, n})});
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kResourceExhausted) << out.status();
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("out of memory"));
  absl::StatusOr<std::vector<Tensor>> small =
      (*program)->Run({Tensor::Zeros({2, 1}), Tensor::Zeros({1, 3})});
  ASSERT_TRUE(small.ok()) << "the program runs on";
  EXPECT_EQ((*small)[0].shape(), (Shape{2, 3}));
}

// Bytes malloc has handed out and not had back (every arena and mmap).
int64_t HeapInUse() {
  const struct mallinfo2 m = mallinfo2();
  return static_cast<int64_t>(m.uordblks + m.hblkhd);
}

// Regression: every step kept its output buffer at the largest size it had
// ever run, so a generation stage's one long prompt (256-token chunks of
// TinyLlama) left ~24 MiB per layer in use for good, 590 MiB over the
// uncut model's weights. Now the reused buffers stay within 32 MiB, and
// values no later step reads are dropped as the run goes.
TEST(CpuBackendTest, ALargeRunLeavesNoMoreThanTheScratchBudgetBehind) {
  if (mallinfo2().arena == 0) GTEST_SKIP() << "malloc is not glibc's (a sanitizer's)";
  GraphBuilder b(9);
  b.Input("x", {-1, 256});
  std::string h = "x";
  for (int l = 0; l < 12; ++l) {
    const std::string w = absl::StrCat("w", l), y = absl::StrCat("y", l), t = absl::StrCat("t", l);
    b.Param(w, {256, 256});
    b.Op("linear", {h, w}, y);
    b.Op("tanh", {y}, t);
    h = t;
  }
  b.Output(h);
  Model m = b.Build();
  auto program = MakeCpuBackend({})->Compile(m.graph, m.weights);
  ASSERT_TRUE(program.ok()) << program.status();
  ASSERT_TRUE((*program)->Run({Tensor::Zeros({2, 256})}).ok());
  const int64_t before = HeapInUse();
  // Values of 8 MiB each: 24 of them if every buffer were kept.
  ASSERT_TRUE((*program)->Run({Tensor::Zeros({8192, 256})}).ok());
  const int64_t kept = HeapInUse() - before;
  EXPECT_LE(kept, int64_t{40} << 20) << "MiB kept: " << (kept >> 20);
  ASSERT_TRUE((*program)->Run({Tensor::Zeros({2, 256})}).ok()) << "the program runs on";
}

// Regression: an output with a 0 dimension has nothing to compute, but
// attention over q [2^26, 1, 0] still walked 2^26 batch indices (and, for
// [2^40, 0] token ids, a stage hung for hours).
TEST(CpuBackendTest, KernelsOverEmptyTensorsReturnAtOnceHoweverWideTheOtherDimensions) {
  const int64_t wide = int64_t{1} << 26;
  Tensor q = Tensor::Zeros({wide, 1, 0});
  absl::Time start = absl::Now();
  absl::StatusOr<Tensor> att = FusedAttention(q, q, q, 1.0f, AttentionMask{}, Tensor());
  ASSERT_TRUE(att.ok()) << att.status();
  EXPECT_EQ(att->shape(), (Shape{wide, 1, 0}));
  Node softmax;
  softmax.set_op("softmax");
  (*softmax.mutable_attrs())["dim"].set_i(-1);
  Tensor x = Tensor::Zeros({wide, 0});
  absl::StatusOr<Tensor> s = RunCpuOp(softmax, {&x}, {wide, 0}, DT_FLOAT32, Tensor());
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1)) << "nothing to compute takes no time";
}

// GEMMs over an inner dimension of 0 are their bias (or zeros) in every
// row, as in PyTorch, through the program's float32 fast paths: linear
// with and without a bias, mm and matmul. Run after a run that left
// non-zero values in the buffers the program reuses.
TEST(CpuBackendTest, GemmsOverAnEmptyInnerDimensionAreTheirBias) {
  GraphBuilder b;
  b.Input("x", {-1, 0}).Input("big", {-1, 64});
  b.Param("w", {4, 0}).Param("l.weight", {4, 0}).Param("l.bias", {4}).Param("m", {0, 4});
  b.Op("linear", {"x", "w"}, "plain")
      .Op("linear", {"x", "l.weight", "l.bias"}, "biased", "l")
      .Op("mm", {"x", "m"}, "mm")
      .Op("matmul", {"x", "m"}, "matmul")
      .Op("relu", {"big"}, "noise")
      .Output("plain").Output("biased").Output("mm").Output("matmul").Output("noise");
  Model model = b.Build();
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  auto program = cpu->Compile(model.graph, model.weights);
  ASSERT_TRUE(program.ok()) << program.status();
  const Tensor bias = model.weights.at("l.bias");
  for (int run = 0; run < 3; ++run) {
    absl::StatusOr<std::vector<Tensor>> out =
        (*program)->Run({Tensor::Empty({3, 0}), RandomTensor({3, 64}, run + 1)});
    ASSERT_TRUE(out.ok()) << out.status();
    for (int64_t i = 0; i < 12; ++i) {
      EXPECT_EQ((*out)[0].data()[i], 0.0f) << "linear, run " << run << ", element " << i;
      EXPECT_EQ((*out)[1].data()[i], bias.data()[i % 4]) << "linear + bias, run " << run;
      EXPECT_EQ((*out)[2].data()[i], 0.0f) << "mm, run " << run;
      EXPECT_EQ((*out)[3].data()[i], 0.0f) << "matmul, run " << run;
    }
  }
}

}  // namespace
}  // namespace pipeserve
