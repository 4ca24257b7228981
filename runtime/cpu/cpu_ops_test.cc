// The CPU op conformance suite: every math op of cpu_ops.h, in each dtype
// it runs in, against a float64 reference computed here. Prints a table
// (op, dtype, max relative error) and checks each against its bound.
#include "runtime/cpu/cpu_ops.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "graph/op_schema.h"
#include "graph/dtype.h"

namespace pipeserve {
namespace {

using ::testing::HasSubstr;

// A tensor of `type` holding `values` (rounded to the type).
Tensor Make(const Shape& shape, DataType type, const std::vector<double>& values) {
  Tensor t = Tensor::Empty(shape, type);
  for (int64_t i = 0; i < t.numel(); ++i) {
    double v = values[i];
    switch (type) {
      case DT_FLOAT32: t.data()[i] = static_cast<float>(v); break;
      case DT_BFLOAT16: t.data_as<uint16_t>()[i] = FloatToBf16(static_cast<float>(v)); break;
      case DT_FLOAT16: t.data_as<uint16_t>()[i] = FloatToHalf(static_cast<float>(v)); break;
      case DT_INT64: t.data_as<int64_t>()[i] = static_cast<int64_t>(v); break;
      case DT_INT32: t.data_as<int32_t>()[i] = static_cast<int32_t>(v); break;
      case DT_BOOL: t.data_as<uint8_t>()[i] = v != 0; break;
      default: break;
    }
  }
  return t;
}

double At(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DT_FLOAT32: return t.data()[i];
    case DT_BFLOAT16: return Bf16ToFloat(t.data_as<uint16_t>()[i]);
    case DT_FLOAT16: return HalfToFloat(t.data_as<uint16_t>()[i]);
    case DT_INT64: return static_cast<double>(t.data_as<int64_t>()[i]);
    case DT_INT32: return t.data_as<int32_t>()[i];
    case DT_BOOL: return t.data_as<uint8_t>()[i];
    default: return NAN;
  }
}

// The values a tensor of `type` actually holds (what the reference reads).
std::vector<double> Held(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = At(t, i);
  return v;
}

std::vector<double> Random(int64_t n, double lo, double hi, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

Node MakeNode(const std::string& op) {
  Node n;
  n.set_op(op);
  n.set_name(op);
  return n;
}

// Relative error in the norm: |out - ref| / |ref| (elementwise max for
// integer results, which must be exact).
double NormError(const Tensor& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double d = At(out, i) - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

struct Row {
  std::string op, dtype;
  double error, bound;
};

class CpuOpsConformance : public ::testing::Test {
 protected:
  static void TearDownTestSuite() {
    std::printf("\n%-22s %-9s %12s %10s\n", "op", "dtype", "rel. error", "bound");
    for (const Row& r : *rows_) {
      std::printf("%-22s %-9s %12.3g %10.3g\n", r.op.c_str(), r.dtype.c_str(), r.error, r.bound);
    }
  }

  // Runs `node` on `inputs` and checks the output against `ref`.
  void Check(const Node& node, const std::vector<Tensor>& inputs, const Shape& shape,
             DataType type, const std::vector<double>& ref, double bound,
             const std::string& label = "") {
    std::vector<const Tensor*> in;
    for (const Tensor& t : inputs) in.push_back(&t);
    absl::StatusOr<Tensor> out = RunCpuOp(node, in, shape, type, Tensor());
    ASSERT_TRUE(out.ok()) << node.op() << ": " << out.status();
    ASSERT_EQ(out->shape(), shape) << node.op();
    ASSERT_EQ(out->dtype(), type) << node.op();
    double err = NormError(*out, ref);
    rows_->push_back({label.empty() ? node.op() : label, TorchName(type), err, bound});
    EXPECT_LE(err, bound) << node.op() << " " << TorchName(type);
  }

  static std::vector<Row>* rows_;
};

std::vector<Row>* CpuOpsConformance::rows_ = new std::vector<Row>();

// Bounds: float32 math is within a few ulp of float64 (norm-relative
// 1e-6); bfloat16 and float16 results are rounded to their 8 and 11
// significant bits (2^-8 and 2^-11 relative per element).
double Bound(DataType t) {
  return t == DT_BFLOAT16 ? 8e-3 : t == DT_FLOAT16 ? 1e-3 : 2e-6;
}

TEST_F(CpuOpsConformance, UnaryFloatOps) {
  const Shape shape = {4, 33};
  struct U {
    const char* op;
    std::function<double(double)> ref;
    double lo, hi;
    const char* approximate;
  };
  const std::vector<U> ops = {
      {"relu", [](double x) { return x > 0 ? x : 0; }, -3, 3, nullptr},
      {"gelu", [](double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }, -4, 4,
       nullptr},
      {"gelu", [](double x) {
         return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
       }, -4, 4, "tanh"},
      {"silu", [](double x) { return x / (1 + std::exp(-x)); }, -8, 8, nullptr},
      {"tanh", [](double x) { return std::tanh(x); }, -5, 5, nullptr},
      {"tanh", [](double x) { return std::tanh(x); }, -0.01, 0.01, nullptr},
      {"sigmoid", [](double x) { return 1 / (1 + std::exp(-x)); }, -8, 8, nullptr},
      {"sqrt", [](double x) { return std::sqrt(x); }, 0.01, 9, nullptr},
      {"rsqrt", [](double x) { return 1 / std::sqrt(x); }, 0.01, 9, nullptr},
      {"exp", [](double x) { return std::exp(x); }, -80, 80, nullptr},
      {"log", [](double x) { return std::log(x); }, 0.01, 9, nullptr},
      {"cos", [](double x) { return std::cos(x); }, -6, 6, nullptr},
      {"sin", [](double x) { return std::sin(x); }, -6, 6, nullptr},
      {"neg", [](double x) { return -x; }, -3, 3, nullptr},
      {"abs", [](double x) { return std::fabs(x); }, -3, 3, nullptr},
  };
  uint32_t seed = 1;
  for (const U& u : ops) {
    for (DataType t : {DT_FLOAT32, DT_BFLOAT16, DT_FLOAT16}) {
      if (t == DT_FLOAT16 && std::string(u.op) == "exp") continue;  // overflows fp16
      Tensor x = Make(shape, t, Random(NumElements(shape), u.lo, u.hi, seed++));
      std::vector<double> held = Held(x), ref;
      for (double v : held) ref.push_back(u.ref(v));
      Node n = MakeNode(u.op);
      if (u.approximate) (*n.mutable_attrs())["approximate"].set_s(u.approximate);
      std::string label = u.approximate ? std::string(u.op) + "(tanh)" : u.op;
      if (std::string(u.op) == "tanh" && u.hi < 1) label = "tanh (|x|<0.01)";
      Check(n, {x}, shape, t, ref, Bound(t), label);
    }
  }
}

TEST_F(CpuOpsConformance, BinaryOpsWithBroadcastAndScalars) {
  const Shape a_shape = {3, 1, 5}, b_shape = {4, 1}, out = {3, 4, 5};
  struct B {
    const char* op;
    std::function<double(double, double)> ref;
  };
  const std::vector<B> ops = {
      {"add", [](double x, double y) { return x + y; }},
      {"sub", [](double x, double y) { return x - y; }},
      {"mul", [](double x, double y) { return x * y; }},
      {"div", [](double x, double y) { return x / y; }},
      {"maximum", [](double x, double y) { return std::max(x, y); }},
      {"minimum", [](double x, double y) { return std::min(x, y); }},
  };
  uint32_t seed = 100;
  for (const B& b : ops) {
    for (DataType t : {DT_FLOAT32, DT_BFLOAT16, DT_INT64, DT_INT32}) {
      bool integer = IsInteger(t);
      Tensor x = Make(a_shape, t, Random(15, integer ? 1 : -3, integer ? 50 : 3, seed++));
      Tensor y = Make(b_shape, t, Random(4, integer ? 1 : 0.5, integer ? 9 : 3, seed++));
      std::vector<double> hx = Held(x), hy = Held(y), ref;
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 4; ++j)
          for (int k = 0; k < 5; ++k) {
            double r = b.ref(hx[i * 5 + k], hy[j]);
            if (integer && std::string(b.op) == "div") r = std::trunc(r);
            ref.push_back(r);
          }
      Check(MakeNode(b.op), {x, y}, out, t, ref, integer ? 0 : Bound(t));
    }
  }
  // Scalar operands, reversed: 1.5 - x and x ** 3.
  Tensor x = Make({7}, DT_FLOAT32, Random(7, -2, 2, 7));
  Node rsub = MakeNode("sub");
  (*rsub.mutable_attrs())["scalar"].set_f(1.5);
  (*rsub.mutable_attrs())["reverse"].set_i(1);
  std::vector<double> ref;
  for (double v : Held(x)) ref.push_back(1.5 - v);
  Check(rsub, {x}, {7}, DT_FLOAT32, ref, 1e-7, "sub (1.5 - x)");
  Node cube = MakeNode("pow");
  (*cube.mutable_attrs())["scalar"].set_f(3.0);
  ref.clear();
  for (double v : Held(x)) ref.push_back(v * v * v);
  Check(cube, {x}, {7}, DT_FLOAT32, ref, 2e-7, "pow (x ** 3)");
  // Python floor division of int64 sizes.
  Tensor n = Make({4}, DT_INT64, {7, -7, 9, 0});
  Node fd = MakeNode("floordiv");
  (*fd.mutable_attrs())["scalar"].set_f(2);
  Check(fd, {n}, {4}, DT_INT64, {3, -4, 4, 0}, 0, "floordiv (int64)");
}

TEST_F(CpuOpsConformance, IntegerDivisionByZeroIsAnError) {
  Tensor a = Make({2}, DT_INT64, {4, 5});
  Tensor b = Make({2}, DT_INT64, {1, 0});
  Node n = MakeNode("div");
  absl::StatusOr<Tensor> out = RunCpuOp(n, {&a, &b}, {2}, DT_INT64, Tensor());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(), HasSubstr("integer division by zero"));
}

// Regression: the lowest int64 (int32) divided by -1 trapped (SIGFPE) and
// took the stage server down; it wraps to itself, as numpy and a GPU give.
TEST_F(CpuOpsConformance, TheLowestIntegerDividedByMinusOneWrapsInsteadOfTrapping) {
  const int64_t low = std::numeric_limits<int64_t>::min();
  Tensor a = Make({3}, DT_INT64, {static_cast<double>(low), 6, -7});
  a.data_as<int64_t>()[0] = low;  // exactly (through a double it is too)
  Tensor b = Make({3}, DT_INT64, {-1, -1, -1});
  for (const char* op : {"div", "floordiv"}) {
    absl::StatusOr<Tensor> out = RunCpuOp(MakeNode(op), {&a, &b}, {3}, DT_INT64, Tensor());
    ASSERT_TRUE(out.ok()) << op << out.status();
    EXPECT_EQ(out->data_as<int64_t>()[0], low) << op;
    EXPECT_EQ(out->data_as<int64_t>()[1], -6) << op;
    EXPECT_EQ(out->data_as<int64_t>()[2], 7) << op;
  }
  Tensor c = Make({1}, DT_INT32, {0});
  c.data_as<int32_t>()[0] = std::numeric_limits<int32_t>::min();
  Node scalar = MakeNode("floordiv");
  (*scalar.mutable_attrs())["scalar"].set_f(-1);
  absl::StatusOr<Tensor> out = RunCpuOp(scalar, {&c}, {1}, DT_INT32, Tensor());
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->data_as<int32_t>()[0], std::numeric_limits<int32_t>::min());
}

TEST_F(CpuOpsConformance, SoftmaxLayerNormAndReductions) {
  const Shape shape = {3, 4, 6};
  for (DataType t : {DT_FLOAT32, DT_BFLOAT16, DT_FLOAT16}) {
    Tensor x = Make(shape, t, Random(72, -4, 4, 11));
    std::vector<double> h = Held(x);
    for (int dim : {2, 1}) {
      for (bool log : {false, true}) {
        std::vector<double> ref(72);
        for (int i = 0; i < 3; ++i)
          for (int o = 0; o < (dim == 2 ? 4 : 6); ++o) {
            auto idx = [&](int k) { return dim == 2 ? i * 24 + o * 6 + k : i * 24 + k * 6 + o; };
            int n = dim == 2 ? 6 : 4;
            double m = -INFINITY, sum = 0;
            for (int k = 0; k < n; ++k) m = std::max(m, h[idx(k)]);
            for (int k = 0; k < n; ++k) sum += std::exp(h[idx(k)] - m);
            for (int k = 0; k < n; ++k) {
              ref[idx(k)] = log ? h[idx(k)] - m - std::log(sum) : std::exp(h[idx(k)] - m) / sum;
            }
          }
        Node n = MakeNode(log ? "log_softmax" : "softmax");
        (*n.mutable_attrs())["dim"].set_i(dim == 2 ? -1 : 1);
        Check(n, {x}, shape, t, ref, Bound(t), std::string(n.op()) + " dim " + std::to_string(dim));
      }
    }
    // layer_norm over the last dim with weight and bias.
    Tensor w = Make({6}, t, Random(6, 0.5, 1.5, 12));
    Tensor b = Make({6}, t, Random(6, -1, 1, 13));
    std::vector<double> hw = Held(w), hb = Held(b), ref(72);
    for (int r = 0; r < 12; ++r) {
      double mean = 0, var = 0;
      for (int k = 0; k < 6; ++k) mean += h[r * 6 + k] / 6;
      for (int k = 0; k < 6; ++k) var += (h[r * 6 + k] - mean) * (h[r * 6 + k] - mean) / 6;
      for (int k = 0; k < 6; ++k) {
        ref[r * 6 + k] = (h[r * 6 + k] - mean) / std::sqrt(var + 1e-5) * hw[k] + hb[k];
      }
    }
    Node ln = MakeNode("layer_norm");
    (*ln.mutable_attrs())["ndim"].set_i(1);
    (*ln.mutable_attrs())["eps"].set_f(1e-5);
    (*ln.mutable_attrs())["has_weight"].set_i(1);
    (*ln.mutable_attrs())["has_bias"].set_i(1);
    Check(ln, {x, w, b}, shape, t, ref, t == DT_FLOAT32 ? 2e-6 : 1e-2);
    // mean over the last dim, keepdim (the RMSNorm pattern's reduction).
    Node mean = MakeNode("mean");
    mean.mutable_attrs()->operator[]("dims").mutable_ints()->add_v(-1);
    (*mean.mutable_attrs())["keepdim"].set_i(1);
    std::vector<double> mref(12);
    for (int r = 0; r < 12; ++r)
      for (int k = 0; k < 6; ++k) mref[r] += h[r * 6 + k] / 6;
    Check(mean, {x}, {3, 4, 1}, t, mref, t == DT_FLOAT32 ? 2e-6 : 1e-2);
  }
}

TEST_F(CpuOpsConformance, GemmsAndFusedAttention) {
  // Batched matmul with a broadcast batch dim: [2,3,4,5] @ [3,5,6].
  for (DataType t : {DT_FLOAT32, DT_BFLOAT16}) {
    Tensor a = Make({2, 3, 4, 5}, t, Random(120, -1, 1, 21));
    Tensor b = Make({3, 5, 6}, t, Random(90, -1, 1, 22));
    std::vector<double> ha = Held(a), hb = Held(b), ref(2 * 3 * 4 * 6);
    for (int p = 0; p < 2; ++p)
      for (int q = 0; q < 3; ++q)
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 6; ++j) {
            double s = 0;
            for (int k = 0; k < 5; ++k) s += ha[((p * 3 + q) * 4 + i) * 5 + k] * hb[(q * 5 + k) * 6 + j];
            ref[((p * 3 + q) * 4 + i) * 6 + j] = s;
          }
    Check(MakeNode("matmul"), {a, b}, {2, 3, 4, 6}, t, ref, t == DT_FLOAT32 ? 2e-6 : 1e-2,
          "matmul (batched)");
    // linear: x [7, 16] @ W^T, W [9, 16], + bias [9] (bf16: oneDNN matmul).
    Tensor x = Make({7, 16}, t, Random(112, -1, 1, 23));
    Tensor w = Make({9, 16}, t, Random(144, -1, 1, 24));
    Tensor bias = Make({9}, t, Random(9, -1, 1, 25));
    std::vector<double> hx = Held(x), hw = Held(w), hbias = Held(bias), lref(63);
    for (int i = 0; i < 7; ++i)
      for (int j = 0; j < 9; ++j) {
        double s = hbias[j];
        for (int k = 0; k < 16; ++k) s += hx[i * 16 + k] * hw[j * 16 + k];
        lref[i * 9 + j] = s;
      }
    Check(MakeNode("linear"), {x, w, bias}, {7, 9}, t, lref, t == DT_FLOAT32 ? 2e-6 : 1e-2);
    // addmm: bias [9] + x [7, 16] @ w^T as [16, 9] (GPT-2's Conv1D).
    std::vector<double> wt(144);
    for (int j = 0; j < 9; ++j)
      for (int k = 0; k < 16; ++k) wt[k * 9 + j] = hw[j * 16 + k];
    Tensor w_kn = Make({16, 9}, t, wt);
    Check(MakeNode("addmm"), {bias, x, w_kn}, {7, 9}, t, lref, t == DT_FLOAT32 ? 2e-6 : 1e-2);
  }
  // Fused attention with a causal bool mask, against the float64 formula.
  for (DataType t : {DT_FLOAT32, DT_BFLOAT16}) {
    const int64_t B = 2, H = 3, T = 70, D = 8;  // 70 rows: two query blocks
    Tensor q = Make({B, H, T, D}, t, Random(B * H * T * D, -1, 1, 31));
    Tensor k = Make({B, H, T, D}, t, Random(B * H * T * D, -1, 1, 32));
    Tensor v = Make({B, H, T, D}, t, Random(B * H * T * D, -1, 1, 33));
    std::vector<double> mask(T * T);
    for (int i = 0; i < T; ++i)
      for (int j = 0; j < T; ++j) mask[i * T + j] = j > i;
    Tensor cond = Make({1, 1, T, T}, DT_BOOL, mask);
    std::vector<double> hq = Held(q), hk = Held(k), hv = Held(v), ref(B * H * T * D);
    const double scale = 1 / std::sqrt(static_cast<double>(D));
    for (int bh = 0; bh < B * H; ++bh)
      for (int i = 0; i < T; ++i) {
        std::vector<double> p(T);
        double m = -INFINITY, sum = 0;
        for (int j = 0; j <= i; ++j) {
          double s = 0;
          for (int d = 0; d < D; ++d) s += hq[(bh * T + i) * D + d] * hk[(bh * T + j) * D + d];
          p[j] = s * scale;
          m = std::max(m, p[j]);
        }
        for (int j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - m));
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (int j = 0; j <= i; ++j) o += p[j] / sum * hv[(bh * T + j) * D + d];
          ref[(bh * T + i) * D + d] = o;
        }
      }
    AttentionMask am;
    am.cond = &cond;
    am.fill = -INFINITY;
    absl::StatusOr<Tensor> out = FusedAttention(q, k, v, static_cast<float>(scale), am, Tensor());
    ASSERT_TRUE(out.ok()) << out.status();
    double err = NormError(*out, ref);
    rows_->push_back({"attention (fused)", TorchName(t), err, Bound(t) + 2e-6});
    EXPECT_LE(err, Bound(t) + 2e-6);
  }
}

// A residual add and the norm after it (layer_norm, or RMSNorm), in one
// pass: the sum is exactly what the add alone gives (rounded to the
// dtype), the norm is checked against float64 over that sum. Rows of 40
// and of 100 (16-lane sums with tails), a residual of the whole shape, one
// of its trailing dims repeated ([T, D] against [B, T, D]), and none; with
// and without affine.
TEST_F(CpuOpsConformance, ResidualAddAndNormInOnePass) {
  for (DataType t : {DT_FLOAT32, DT_BFLOAT16, DT_FLOAT16}) {
    for (bool rms : {false, true}) {
      for (int64_t n : {40, 100}) {
        for (int residual_kind : {0, 1, 2}) {  // whole, trailing block, none
          for (bool affine : {true, false}) {
            const Shape shape = {3, 5, n};
            const Shape rshape = residual_kind == 0 ? shape : Shape{5, n};
            Tensor x = Make(shape, t, Random(15 * n, -3, 3, 61));
            Tensor r = Make(rshape, t, Random(NumElements(rshape), -3, 3, 62));
            Tensor w = Make({n}, t, Random(n, 0.5, 1.5, 63));
            Tensor b = Make({n}, t, Random(n, -1, 1, 64));
            NormKind kind;
            kind.rms = rms;
            kind.eps = 1e-5f;
            const Tensor* res = residual_kind == 2 ? nullptr : &r;
            Tensor sum = Tensor::Empty(shape, t), out = Tensor::Empty(shape, t);
            // Without a residual there is no sum to write (null).
            const absl::Status st = FusedNorm(kind, x, res, affine ? &w : nullptr,
                                              affine && !rms ? &b : nullptr,
                                              res == nullptr ? nullptr : &sum, &out);
            ASSERT_TRUE(st.ok()) << st;
            std::vector<double> h = Held(x);
            if (res != nullptr) {
              // The sum: bit for bit what the add op computes.
              absl::StatusOr<Tensor> added =
                  RunCpuOp(MakeNode("add"), {&x, &r}, shape, t, Tensor());
              ASSERT_TRUE(added.ok()) << added.status();
              ASSERT_EQ(std::memcmp(sum.raw_data(), added->raw_data(), sum.byte_size()), 0)
                  << TorchName(t) << " n " << n;
              h = Held(sum);
            }
            // The norm of that sum, against float64.
            std::vector<double> hw = Held(w), hb = Held(b), ref(15 * n);
            for (int row = 0; row < 15; ++row) {
              double mean = 0, var = 0, ms = 0;
              for (int64_t k = 0; k < n; ++k) mean += h[row * n + k] / n;
              for (int64_t k = 0; k < n; ++k) {
                var += (h[row * n + k] - mean) * (h[row * n + k] - mean) / n;
                ms += h[row * n + k] * h[row * n + k] / n;
              }
              for (int64_t k = 0; k < n; ++k) {
                const double v = rms ? h[row * n + k] / std::sqrt(ms + 1e-5)
                                     : (h[row * n + k] - mean) / std::sqrt(var + 1e-5);
                ref[row * n + k] = !affine ? v : rms ? v * hw[k] : v * hw[k] + hb[k];
              }
            }
            const double err = NormError(out, ref);
            if (n == 100 && residual_kind == 1 && affine) {
              rows_->push_back({rms ? "add + RMSNorm (fused)" : "add + layer_norm (fused)",
                                TorchName(t), err, Bound(t)});
            }
            EXPECT_LE(err, Bound(t)) << TorchName(t) << (rms ? " rms" : " layer_norm") << " n "
                                     << n << " residual " << residual_kind;
          }
        }
      }
    }
  }
  // A residual that is not a trailing block is left to the separate ops.
  Tensor x = Make({3, 5, 40}, DT_FLOAT32, Random(600, -1, 1, 65));
  Tensor col = Make({3, 1, 40}, DT_FLOAT32, Random(120, -1, 1, 66));
  Tensor sum = Tensor::Empty({3, 5, 40}), out = Tensor::Empty({3, 5, 40});
  EXPECT_EQ(FusedNorm({}, x, &col, nullptr, nullptr, &sum, &out).code(),
            absl::StatusCode::kUnimplemented);
  // Mixed dtypes and an RMSNorm bias are refused, naming the problem.
  Tensor r16 = Make({3, 5, 40}, DT_BFLOAT16, Random(600, -1, 1, 67));
  EXPECT_THAT(FusedNorm({}, x, &r16, nullptr, nullptr, &sum, &out).message(),
              HasSubstr("one dtype"));
  Tensor bias = Make({40}, DT_FLOAT32, Random(40, -1, 1, 68));
  NormKind rms;
  rms.rms = true;
  EXPECT_THAT(FusedNorm(rms, x, nullptr, nullptr, &bias, &sum, &out).message(),
              HasSubstr("no bias"));
}

// GPT-2's gelu written out, plus a residual add with a row-broadcast
// vector and a per-row scale, as one ElementwiseGroup.
TEST_F(CpuOpsConformance, FusedElementwiseGroup) {
  auto scalar_op = [](const std::string& op, double v, bool reverse = false) {
    Node n = MakeNode(op);
    (*n.mutable_attrs())["scalar"].set_f(v);
    if (reverse) (*n.mutable_attrs())["reverse"].set_i(1);
    return n;
  };
  // externals: 0 = h [5, 300], 1 = r [300] (rows), 2 = s [5, 1] (per row)
  const Node pow3 = scalar_op("pow", 3.0), mul_c = scalar_op("mul", 0.044715), add = MakeNode("add"),
             mul_k = scalar_op("mul", std::sqrt(2 / M_PI)), tanh = MakeNode("tanh"),
             one_plus = scalar_op("add", 1.0, true), half = scalar_op("mul", 0.5, true),
             mul = MakeNode("mul"), add_rows = MakeNode("add"), mul_rows = MakeNode("mul");
  std::vector<ElementwiseGroup::Op> ops = {
      {&pow3, -1},      // 0: h ** 3
      {&mul_c, 0},      // 1: 0.044715 * h**3
      {&add, -1, 1},    // 2: h + 1
      {&mul_k, 2},      // 3: c * 2
      {&tanh, 3},       // 4
      {&one_plus, 4},   // 5: 1 + tanh
      {&half, -1},      // 6: 0.5 * h
      {&mul, 6, 5},     // 7: gelu
      {&add_rows, 7, -2},  // 8: + r
      {&mul_rows, 8, -3},  // 9: * s
  };
  ElementwiseGroup group(ops, 3);
  for (DataType t : {DT_FLOAT32, DT_BFLOAT16}) {
    Tensor h = Make({5, 300}, t, Random(1500, -4, 4, 51));
    Tensor r = Make({300}, t, Random(300, -1, 1, 52));
    Tensor sc = Make({5, 1}, t, Random(5, 0.5, 2, 53));
    std::vector<double> hh = Held(h), hr = Held(r), hs = Held(sc), ref(1500);
    for (int i = 0; i < 1500; ++i) {
      double x = hh[i];
      double g = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
      ref[i] = (g + hr[i % 300]) * hs[i / 300];
    }
    absl::StatusOr<Tensor> out = group.Run({&h, &r, &sc}, {5, 300}, t, Tensor());
    ASSERT_TRUE(out.ok()) << out.status();
    double err = NormError(*out, ref);
    rows_->push_back({"elementwise (fused)", TorchName(t), err, Bound(t)});
    EXPECT_LE(err, Bound(t));
  }
  // A broadcast the fused pass does not take is reported, not computed.
  Tensor h = Make({5, 300}, DT_FLOAT32, Random(1500, -1, 1, 54));
  Tensor col = Make({1, 300, 1}, DT_FLOAT32, Random(300, -1, 1, 55));
  Tensor r = Make({300}, DT_FLOAT32, Random(300, -1, 1, 56));
  EXPECT_EQ(group.Run({&h, &r, &col}, {5, 300}, DT_FLOAT32, Tensor()).status().code(),
            absl::StatusCode::kUnimplemented);
}

// Output sizes can come from a model's attributes (full, arange, expand):
// one too large is an error, not a crash.
// linear over an inner dimension of 0 is its bias (or zeros) in every row,
// as in PyTorch: the output buffer (a reused scratch full of NaN) is
// written, not left as it was.
// Regression: a mean over a dimension of size 0 gave 0 and an amax -inf;
// PyTorch gives NaN and refuses the amax ("Expected reduction dim 1 to
// have non-zero size"). A sum is 0, and a reduction whose output is empty
// too is fine.
TEST(CpuOpsTest, ReductionsOverAnEmptyDimensionAnswerAsPyTorch) {
  auto reduce = [](const std::string& op, std::vector<int64_t> dims) {
    Node n = MakeNode(op);
    for (int64_t d : dims) n.mutable_attrs()->operator[]("dims").mutable_ints()->add_v(d);
    return n;
  };
  for (DataType t : {DT_FLOAT32, DT_BFLOAT16}) {
    const Tensor x = Make({3, 0}, t, {});
    absl::StatusOr<Tensor> mean = RunCpuOp(reduce("mean", {1}), {&x}, {3}, t, Make({3}, t, {7, 7, 7}));
    ASSERT_TRUE(mean.ok()) << mean.status();
    for (int64_t i = 0; i < 3; ++i) EXPECT_TRUE(std::isnan(At(*mean, i))) << TorchName(t);
    absl::StatusOr<Tensor> sum = RunCpuOp(reduce("sum", {1}), {&x}, {3}, t, Make({3}, t, {7, 7, 7}));
    ASSERT_TRUE(sum.ok()) << sum.status();
    for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(At(*sum, i), 0.0) << TorchName(t);
    for (std::vector<int64_t> dims : {std::vector<int64_t>{1}, std::vector<int64_t>{}}) {
      absl::StatusOr<Tensor> amax = RunCpuOp(reduce("amax", dims), {&x}, dims.empty() ? Shape{} : Shape{3},
                                             t, Make(dims.empty() ? Shape{} : Shape{3}, t, {7, 7, 7}));
      EXPECT_EQ(amax.status().code(), absl::StatusCode::kInvalidArgument) << TorchName(t);
      EXPECT_THAT(std::string(amax.status().message()),
                  HasSubstr("amax over a dimension of size 0 (input [3,0])"));
    }
    const Tensor y = Make({0, 3}, t, {});
    EXPECT_TRUE(RunCpuOp(reduce("amax", {1}), {&y}, {0}, t, Make({0}, t, {})).ok());
  }
}

TEST(CpuOpsTest, LinearOverAnInnerDimensionOf0IsItsBias) {
  for (DataType t : {DT_FLOAT32, DT_BFLOAT16}) {
    for (bool with_bias : {false, true}) {
      const Tensor x = Make({3, 0}, t, {}), w = Make({4, 0}, t, {});
      const Tensor bias = Make({4}, t, {1, -2, 0.5, 4});
      std::vector<const Tensor*> in = {&x, &w};
      if (with_bias) in.push_back(&bias);
      Tensor scratch = Make({3, 4}, t, std::vector<double>(12, NAN));
      absl::StatusOr<Tensor> out = RunCpuOp(MakeNode("linear"), in, {3, 4}, t, std::move(scratch));
      ASSERT_TRUE(out.ok()) << out.status();
      for (int64_t i = 0; i < 12; ++i) {
        EXPECT_EQ(At(*out, i), with_bias ? Held(bias)[i % 4] : 0.0)
            << TorchName(t) << ", bias " << with_bias << ", element " << i;
      }
    }
    // addmm, as GPT-2's Conv1D: bias [4] + x [3, 0] @ w [0, 4].
    const Tensor x = Make({3, 0}, t, {}), w = Make({0, 4}, t, {});
    const Tensor bias = Make({4}, t, {1, -2, 0.5, 4});
    Tensor scratch = Make({3, 4}, t, std::vector<double>(12, NAN));
    absl::StatusOr<Tensor> out =
        RunCpuOp(MakeNode("addmm"), {&bias, &x, &w}, {3, 4}, t, std::move(scratch));
    ASSERT_TRUE(out.ok()) << out.status();
    for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(At(*out, i), Held(bias)[i % 4]) << TorchName(t);
  }
}

TEST(CpuOpsTest, HugeOutputsAreRefusedNotAllocated) {
  Node full = MakeNode("full");
  (*full.mutable_attrs())["value"].set_f(1.0);
  absl::StatusOr<Tensor> out =
      RunCpuOp(full, {}, {int64_t{1} << 40, int64_t{1} << 40}, DT_FLOAT32, Tensor());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  out = RunCpuOp(full, {}, {int64_t{1} << 46}, DT_FLOAT32, Tensor());  // 256 TiB
  EXPECT_EQ(out.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(CpuOpsConformance, DataMovementIsExact) {
  // permute, slice with a step, select, cat, where, triu, embedding, cast.
  Tensor x = Make({2, 3, 4}, DT_BFLOAT16, Random(24, -2, 2, 41));
  std::vector<double> h = Held(x);
  Node perm = MakeNode("permute");
  for (int d : {2, 0, 1}) (*perm.mutable_attrs())["dims"].mutable_ints()->add_v(d);
  std::vector<double> pref;
  for (int k = 0; k < 4; ++k)
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 3; ++j) pref.push_back(h[i * 12 + j * 4 + k]);
  Check(perm, {x}, {4, 2, 3}, DT_BFLOAT16, pref, 0);
  // Permutes and slices that keep the last dim copy whole rows:
  // [2, 3, 4] -> [3, 2, 4] (attention's transpose(1, 2)) and [:, 1:3, :].
  for (DataType t : {DT_FLOAT32, DT_BFLOAT16}) {
    Tensor y = Make({2, 3, 4}, t, Random(24, -2, 2, 43));
    std::vector<double> hy = Held(y), tref, rref;
    Node swap = MakeNode("permute");
    for (int d : {1, 0, 2}) (*swap.mutable_attrs())["dims"].mutable_ints()->add_v(d);
    for (int j = 0; j < 3; ++j)
      for (int i = 0; i < 2; ++i)
        for (int k = 0; k < 4; ++k) tref.push_back(hy[i * 12 + j * 4 + k]);
    Check(swap, {y}, {3, 2, 4}, t, tref, 0, "permute (rows kept)");
    Node rows = MakeNode("slice");
    (*rows.mutable_attrs())["dim"].set_i(1);
    (*rows.mutable_attrs())["start"].set_i(1);
    for (int i = 0; i < 2; ++i)
      for (int j = 1; j < 3; ++j)
        for (int k = 0; k < 4; ++k) rref.push_back(hy[i * 12 + j * 4 + k]);
    Check(rows, {y}, {2, 2, 4}, t, rref, 0, "slice (rows kept)");
  }
  Node slice = MakeNode("slice");
  (*slice.mutable_attrs())["dim"].set_i(2);
  (*slice.mutable_attrs())["start"].set_i(-3);
  (*slice.mutable_attrs())["step"].set_i(2);
  std::vector<double> sref;
  for (int i = 0; i < 6; ++i) sref.push_back(h[i * 4 + 1]), sref.push_back(h[i * 4 + 3]);
  Check(slice, {x}, {2, 3, 2}, DT_BFLOAT16, sref, 0, "slice [-3::2]");
  Tensor a = Make({2, 2}, DT_INT64, {1, 2, 3, 4});
  Tensor b = Make({2, 1}, DT_INT64, {5, 6});
  Node cat = MakeNode("cat");
  (*cat.mutable_attrs())["dim"].set_i(1);
  Check(cat, {a, b}, {2, 3}, DT_INT64, {1, 2, 5, 3, 4, 6}, 0);
  Tensor c = Make({2, 1}, DT_BOOL, {1, 0});
  Check(MakeNode("where"), {c, a, b}, {2, 2}, DT_INT64, {1, 2, 6, 6}, 0);
  Node triu = MakeNode("triu");
  (*triu.mutable_attrs())["diagonal"].set_i(1);
  Tensor ones = Make({3, 3}, DT_FLOAT32, std::vector<double>(9, 1.0));
  Check(triu, {ones}, {3, 3}, DT_FLOAT32, {0, 1, 1, 0, 0, 1, 0, 0, 0}, 0);
  Tensor table = Make({4, 2}, DT_BFLOAT16, Random(8, -1, 1, 42));
  Tensor ids = Make({3}, DT_INT64, {3, 0, 3});
  std::vector<double> ht = Held(table);
  Check(MakeNode("embedding"), {ids, table}, {3, 2}, DT_BFLOAT16,
        {ht[6], ht[7], ht[0], ht[1], ht[6], ht[7]}, 0);
  Tensor bad_ids = Make({1}, DT_INT64, {4});
  Node emb = MakeNode("embedding");
  absl::StatusOr<Tensor> out = RunCpuOp(emb, {&bad_ids, &table}, {1, 2}, DT_BFLOAT16, Tensor());
  EXPECT_THAT(out.status().message(), HasSubstr("embedding id 4"));
  Node cast = MakeNode("cast");
  Tensor f = Make({3}, DT_FLOAT32, {1.7, -2.2, 0});
  Check(cast, {f}, {3}, DT_INT64, {1, -2, 0}, 0, "cast fp32->int64");
  Check(cast, {f}, {3}, DT_BOOL, {1, 1, 0}, 0, "cast fp32->bool");
}

}  // namespace
}  // namespace pipeserve
