// Each kernel of this folder in float32, float16 and bfloat16, its source
// run on the simt emulator, against the float64 reference on the
// conformance cases of its op (runtime/conformance): rows shorter and
// longer than a block, weight and bias present or not, every elementwise
// function, every elementwise program op with broadcasting from each side,
// the shape ops' strided copies, embedding, reductions over each dim set,
// triangles. Shape ops, programs and reductions are planned as the device
// plan plans them (data_movement, elementwise_lowering,
// reduction_lowering). The device plan (float32 graphs) reaches only the
// float32 instantiations; this reaches the other two, as a float16 or
// bfloat16 graph on the GPU will. (paged_attention_test checks
// cached_attention's kernels.)
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "graph/op_schema.h"
#include "gtest/gtest.h"
#include "runtime/conformance/cases.h"
#include "runtime/conformance/reference.h"
#include "runtime/cuda/data_movement.h"
#include "runtime/cuda/elementwise_lowering.h"
#include "runtime/cuda/kernels/cast.h"
#include "runtime/cuda/kernels/elementwise.h"
#include "runtime/cuda/kernels/elementwise_program.h"
#include "runtime/cuda/kernels/embedding.h"
#include "runtime/cuda/kernels/layer_norm.h"
#include "runtime/cuda/kernels/reduction.h"
#include "runtime/cuda/kernels/rotary.h"
#include "runtime/cuda/kernels/strided_copy.h"
#include "runtime/cuda/kernels/triangle.h"
#include "runtime/cuda/reduction_lowering.h"

namespace pipeserve::kernels {
namespace {

template <typename T>
T* As(const Tensor& t) {
  return static_cast<T*>(t.raw_data());
}

std::vector<Shape> ShapesOf(const std::vector<Tensor>& in) {
  std::vector<Shape> shapes;
  for (const Tensor& t : in) shapes.push_back(t.shape());
  return shapes;
}

// The shape ops' copies, the elementwise programs, embedding, reductions
// and triangles, planned as the device plan plans them.
template <typename T>
absl::Status RunPlanned(const Node& node, const std::vector<Tensor>& in, const Tensor& out) {
  const std::string& op = node.op();
  if (IsMovement(op)) {
    absl::StatusOr<std::vector<Move>> moves = MovesOf(node, ShapesOf(in), out.shape());
    if (!moves.ok()) return moves.status();
    for (const Move& m : *moves) {
      absl::Status s = simt::Emulate(CopyBlocks(m.copy.n), kCopyThreads, [&] {
        StridedCopy<T>(As<T>(in[m.input]), As<T>(out), m.copy);
      });
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }
  if (IsProgramOp(op)) {
    std::vector<DataType> types;
    for (const Tensor& t : in) types.push_back(t.dtype());
    absl::StatusOr<ElementwiseProgramOp> p =
        ProgramOf(node, ShapesOf(in), types, out.shape(), out.dtype());
    if (!p.ok()) return p.status();
    EwPointers at;
    for (size_t i = 0; i < in.size(); ++i) at.in[i] = in[i].raw_data();
    at.out = out.raw_data();
    return simt::Emulate(ProgramBlocks(p->n), kProgramThreads,
                         [&] { ElementwiseProgram<T>(*p, at); });
  }
  if (op == "embedding") {
    const int64_t n = in[0].numel(), rows = in[1].shape()[0], dim = in[1].shape()[1];
    return simt::Emulate(EmbeddingBlocks(n, dim), kEmbeddingThreads, [&] {
      EmbeddingRows<T>(in[0].data_as<int64_t>(), As<T>(in[1]), As<T>(out), n, rows, dim);
    });
  }
  if (IsReduction(op)) {
    absl::StatusOr<ReduceOp> r = ReductionOf(node, in[0].shape());
    if (!r.ok()) return r.status();
    return simt::Emulate(static_cast<unsigned>(r->out_n), kReduceThreads,
                         [&] { Reduce<T>(As<T>(in[0]), As<T>(out), *r); });
  }
  const Shape& x = in[0].shape();
  const int64_t n = in[0].numel();  // triu, tril
  return simt::Emulate(CopyBlocks(n), kCopyThreads, [&] {
    Triangle<T>(As<T>(in[0]), As<T>(out), n, x[x.size() - 2], x.back(),
                IntAttr(node, "diagonal", 0), op == "triu");
  });
}

bool Planned(const std::string& op) {
  return IsMovement(op) || IsProgramOp(op) || op == "embedding" || IsReduction(op) ||
         op == "triu" || op == "tril";
}

// Runs the kernel for case `c`'s node on its inputs, in storage type T.
template <typename T>
absl::Status RunKernel(const Node& node, const std::vector<Tensor>& in, const Tensor& out) {
  const std::string& op = node.op();
  if (Planned(op)) return RunPlanned<T>(node, in, out);
  const Shape& x = in[0].shape();
  const int64_t n = in[0].numel();
  if (op == "layer_norm") {
    const int cols = static_cast<int>(x.back());
    const bool w = IntAttr(node, "has_weight", 0) != 0, b = IntAttr(node, "has_bias", 0) != 0;
    const T* weight = w ? As<T>(in[1]) : nullptr;
    const T* bias = b ? As<T>(in[w ? 2 : 1]) : nullptr;
    return simt::Emulate(static_cast<unsigned>(n / cols), kLayerNormThreads, [&] {
      LayerNormRows<T, T>(As<T>(in[0]), nullptr, weight, bias, As<T>(out), nullptr, n / cols,
                          cols, static_cast<float>(FloatAttr(node, "eps", 1e-5)));
    });
  }
  if (op == "softmax" || op == "log_softmax") {
    const int cols = static_cast<int>(x.back());
    return simt::Emulate(static_cast<unsigned>(n / cols), kSoftmaxThreads, [&] {
      SoftmaxRows<T>(As<T>(in[0]), As<T>(out), n / cols, cols, op == "log_softmax");
    });
  }
  const UnaryKind kind = UnaryKindOf(op, StringAttr(node, "approximate"));
  const unsigned blocks = static_cast<unsigned>((n + kElementwiseThreads - 1) / kElementwiseThreads);
  return simt::Emulate(blocks, kElementwiseThreads,
                       [&] { UnaryElementwise<T>(As<T>(in[0]), As<T>(out), n, kind); });
}

// Whether the kernels here run case `c` (layer_norm over the last dim,
// softmax over the last dim, the elementwise functions).
bool Covers(const ConformanceCase& c) {
  const std::string& op = c.node.op();
  if (Planned(op)) return true;
  if (op == "layer_norm") return IntAttr(c.node, "ndim", 1) == 1;
  if (op == "softmax" || op == "log_softmax") {
    return IntAttr(c.node, "dim", -1) == -1 ||
           IntAttr(c.node, "dim", -1) == static_cast<int64_t>(c.inputs[0].shape.size()) - 1;
  }
  return UnaryKindOf(op, StringAttr(c.node, "approximate")) != UnaryKind::kNone;
}

TEST(KernelsTest, EveryKernelInEveryFloatTypeMatchesTheReference) {
  int checked = 0;
  for (const ConformanceCase& c : ConformanceCases()) {
    if (!Covers(c)) continue;
    for (DataType t : c.dtypes) {
      if (!IsFloatingPoint(t)) continue;  // the kernels take float types (and bool, int64 ids)
      absl::StatusOr<CaseInstance> run = Instantiate(c, t, 11);
      ASSERT_TRUE(run.ok()) << c.name << ": " << run.status();
      std::vector<RefTensor> refs;
      for (const Tensor& x : run->node_inputs) refs.push_back(ToRef(x));
      absl::StatusOr<RefTensor> want = ReferenceOp(run->node, refs);
      ASSERT_TRUE(want.ok()) << c.name << ": " << want.status();
      Tensor out = Tensor::Empty(want->shape, want->dtype == DT_BOOL ? DT_BOOL : t);
      absl::Status s = t == DT_FLOAT32   ? RunKernel<float>(run->node, run->node_inputs, out)
                       : t == DT_FLOAT16 ? RunKernel<simt::Half>(run->node, run->node_inputs, out)
                                         : RunKernel<simt::Bf16>(run->node, run->node_inputs, out);
      ASSERT_TRUE(s.ok()) << c.name << " " << TorchName(t) << ": " << s;
      const double err = RelativeError(out, *want);
      EXPECT_LE(err, Tolerance(t)) << c.name << " " << TorchName(t);
      std::printf("[ max_rel_err ] simt_%s %s %.1e tol %.0e\n", TorchName(t).c_str(),
                  c.name.c_str(), err, Tolerance(t));
      ++checked;
    }
  }
  EXPECT_GE(checked, 3 * 60) << "cases of every kernel here";
}

// LayerNormRows with a weight, a bias and a residual against float64 of
// the rounded sum, which must come back in h exactly.
template <typename T>
double LayerNormResidualError(int64_t rows, int cols) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-3, 3);
  std::vector<T> x(rows * cols), r(rows * cols), h(rows * cols), y(rows * cols), w(cols), b(cols);
  for (std::vector<T>* v : {&x, &r, &w, &b}) {
    for (T& e : *v) e = simt::FromFloat<T>(u(rng));
  }
  const float eps = 1e-5f;
  absl::Status s = simt::Emulate(static_cast<unsigned>(rows), kLayerNormThreads, [&] {
    LayerNormRows<T, T>(x.data(), r.data(), w.data(), b.data(), y.data(), h.data(), rows, cols,
                        eps);
  });
  EXPECT_TRUE(s.ok()) << s;
  double err = 0, scale = 1e-30;
  for (int64_t row = 0; row < rows; ++row) {
    std::vector<double> sum(cols);
    double mean = 0, var = 0;
    for (int c = 0; c < cols; ++c) {
      const int64_t i = row * cols + c;
      const T rounded = simt::FromFloat<T>(simt::ToFloat(x[i]) + simt::ToFloat(r[i]));
      EXPECT_EQ(simt::ToFloat(h[i]), simt::ToFloat(rounded)) << i;
      sum[c] = simt::ToFloat(rounded);
      mean += sum[c] / cols;
    }
    for (int c = 0; c < cols; ++c) var += (sum[c] - mean) * (sum[c] - mean) / cols;
    for (int c = 0; c < cols; ++c) {
      const double want = (sum[c] - mean) / std::sqrt(var + eps) * simt::ToFloat(w[c]) +
                          simt::ToFloat(b[c]);
      err = std::max(err, std::fabs(simt::ToFloat(y[row * cols + c]) - want));
      scale = std::max(scale, std::fabs(want));
    }
  }
  return err / scale;
}

// RmsNormRows (RMSNorm written out, fused by the device plan) against
// float64: rows within a block's stride and beyond, with and without a
// weight, in every float type. With `residual` the norm is of x + r,
// whose sum must come back in h exactly as T rounds it.
template <typename T>
double RmsNormError(int64_t rows, int cols, bool weighted, bool residual = false) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-3, 3);
  std::vector<T> x(rows * cols), r(rows * cols), h(rows * cols), w(cols), y(rows * cols);
  for (T& v : x) v = simt::FromFloat<T>(u(rng));
  for (T& v : r) v = simt::FromFloat<T>(u(rng));
  for (T& v : w) v = simt::FromFloat<T>(u(rng));
  const float eps = 1e-5f;
  absl::Status s = simt::Emulate(static_cast<unsigned>(rows), kLayerNormThreads, [&] {
    RmsNormRows<T, T>(x.data(), residual ? r.data() : nullptr, weighted ? w.data() : nullptr,
                      y.data(), residual ? h.data() : nullptr, rows, cols, eps);
  });
  EXPECT_TRUE(s.ok()) << s;
  if (residual) {
    for (int64_t i = 0; i < rows * cols; ++i) {
      const T sum = simt::FromFloat<T>(simt::ToFloat(x[i]) + simt::ToFloat(r[i]));
      EXPECT_EQ(simt::ToFloat(h[i]), simt::ToFloat(sum)) << i;
      x[i] = sum;  // what the norm is of
    }
  }
  double err = 0, scale = 1e-30;
  for (int64_t r = 0; r < rows; ++r) {
    double squares = 0;
    for (int c = 0; c < cols; ++c) squares += std::pow(simt::ToFloat(x[r * cols + c]), 2.0);
    const double k = 1 / std::sqrt(squares / cols + eps);
    for (int c = 0; c < cols; ++c) {
      const double want = simt::ToFloat(x[r * cols + c]) * k * (weighted ? simt::ToFloat(w[c]) : 1.0);
      err = std::max(err, std::fabs(simt::ToFloat(y[r * cols + c]) - want));
      scale = std::max(scale, std::fabs(want));
    }
  }
  return err / scale;
}

TEST(KernelsTest, RmsNormMatchesFloat64InEveryFloatType) {
  for (int cols : {1, 7, 256, 1000, 2051}) {
    for (bool weighted : {true, false}) {
      EXPECT_LE(RmsNormError<float>(3, cols, weighted), 1e-5) << cols;
      EXPECT_LE(RmsNormError<simt::Half>(3, cols, weighted), Tolerance(DT_FLOAT16)) << cols;
      EXPECT_LE(RmsNormError<simt::Bf16>(3, cols, weighted), Tolerance(DT_BFLOAT16)) << cols;
    }
  }
}

// Both norms with the residual add fused in (FuseResidualNorms): h gets
// x + r as T rounds it, and y is the norm of that sum, in every float type.
TEST(KernelsTest, NormsWithAResidualWriteTheSumAndNormalizeIt) {
  for (int cols : {1, 7, 1000, 2051}) {
    EXPECT_LE(RmsNormError<float>(3, cols, true, true), 1e-5) << cols;
    EXPECT_LE(RmsNormError<simt::Half>(3, cols, false, true), Tolerance(DT_FLOAT16)) << cols;
    EXPECT_LE(RmsNormError<simt::Bf16>(3, cols, true, true), Tolerance(DT_BFLOAT16)) << cols;
    EXPECT_LE(LayerNormResidualError<float>(3, cols), 1e-5) << cols;
    EXPECT_LE(LayerNormResidualError<simt::Half>(3, cols), Tolerance(DT_FLOAT16)) << cols;
    EXPECT_LE(LayerNormResidualError<simt::Bf16>(3, cols), Tolerance(DT_BFLOAT16)) << cols;
  }
}

// RotaryRows (rotary embedding written out, fused by the device plan)
// against float64: tables of a row per token and of one row, D from 2 to
// 128, in every float type.
template <typename T>
double RotaryError(int64_t rows, int64_t tokens, int64_t d, int64_t table_rows) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(-2, 2);
  std::vector<T> x(rows * d), cos(table_rows * d), sin(table_rows * d), y(rows * d);
  for (auto* v : {&x, &cos, &sin}) {
    for (T& e : *v) e = simt::FromFloat<T>(u(rng));
  }
  const RotaryOp op{rows * d, d, tokens, table_rows};
  const unsigned blocks = static_cast<unsigned>((op.n + kElementwiseThreads - 1) / kElementwiseThreads);
  absl::Status s = simt::Emulate(blocks, kElementwiseThreads, [&] {
    RotaryRows<T>(x.data(), cos.data(), sin.data(), y.data(), op);
  });
  EXPECT_TRUE(s.ok()) << s;
  auto f = [](const T& v) { return static_cast<double>(simt::ToFloat(v)); };
  double err = 0, scale = 1e-30;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = table_rows == 1 ? 0 : r % tokens;
    for (int64_t c = 0; c < d; ++c) {
      const double turned = c < d / 2 ? -f(x[r * d + c + d / 2]) : f(x[r * d + c - d / 2]);
      const double want = f(x[r * d + c]) * f(cos[t * d + c]) + turned * f(sin[t * d + c]);
      err = std::max(err, std::fabs(f(y[r * d + c]) - want));
      scale = std::max(scale, std::fabs(want));
    }
  }
  return err / scale;
}

// NaN, infinities and floats outside int64 cast to INT64_MIN, as on the
// CPU (x86, PyTorch): the C++ cast the kernel used is undefined there,
// and the GPU's conversion saturates (NaN to 0, inf to INT64_MAX).
TEST(KernelsTest, FloatsOutsideInt64CastToItsLowestAsOnTheCpu) {
  const std::vector<float> x = {NAN, INFINITY, -INFINITY, 1e19f, -1e19f, 3.7f, -3.7f, -9.2e18f};
  std::vector<int64_t> y(x.size());
  absl::Status s = simt::Emulate(CopyBlocks(static_cast<int64_t>(x.size())), kCopyThreads, [&] {
    Cast<float, int64_t>(x.data(), y.data(), static_cast<int64_t>(x.size()));
  });
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(y, (std::vector<int64_t>{INT64_MIN, INT64_MIN, INT64_MIN, INT64_MIN, INT64_MIN, 3, -3,
                                     static_cast<int64_t>(-9.2e18f)}));
}

TEST(KernelsTest, RotaryMatchesFloat64InEveryFloatType) {
  for (int64_t d : {2, 16, 64, 128}) {
    for (int64_t table_rows : {5, 1}) {
      // 3 sequences x 2 heads of 5 tokens.
      EXPECT_LE(RotaryError<float>(30, 5, d, table_rows), 1e-6) << d;
      EXPECT_LE(RotaryError<simt::Half>(30, 5, d, table_rows), Tolerance(DT_FLOAT16)) << d;
      EXPECT_LE(RotaryError<simt::Bf16>(30, 5, d, table_rows), Tolerance(DT_BFLOAT16)) << d;
    }
  }
}

// Regression: an amax over a dimension of size 0 lowered to a kernel that
// gave -inf; PyTorch refuses it. A mean over one is NaN (0 / 0 in the
// kernel), a sum 0.
TEST(ReductionLoweringTest, AnAmaxOverAnEmptyDimensionIsRefused) {
  Node node;
  node.set_op("amax");
  node.mutable_attrs()->operator[]("dims").mutable_ints()->add_v(1);
  absl::StatusOr<ReduceOp> r = ReductionOf(node, {3, 0});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(ReductionOf(node, {0, 3}).ok()) << "an empty output";
  node.set_op("mean");
  EXPECT_TRUE(ReductionOf(node, {3, 0}).ok());
}

}  // namespace
}  // namespace pipeserve::kernels
