#include "runtime/conformance/reference.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "runtime/sample_draw.h"
#include "runtime/sampler.h"

// Written from PyTorch's documented semantics (and client/python/pipeserve/
// _ops.py for how each call becomes an op), never from a backend's kernels:
// a bug copied into the oracle would pass every check. Each op walks its
// output in row-major order and computes one element from the inputs'
// multi-indices, in double.
namespace pipeserve {
namespace {

using Ints = std::vector<int64_t>;
using Inputs = std::vector<RefTensor>;
using Result = absl::StatusOr<RefTensor>;
// One op family: the node, its inputs (already checked against the
// schema) and the output's dtype (the schema's rule).
using OpFn = Result (*)(const Node& node, const Inputs& in, DataType out_type);

template <typename... Parts>
absl::Status Bad(const Parts&... parts) {
  return absl::InvalidArgumentError(absl::StrCat(parts...));
}

RefTensor Make(Shape shape, DataType dtype) {
  RefTensor t;
  t.v.assign(static_cast<size_t>(NumElements(shape)), 0.0);
  t.shape = std::move(shape);
  t.dtype = dtype;
  return t;
}

// ---- indexing --------------------------------------------------------------

// The multi-index of row-major position `flat` in `s`.
Ints Unravel(int64_t flat, const Shape& s) {
  Ints idx(s.size());
  for (int d = static_cast<int>(s.size()) - 1; d >= 0; --d) {
    idx[d] = flat % s[d];
    flat /= s[d];
  }
  return idx;
}

int64_t Ravel(const Ints& idx, const Shape& s) {
  int64_t flat = 0;
  for (size_t d = 0; d < s.size(); ++d) flat = flat * s[d] + idx[d];
  return flat;
}

// The position in `in` that numpy broadcasting reads for output index
// `out_idx`: `in` aligned to the right, its size-1 dims read at 0.
int64_t BroadcastAt(const Ints& out_idx, const Shape& in) {
  const size_t lead = out_idx.size() - in.size();
  int64_t flat = 0;
  for (size_t d = 0; d < in.size(); ++d) {
    flat = flat * in[d] + (in[d] == 1 ? 0 : out_idx[lead + d]);
  }
  return flat;
}

absl::StatusOr<int> DimOf(const Node& node, const std::string& name, int rank) {
  return NormalizeDim(IntAttr(node, name, 0), rank);
}

int64_t Product(const Shape& s, size_t from, size_t to) {
  int64_t n = 1;
  for (size_t d = from; d < to; ++d) n *= s[d];
  return n;
}

// ---- integers --------------------------------------------------------------

// An integer as `type` holds it: int32 wraps (two's complement, as PyTorch
// narrows), bool is "nonzero" (True + True is True).
double AsType(int64_t v, DataType type) {
  if (type == DT_BOOL) return v != 0 ? 1 : 0;
  if (type == DT_INT32) return static_cast<int32_t>(static_cast<uint32_t>(v));
  return static_cast<double>(v);
}

// Wrapping arithmetic, as int64 tensors overflow (signed overflow is
// undefined in C++, unsigned is not).
int64_t WrapAdd(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) +
                              static_cast<uint64_t>(b));
}
int64_t WrapMul(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) *
                              static_cast<uint64_t>(b));
}

// PyTorch's integer pow: a negative exponent gives 1 / a^-e truncated
// (1 for a == 1, +-1 for a == -1, else 0).
int64_t IntPow(int64_t a, int64_t e) {
  if (e < 0) {
    if (a == 1) return 1;
    if (a == -1) return (-e) % 2 == 0 ? 1 : -1;
    return 0;
  }
  int64_t r = 1;
  for (; e > 0; e >>= 1, a = WrapMul(a, a)) {  // square and multiply
    if (e & 1) r = WrapMul(r, a);
  }
  return r;
}

absl::StatusOr<int64_t> IntArith(const std::string& op, int64_t a, int64_t b) {
  if (op == "add") return WrapAdd(a, b);
  if (op == "sub") return WrapAdd(a, WrapMul(b, -1));
  if (op == "mul") return WrapMul(a, b);
  if (op == "maximum") return std::max(a, b);
  if (op == "minimum") return std::min(a, b);
  if (op == "pow") return IntPow(a, b);
  if (b == 0) return Bad("integer division by zero in ", op);
  int64_t q =
      a / b;  // C++ truncates toward zero: torch's rounding_mode="trunc"
  // floordiv is Python's //, rounding toward -inf.
  if (op == "floordiv" && a % b != 0 && (a < 0) != (b < 0)) --q;
  return q;
}

// ---- floating point --------------------------------------------------------

// Python's (and PyTorch's) float floor division: the floor of the exact
// quotient, so 1.0 // 0.1 is 9 (0.1 is a little more than a tenth), where
// floor(1.0 / 0.1) would be floor(10.0) after rounding. fmod is exact;
// (a - mod) / b is then (nearly) an integer.
double FloorDiv(double a, double b) {
  if (b == 0) return a / b;  // IEEE: +-inf or NaN
  const double mod = std::fmod(a, b);
  double div = (a - mod) / b;
  if (mod != 0 && (b < 0) != (mod < 0)) div -= 1;
  if (div == 0) return std::copysign(0.0, a / b);
  double floor_div = std::floor(div);
  if (div - floor_div > 0.5) floor_div += 1;
  return floor_div;
}

double FloatArith(const std::string& op, double a, double b) {
  // maximum and minimum propagate NaN, as torch.maximum does.
  if ((op == "maximum" || op == "minimum") &&
      (std::isnan(a) || std::isnan(b))) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  if (op == "add") return a + b;
  if (op == "sub") return a - b;
  if (op == "mul") return a * b;
  if (op == "div") return a / b;
  if (op == "floordiv") return FloorDiv(a, b);
  if (op == "pow") return std::pow(a, b);
  if (op == "maximum") return std::max(a, b);
  return std::min(a, b);  // minimum
}

bool IsComparison(const std::string& op) {
  return op == "eq" || op == "ne" || op == "lt" || op == "le" || op == "gt" ||
         op == "ge" || op == "logical_and" || op == "logical_or";
}

double CompareValues(const std::string& op, double a, double b) {
  bool r = false;
  if (op == "eq") r = a == b;
  if (op == "ne") r = a != b;
  if (op == "lt") r = a < b;
  if (op == "le") r = a <= b;
  if (op == "gt") r = a > b;
  if (op == "ge") r = a >= b;
  if (op == "logical_and") r = a != 0 && b != 0;
  if (op == "logical_or") r = a != 0 || b != 0;
  return r ? 1 : 0;
}

// One element of a binary op on operands of `in_type`.
absl::StatusOr<double> BinaryValue(const std::string& op, double a, double b,
                                   DataType in_type, DataType out_type) {
  if (IsComparison(op)) return CompareValues(op, a, b);
  if (IsFloatingPoint(in_type)) return FloatArith(op, a, b);
  ASSIGN_OR_RETURN(int64_t r, IntArith(op, static_cast<int64_t>(a),
                                       static_cast<int64_t>(b)));
  return AsType(r, out_type);
}

// ---- elementwise -----------------------------------------------------------

// add ... logical_or: two tensors broadcast numpy-style, or one tensor and
// attribute "scalar" ("reverse" = 1: the scalar is the left operand).
Result Binary(const Node& node, const Inputs& in, DataType out_type) {
  RefTensor a = in[0], b;
  if (HasScalarOperand(node)) {
    const double s = FloatAttr(node, "scalar", 0);
    // The exporter casts an integer tensor to float before combining it
    // with a fractional number, as PyTorch's type promotion does.
    if (!IsFloatingPoint(a.dtype) && s != std::trunc(s)) {
      return Bad("scalar ", s, " with a ", TorchName(a.dtype), " tensor");
    }
    const bool reverse = IntAttr(node, "reverse", 0) != 0;
    if (!IsFloatingPoint(a.dtype) && node.op() == "pow" && !reverse && s < 0) {
      return Bad("integer tensor ** ", s,
                 ": PyTorch refuses negative integer powers");
    }
    b = RefTensor{Shape{}, a.dtype, {s}};
    if (reverse) std::swap(a, b);
  } else {
    b = in[1];
  }
  ASSIGN_OR_RETURN(Shape shape, BroadcastShapes(a.shape, b.shape));
  RefTensor out = Make(shape, out_type);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    const Ints idx = Unravel(i, shape);
    ASSIGN_OR_RETURN(
        out.v[i],
        BinaryValue(node.op(), a.v[BroadcastAt(idx, a.shape)],
                    b.v[BroadcastAt(idx, b.shape)], a.dtype, out_type));
  }
  return out;
}

double Gelu(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }
double GeluTanh(double x) {
  const double k = std::sqrt(2 / M_PI);
  return 0.5 * x * (1 + std::tanh(k * (x + 0.044715 * x * x * x)));
}

using UnaryFn = double (*)(double);

const absl::flat_hash_map<std::string, UnaryFn>& UnaryFns() {
  static const auto* fns = new absl::flat_hash_map<std::string, UnaryFn>{
      // relu keeps NaN, as PyTorch's does.
      {"relu", [](double x) { return x > 0 || std::isnan(x) ? x : 0.0; }},
      {"clone", [](double x) { return x; }},
      {"identity", [](double x) { return x; }},
      {"neg", [](double x) { return -x; }},
      {"abs", [](double x) { return std::fabs(x); }},
      {"logical_not", [](double x) { return x == 0 ? 1.0 : 0.0; }},
      {"gelu", Gelu},
      {"gelu_tanh", GeluTanh},
      {"silu", [](double x) { return x / (1 + std::exp(-x)); }},
      {"tanh", [](double x) { return std::tanh(x); }},
      {"sigmoid", [](double x) { return 1 / (1 + std::exp(-x)); }},
      {"sqrt", [](double x) { return std::sqrt(x); }},
      {"rsqrt", [](double x) { return 1 / std::sqrt(x); }},
      {"exp", [](double x) { return std::exp(x); }},
      {"log", [](double x) { return std::log(x); }},
      {"cos", [](double x) { return std::cos(x); }},
      {"sin", [](double x) { return std::sin(x); }},
  };
  return *fns;
}

Result Unary(const Node& node, const Inputs& in, DataType out_type) {
  std::string key = node.op();
  if (key == "gelu") {
    // F.gelu(approximate=...): "none" (erf) or "tanh"; absent is "none".
    const std::string approx = StringAttr(node, "approximate");
    if (approx == "tanh") {
      key = "gelu_tanh";
    } else if (!approx.empty() && approx != "none") {
      return Bad("gelu approximate \"", approx, "\" (expected none or tanh)");
    }
  }
  const UnaryFn f = UnaryFns().at(key);
  RefTensor out = Make(in[0].shape, out_type);
  for (size_t i = 0; i < out.v.size(); ++i) out.v[i] = f(in[0].v[i]);
  return out;
}

// where(cond, a, b): all three broadcast together.
Result Where(const Node&, const Inputs& in, DataType out_type) {
  ASSIGN_OR_RETURN(Shape ab, BroadcastShapes(in[1].shape, in[2].shape));
  ASSIGN_OR_RETURN(Shape shape, BroadcastShapes(in[0].shape, ab));
  RefTensor out = Make(shape, out_type);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    const Ints idx = Unravel(i, shape);
    const bool c = in[0].v[BroadcastAt(idx, in[0].shape)] != 0;
    const RefTensor& pick = c ? in[1] : in[2];
    out.v[i] = pick.v[BroadcastAt(idx, pick.shape)];
  }
  return out;
}

// ---- normalisation and reductions -----------------------------------------

// softmax / log_softmax along attr dim. x is viewed as [outer, n, inner]:
// each (outer, inner) pair is one row of n, normalised on its own.
Result Softmax(const Node& node, const Inputs& in, DataType out_type) {
  const RefTensor& x = in[0];
  const int rank = static_cast<int>(x.shape.size());
  ASSIGN_OR_RETURN(int dim, DimOf(node, "dim", rank));
  const int64_t n = rank == 0 ? 1 : x.shape[dim];
  const int64_t outer = rank == 0 ? 1 : Product(x.shape, 0, dim);
  const int64_t inner = rank == 0 ? 1 : Product(x.shape, dim + 1, rank);
  const bool log = node.op() == "log_softmax";
  RefTensor out = Make(x.shape, out_type);
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < inner; ++i) {
      auto at = [&](int64_t k) { return (o * n + k) * inner + i; };
      // The row's max is subtracted so exp cannot overflow; a row of only
      // -inf gives NaN (-inf - -inf), as in PyTorch.
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < n; ++k) mx = std::max(mx, x.v[at(k)]);
      double sum = 0;
      for (int64_t k = 0; k < n; ++k) sum += std::exp(x.v[at(k)] - mx);
      for (int64_t k = 0; k < n; ++k) {
        const double z = x.v[at(k)] - mx;
        out.v[at(k)] = log ? z - std::log(sum) : std::exp(z) / sum;
      }
    }
  }
  return out;
}

// layer_norm(x, [weight], [bias]) over the last attr ndim dims (rows of n):
// (x - mean) / sqrt(var + eps) * weight + bias, var the biased variance.
Result LayerNorm(const Node& node, const Inputs& in, DataType out_type) {
  const RefTensor& x = in[0];
  const size_t nd = static_cast<size_t>(IntAttr(node, "ndim", 1));
  const int64_t n = Product(x.shape, x.shape.size() - nd, x.shape.size());
  const int64_t rows = n == 0 ? 0 : static_cast<int64_t>(x.v.size()) / n;
  const double eps = FloatAttr(node, "eps", 1e-5);
  size_t k = 1;
  const RefTensor* w = IntAttr(node, "has_weight", 0) != 0 ? &in[k++] : nullptr;
  const RefTensor* b = IntAttr(node, "has_bias", 0) != 0 ? &in[k++] : nullptr;
  RefTensor out = Make(x.shape, out_type);
  for (int64_t r = 0; r < rows; ++r) {
    const double* row = &x.v[r * n];
    double mean = 0, var = 0;
    for (int64_t j = 0; j < n; ++j) mean += row[j];
    mean /= static_cast<double>(n);
    for (int64_t j = 0; j < n; ++j) var += (row[j] - mean) * (row[j] - mean);
    var /= static_cast<double>(n);
    for (int64_t j = 0; j < n; ++j) {
      double y = (row[j] - mean) / std::sqrt(var + eps);
      if (w != nullptr) y *= w->v[j];
      if (b != nullptr) y += b->v[j];
      out.v[r * n + j] = y;
    }
  }
  return out;
}

// sum / mean / amax over attr dims (empty: every dim), keepdim.
Result Reduce(const Node& node, const Inputs& in, DataType out_type) {
  const RefTensor& x = in[0];
  const int rank = static_cast<int>(x.shape.size());
  const Ints dims = ResolvedInts(node, "dims", {}, 0);
  std::vector<bool> reduce(rank, dims.empty());
  for (int64_t d : dims) {
    ASSIGN_OR_RETURN(int nd, NormalizeDim(d, rank));
    reduce[nd] = true;
  }
  const std::string& op = node.op();  // a mean of integers: refused by its type rule
  Shape kept = x.shape, out_shape;  // kept: reduced dims as 1
  for (int d = 0; d < rank; ++d) {
    if (reduce[d]) kept[d] = 1;
    if (!reduce[d] || IntAttr(node, "keepdim", 0) != 0) {
      out_shape.push_back(kept[d]);
    }
  }
  RefTensor out = Make(out_shape, out_type);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> acc(out.v.size(), op == "amax" ? -HUGE_VAL : 0.0);
  for (int64_t i = 0; i < static_cast<int64_t>(x.v.size()); ++i) {
    // The output element: x's index with the reduced dims read at 0.
    const int64_t o = BroadcastAt(Unravel(i, x.shape), kept);
    const double v = x.v[i];
    if (op != "amax") {
      acc[o] += v;
    } else {  // NaN wins, as in torch.amax
      acc[o] = std::isnan(acc[o]) || std::isnan(v) ? nan : std::max(acc[o], v);
    }
  }
  const int64_t count =
      out.v.empty() ? 0 : static_cast<int64_t>(x.v.size() / out.v.size());
  if (op == "amax" && count == 0 && !out.v.empty()) {
    return Bad("amax over an empty dimension of ", ShapeToString(x.shape));
  }
  // A mean over no elements is 0 / 0 = NaN, as in PyTorch.
  for (size_t o = 0; o < out.v.size(); ++o) {
    out.v[o] = op == "mean" ? acc[o] / static_cast<double>(count) : acc[o];
  }
  return out;
}

// ---- products --------------------------------------------------------------

// out[i, j] = sum_p a[i, p] * b[p, j] for a [m, k], b [k, n], all row-major.
void MatrixProduct(const double* a, const double* b, int64_t m, int64_t k,
                   int64_t n, double* out) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) s += a[i * k + p] * b[p * n + j];
      out[i * n + j] = s;
    }
  }
}

// mm: a [M, K] @ b [K, N].
Result Mm(const Node&, const Inputs& in, DataType out_type) {
  const int64_t m = in[0].shape[0], k = in[0].shape[1], n = in[1].shape[1];
  RefTensor out = Make({m, n}, out_type);
  MatrixProduct(in[0].v.data(), in[1].v.data(), m, k, n, out.v.data());
  return out;
}

// torch.matmul: a 1-D a is a row [1, K], a 1-D b a column [K, 1], that
// dimension dropped from the result; the batch dims broadcast.
Result Matmul(const Node&, const Inputs& in, DataType out_type) {
  Shape a = in[0].shape, b = in[1].shape;
  const bool a_vec = a.size() == 1, b_vec = b.size() == 1;
  if (a_vec) a.insert(a.begin(), 1);
  if (b_vec) b.push_back(1);
  const int64_t m = a[a.size() - 2], k = a.back(), n = b.back();
  const Shape batch_a(a.begin(), a.end() - 2), batch_b(b.begin(), b.end() - 2);
  ASSIGN_OR_RETURN(Shape batch, BroadcastShapes(batch_a, batch_b));
  Shape shape = batch;
  if (!a_vec) shape.push_back(m);
  if (!b_vec) shape.push_back(n);
  RefTensor out = Make(shape, out_type);
  for (int64_t i = 0; i < NumElements(batch); ++i) {
    const Ints idx = Unravel(i, batch);
    MatrixProduct(&in[0].v[BroadcastAt(idx, batch_a) * m * k],
                  &in[1].v[BroadcastAt(idx, batch_b) * k * n], m, k, n,
                  &out.v[i * m * n]);
  }
  return out;
}

// linear: x [..., in] @ weight [out, in]^T + bias [out].
Result Linear(const Node&, const Inputs& in, DataType out_type) {
  const RefTensor &x = in[0], &w = in[1];
  const int64_t d_in = w.shape[1], d_out = w.shape[0];
  const int64_t rows = d_in == 0 ? Product(x.shape, 0, x.shape.size() - 1)
                                 : static_cast<int64_t>(x.v.size()) / d_in;
  Shape shape = x.shape;
  shape.back() = d_out;
  RefTensor out = Make(shape, out_type);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < d_out; ++o) {
      double s = in.size() == 3 ? in[2].v[o] : 0.0;
      for (int64_t i = 0; i < d_in; ++i) {
        s += x.v[r * d_in + i] * w.v[o * d_in + i];
      }
      out.v[r * d_out + o] = s;
    }
  }
  return out;
}

// addmm(bias, a [M, K], b [K, N]) = beta * bias + alpha * (a @ b), bias
// broadcast to [M, N]; attrs beta, alpha (default 1).
Result Addmm(const Node& node, const Inputs& in, DataType out_type) {
  ASSIGN_OR_RETURN(RefTensor out, Mm(node, {in[1], in[2]}, out_type));
  const double beta = FloatAttr(node, "beta", 1);
  const double alpha = FloatAttr(node, "alpha", 1);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    const double bias =
        in[0].v[BroadcastAt(Unravel(i, out.shape), in[0].shape)];
    // beta = 0 ignores the bias, NaN included (torch.addmm's documented rule).
    out.v[i] = (beta == 0 ? 0 : beta * bias) + alpha * out.v[i];
  }
  return out;
}

// ---- data movement ---------------------------------------------------------

// embedding(ids [...], weight [V, D]) -> [..., D]: row ids[i] of weight.
Result Embedding(const Node&, const Inputs& in, DataType out_type) {
  const RefTensor &ids = in[0], &w = in[1];
  const int64_t rows = w.shape[0], d = w.shape[1];
  Shape shape = ids.shape;
  shape.push_back(d);
  RefTensor out = Make(shape, out_type);
  for (size_t i = 0; i < ids.v.size(); ++i) {
    const int64_t id = static_cast<int64_t>(ids.v[i]);
    if (id < 0 || id >= rows) {
      return Bad("embedding id ", id, " (at flat index ", i, ") is not in [0, ",
                 rows, ")");
    }
    for (int64_t j = 0; j < d; ++j) out.v[i * d + j] = w.v[id * d + j];
  }
  return out;
}

// Same values in row-major order under another shape.
RefTensor Reshaped(const RefTensor& x, Shape shape, DataType out_type) {
  return RefTensor{std::move(shape), out_type, x.v};
}

// reshape: attr shape, at most one -1 (the size that makes the count fit).
Result Reshape(const Node& node, const Inputs& in, DataType out_type) {
  const Ints want = ResolvedInts(node, "shape", {}, 0);
  Shape shape(want.begin(), want.end());
  int64_t known = 1;
  for (int64_t d : shape) known *= d == -1 ? 1 : d;
  const int64_t count = static_cast<int64_t>(in[0].v.size());
  for (int64_t& d : shape) {
    if (d == -1) d = known == 0 ? 0 : count / known;
  }
  if (NumElements(shape) != count) {
    return Bad("reshape of ", ShapeToString(in[0].shape), " to ",
               ShapeToString(shape));
  }
  return Reshaped(in[0], shape, out_type);
}

// unsqueeze: a size-1 dim inserted at attr dim (of the result's rank).
Result Unsqueeze(const Node& node, const Inputs& in, DataType out_type) {
  Shape shape = in[0].shape;
  ASSIGN_OR_RETURN(int dim,
                   DimOf(node, "dim", static_cast<int>(shape.size()) + 1));
  shape.insert(shape.begin() + dim, 1);
  return Reshaped(in[0], shape, out_type);
}

// squeeze: the dims listed in attr dims dropped, those of size 1 only
// (PyTorch leaves a listed dim of another size).
Result Squeeze(const Node& node, const Inputs& in, DataType out_type) {
  const Shape& x = in[0].shape;
  std::vector<bool> drop(x.size(), false);
  for (int64_t d : ResolvedInts(node, "dims", {}, 0)) {
    ASSIGN_OR_RETURN(int nd, NormalizeDim(d, static_cast<int>(x.size())));
    drop[nd] = x[nd] == 1;
  }
  Shape shape;
  for (size_t d = 0; d < x.size(); ++d) {
    if (!drop[d]) shape.push_back(x[d]);
  }
  return Reshaped(in[0], shape, out_type);
}

// permute: result dim i is input dim dims[i].
Result Permute(const Node& node, const Inputs& in, DataType out_type) {
  const RefTensor& x = in[0];
  const int rank = static_cast<int>(x.shape.size());
  std::vector<int> dims;
  Shape shape;
  for (int64_t d : ResolvedInts(node, "dims", {}, 0)) {
    ASSIGN_OR_RETURN(int nd, NormalizeDim(d, rank));
    dims.push_back(nd);
    shape.push_back(x.shape[nd]);
  }
  RefTensor out = Make(shape, out_type);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    const Ints idx = Unravel(i, shape);
    Ints src(rank);
    for (int d = 0; d < rank; ++d) src[dims[d]] = idx[d];
    out.v[i] = x.v[Ravel(src, x.shape)];
  }
  return out;
}

// expand: attr shape, -1 keeping the input's size; size-1 dims (and new
// leading ones) repeat.
Result Expand(const Node& node, const Inputs& in, DataType out_type) {
  const RefTensor& x = in[0];
  const Ints want = ResolvedInts(node, "shape", {}, 0);
  Shape shape(want.begin(), want.end());
  const size_t lead = shape.size() - x.shape.size();
  for (size_t d = lead; d < shape.size(); ++d) {
    if (shape[d] == -1) shape[d] = x.shape[d - lead];
  }
  RefTensor out = Make(shape, out_type);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    out.v[i] = x.v[BroadcastAt(Unravel(i, shape), x.shape)];
  }
  return out;
}

// slice: attrs dim, start (0), stop (to the end), step (>= 1). Negative
// bounds count from the end; both are then clamped to [0, size], as
// Python slicing does.
Result Slice(const Node& node, const Inputs& in, DataType out_type) {
  const RefTensor& x = in[0];
  ASSIGN_OR_RETURN(int dim,
                   DimOf(node, "dim", static_cast<int>(x.shape.size())));
  const int64_t n = x.shape[dim], step = IntAttr(node, "step", 1);
  auto clamp = [n](int64_t v) {
    return std::min(std::max<int64_t>(v < 0 ? v + n : v, 0), n);
  };
  const int64_t start = clamp(IntAttr(node, "start", 0));
  const int64_t stop =
      clamp(IntAttr(node, "stop", std::numeric_limits<int64_t>::max()));
  Shape shape = x.shape;
  shape[dim] = stop > start ? (stop - start + step - 1) / step : 0;
  RefTensor out = Make(shape, out_type);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    Ints idx = Unravel(i, shape);
    idx[dim] = start + idx[dim] * step;
    out.v[i] = x.v[Ravel(idx, x.shape)];
  }
  return out;
}

// select: attrs dim, index (negative counts from the end); dim removed.
Result Select(const Node& node, const Inputs& in, DataType out_type) {
  const RefTensor& x = in[0];
  ASSIGN_OR_RETURN(int dim,
                   DimOf(node, "dim", static_cast<int>(x.shape.size())));
  int64_t index = IntAttr(node, "index", 0);
  if (index < 0) index += x.shape[dim];
  if (index < 0 || index >= x.shape[dim]) {
    return Bad("select index ", IntAttr(node, "index", 0), " of ",
               ShapeToString(x.shape));
  }
  Shape shape = x.shape;
  shape.erase(shape.begin() + dim);
  RefTensor out = Make(shape, out_type);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    Ints idx = Unravel(i, shape);
    idx.insert(idx.begin() + dim, index);
    out.v[i] = x.v[Ravel(idx, x.shape)];
  }
  return out;
}

// cat: the inputs one after another along attr dim.
Result Cat(const Node& node, const Inputs& in, DataType out_type) {
  ASSIGN_OR_RETURN(int dim,
                   DimOf(node, "dim", static_cast<int>(in[0].shape.size())));
  Shape shape = in[0].shape;
  shape[dim] = 0;
  for (const RefTensor& t : in) shape[dim] += t.shape[dim];
  RefTensor out = Make(shape, out_type);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    Ints idx = Unravel(i, shape);
    size_t k = 0;  // the input holding idx[dim], at idx[dim] within it
    while (idx[dim] >= in[k].shape[dim]) idx[dim] -= in[k++].shape[dim];
    out.v[i] = in[k].v[Ravel(idx, in[k].shape)];
  }
  return out;
}

// stack: a new dim at attr dim (of the result's rank) indexes the inputs.
Result Stack(const Node& node, const Inputs& in, DataType out_type) {
  const Shape& each = in[0].shape;
  ASSIGN_OR_RETURN(int dim,
                   DimOf(node, "dim", static_cast<int>(each.size()) + 1));
  Shape shape = each;
  shape.insert(shape.begin() + dim, static_cast<int64_t>(in.size()));
  RefTensor out = Make(shape, out_type);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    Ints idx = Unravel(i, shape);
    const int64_t k = idx[dim];
    idx.erase(idx.begin() + dim);
    out.v[i] = in[k].v[Ravel(idx, each)];
  }
  return out;
}

// triu / tril of the last two dims: triu keeps j - i >= diagonal, tril
// j - i <= diagonal; the rest is 0.
Result Tri(const Node& node, const Inputs& in, DataType out_type) {
  const RefTensor& x = in[0];
  const int64_t diagonal = IntAttr(node, "diagonal", 0);
  const bool upper = node.op() == "triu";
  RefTensor out = Make(x.shape, out_type);
  for (int64_t i = 0; i < static_cast<int64_t>(out.v.size()); ++i) {
    const Ints idx = Unravel(i, x.shape);
    const int64_t row = idx[idx.size() - 2], col = idx.back();
    const bool keep = upper ? col - row >= diagonal : col - row <= diagonal;
    out.v[i] = keep ? x.v[i] : 0;
  }
  return out;
}

// ---- creation and types ----------------------------------------------------

// arange: start, start + step, ... before end (attrs start 0, end, step 1).
Result Arange(const Node& node, const Inputs&, DataType out_type) {
  const int64_t start = IntAttr(node, "start", 0);
  const int64_t end = IntAttr(node, "end", 0);
  const int64_t step = IntAttr(node, "step", 1);
  if (step == 0) return Bad("arange step is 0");
  // ceil((end - start) / step) values, none when end is behind start.
  const int64_t span = step > 0 ? end - start : start - end,
                stride = step > 0 ? step : -step;
  const int64_t n = span > 0 ? (span + stride - 1) / stride : 0;
  RefTensor out = Make({n}, out_type);
  for (int64_t i = 0; i < n; ++i) {
    out.v[i] = static_cast<double>(start + i * step);
  }
  return out;
}

// `v` converted to `to` as tensor.to(to) does. Floats go through float32
// (PyTorch converts a float32 or integer value to a 16-bit type via
// float), rounding to nearest even; integers truncate toward zero; bool is
// "nonzero". kInvalidArgument for a non-finite or out-of-range value to an
// integer type, which PyTorch leaves undefined (platform-dependent).
absl::StatusOr<double> Convert(double v, DataType to) {
  switch (to) {
    case DT_FLOAT32:
      return static_cast<double>(static_cast<float>(v));
    case DT_FLOAT16:
      return HalfToFloat(FloatToHalf(static_cast<float>(v)));
    case DT_BFLOAT16:
      return Bf16ToFloat(FloatToBf16(static_cast<float>(v)));
    case DT_BOOL:
      return v != 0 ? 1.0 : 0.0;
    default:
      break;
  }
  const double t = std::trunc(v);
  const double limit = to == DT_INT32 ? 2147483648.0 : 9223372036854775808.0;
  if (!(t >= -limit && t < limit)) {
    return Bad("cast of ", v, " to ", TorchName(to), " is undefined");
  }
  return t;
}

Result Cast(const Node&, const Inputs& in, DataType out_type) {
  RefTensor out = Make(in[0].shape, out_type);
  for (size_t i = 0; i < out.v.size(); ++i) {
    ASSIGN_OR_RETURN(out.v[i], Convert(in[0].v[i], out_type));
  }
  return out;
}

// full: attr shape filled with attr value. A floating-point result keeps
// the value unrounded (the oracle's rule); integer and bool ones convert.
Result Full(const Node& node, const Inputs&, DataType out_type) {
  const Ints want = ResolvedInts(node, "shape", {}, 0);
  double value = FloatAttr(node, "value", 0);
  if (!IsFloatingPoint(out_type)) {
    ASSIGN_OR_RETURN(value, Convert(value, out_type));
  }
  RefTensor out = Make(Shape(want.begin(), want.end()), out_type);
  std::fill(out.v.begin(), out.v.end(), value);
  return out;
}

// size: x.shape[dim] as a rank-0 int64.
Result Size(const Node& node, const Inputs& in, DataType out_type) {
  ASSIGN_OR_RETURN(int dim,
                   DimOf(node, "dim", static_cast<int>(in[0].shape.size())));
  return RefTensor{Shape{}, out_type, {static_cast<double>(in[0].shape[dim])}};
}

// ---- generation ------------------------------------------------------------

// The oracle knows no cache: it takes a step that prefills each sequence
// from position 0 (its tokens hold positions 0..n-1, in any order).
absl::Status CheckPrefill(const RefTensor& positions, const RefTensor& seq,
                          const RefTensor& blocks, int64_t sequences) {
  if (blocks.shape[0] != sequences) {
    return Bad("kv_blocks ", ShapeToString(blocks.shape),
               " needs a row per sequence (", sequences, ")");
  }
  std::vector<std::vector<int64_t>> by_seq(static_cast<size_t>(sequences));
  for (size_t t = 0; t < seq.v.size(); ++t) {
    const int64_t s = static_cast<int64_t>(seq.v[t]);
    if (s < 0 || s >= sequences) {
      return Bad("token ", t, ": sequence index ", s, " of ", sequences);
    }
    by_seq[s].push_back(static_cast<int64_t>(positions.v[t]));
  }
  for (size_t s = 0; s < by_seq.size(); ++s) {
    std::vector<int64_t>& p = by_seq[s];
    std::sort(p.begin(), p.end());
    if (!p.empty() && p[0] != 0) {
      return absl::UnimplementedError(
          absl::StrCat("sequence ", s, " starts at position ", p[0],
                       ": the reference computes only a prefill from position "
                       "0 (no cache)"));
    }
    for (size_t i = 0; i < p.size(); ++i) {
      if (p[i] != static_cast<int64_t>(i)) {
        return Bad("sequence ", s, ": its positions are not 0..", p.size() - 1,
                   " once each");
      }
    }
  }
  return absl::OkStatus();
}

// Output row (h, t): softmax over the visible tokens u of scale * q[h, t]
// . k[g, u], then the weighted sum of v[g, u]. q, k, v [1, heads, T, D].
void AttendRow(const Inputs& in, int64_t h, int64_t g, int64_t t,
               const Ints& visible, double scale, RefTensor* out) {
  const RefTensor &q = in[0], &k = in[1], &v = in[2];
  const int64_t tokens = q.shape[2], d = q.shape[3];
  const double* qr = &q.v[(h * tokens + t) * d];
  std::vector<double> score;
  double mx = -std::numeric_limits<double>::infinity(), sum = 0;
  for (int64_t u : visible) {
    double s = 0;
    for (int64_t j = 0; j < d; ++j) s += qr[j] * k.v[(g * tokens + u) * d + j];
    score.push_back(s * scale);
    mx = std::max(mx, score.back());
  }
  for (double& s : score) sum += s = std::exp(s - mx);
  double* o = &out->v[(h * tokens + t) * d];
  for (size_t i = 0; i < visible.size(); ++i) {
    for (int64_t j = 0; j < d; ++j) {
      o[j] += score[i] / sum * v.v[(g * tokens + visible[i]) * d + j];
    }
  }
}

// cached_attention(q [1, H, T, D], k, v [1, Hkv, T, D], positions [T],
// seq [T], blocks [N, B], seq_ids [N]): token t attends causally within
// its sequence seq[t], to the tokens at positions <= positions[t]. Query
// head h reads key/value head h / (H / Hkv) (grouped-query attention).
Result CachedAttention(const Node& node, const Inputs& in, DataType out_type) {
  const RefTensor& q = in[0];
  const int64_t heads = q.shape[1], tokens = q.shape[2],
                kv_heads = in[1].shape[1];
  if (kv_heads == 0 || heads % kv_heads != 0 || in[1].shape[2] != tokens ||
      in[1].shape[3] != q.shape[3]) {
    return Bad("q ", ShapeToString(q.shape), " and k ",
               ShapeToString(in[1].shape),
               ": need the query heads a multiple of the key heads, same "
               "tokens and head_dim");
  }
  const RefTensor &positions = in[3], &seq = in[4];
  RETURN_IF_ERROR(CheckPrefill(positions, seq, in[5], in[6].shape[0]));
  const double scale = FloatAttr(node, "scale", 1.0);
  RefTensor out = Make(q.shape, out_type);
  for (int64_t t = 0; t < tokens; ++t) {
    Ints visible;
    for (int64_t u = 0; u < tokens; ++u) {
      if (seq.v[u] == seq.v[t] && positions.v[u] <= positions.v[t]) {
        visible.push_back(u);
      }
    }
    for (int64_t h = 0; h < heads; ++h) {
      AttendRow(in, h, h / (heads / kv_heads), t, visible, scale, &out);
    }
  }
  return out;
}

// One row's pick as runtime/sampler.h defines it, written apart from the
// sampler: the penalties, then greedy (std::max_element's pick), or the
// tokens sorted by logit (ties by id), the top_k of them, the fewest whose
// weights reach top_p of theirs, and the one where UniformDraw(seed,
// generated) of their weight falls.
int64_t PickOf(std::vector<double> x, const double* f, const double* n,
               const std::vector<double>& context) {
  const int64_t vocab = static_cast<int64_t>(x.size()), len = context.size();
  std::vector<bool> seen(vocab, false);
  for (double t : context) {
    if (t >= 0 && t < vocab) seen[static_cast<int64_t>(t)] = true;
  }
  for (int64_t v = 0; v < vocab && f[2] != 1; ++v) {
    if (seen[v]) x[v] = x[v] > 0 ? x[v] / f[2] : x[v] * f[2];
  }
  for (int64_t i = len - std::min<int64_t>(static_cast<int64_t>(n[2]), len); i < len; ++i) {
    const double t = context[i];
    if (t >= 0 && t < vocab) x[static_cast<int64_t>(t)] -= f[3];
  }
  if (f[0] == 0) return std::max_element(x.begin(), x.end()) - x.begin();
  std::vector<int64_t> order(vocab);
  for (int64_t v = 0; v < vocab; ++v) order[v] = v;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x[a] > x[b]; });
  const int64_t top_k = static_cast<int64_t>(n[0]);
  int64_t keep = top_k > 0 && top_k < vocab ? top_k : vocab;
  std::vector<double> w(keep);
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += w[i] = std::exp(x[order[i]] / f[0] - x[order[0]] / f[0]);
  if (f[1] < 1) {
    double acc = 0;
    int64_t k = 0;
    while (k < keep && acc < f[1] * total) acc += w[k++];
    keep = std::max<int64_t>(k, 1);
    total = acc;
  }
  const double u = UniformDraw(static_cast<uint64_t>(static_cast<int64_t>(n[1])),
                               static_cast<int64_t>(n[2])) * total;
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    if (u < (acc += w[i])) return order[i];
  }
  return order[keep - 1];
}

// sample_tokens(logits [N, V], floats [N, 4], ints [N, 3], context, ends):
// each row's pick (PickOf) on the logits as floats (what every backend
// samples from), once the parameters pass the CPU's checks (SampleRows,
// whose messages every backend gives).
Result SampleTokens(const Node&, const Inputs& in, DataType out_type) {
  const RefTensor &logits = in[0], &floats = in[1], &ints = in[2], &context = in[3], &ends = in[4];
  const int64_t rows = logits.shape[0], vocab = logits.shape[1];
  std::vector<float> f(floats.v.begin(), floats.v.end());
  std::vector<int64_t> n(ints.v.begin(), ints.v.end()), e(ends.v.begin(), ends.v.end());
  RETURN_IF_ERROR(SampleRows(f.data(), n.data(), e.data(), rows,
                             static_cast<int64_t>(context.v.size()), vocab)
                      .status());
  RefTensor out = Make({rows}, out_type);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> row(vocab);
    for (int64_t v = 0; v < vocab; ++v) row[v] = static_cast<float>(logits.v[r * vocab + v]);
    const int64_t begin = r == 0 ? 0 : e[r - 1];
    const std::vector<double> seen(context.v.begin() + begin, context.v.begin() + e[r]);
    out.v[r] = static_cast<double>(PickOf(std::move(row), &floats.v[r * 4], &ints.v[r * 3], seen));
  }
  return out;
}

// ---- the table -------------------------------------------------------------

const absl::flat_hash_map<std::string, OpFn>& Ops() {
  static const auto* ops = [] {
    auto* m = new absl::flat_hash_map<std::string, OpFn>;
    for (const char* name :
         {"add", "sub", "mul", "div", "floordiv", "pow", "maximum", "minimum",
          "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or"}) {
      (*m)[name] = Binary;
    }
    for (const auto& [name, fn] : UnaryFns()) {
      if (name != "gelu_tanh") (*m)[name] = Unary;
    }
    for (const char* name : {"sum", "mean", "amax"}) (*m)[name] = Reduce;
    m->insert({{"mm", Mm},
               {"matmul", Matmul},
               {"linear", Linear},
               {"addmm", Addmm},
               {"where", Where},
               {"softmax", Softmax},
               {"log_softmax", Softmax},
               {"layer_norm", LayerNorm},
               {"embedding", Embedding},
               {"reshape", Reshape},
               {"permute", Permute},
               {"unsqueeze", Unsqueeze},
               {"squeeze", Squeeze},
               {"expand", Expand},
               {"slice", Slice},
               {"select", Select},
               {"cat", Cat},
               {"stack", Stack},
               {"arange", Arange},
               {"full", Full},
               {"cast", Cast},
               {"triu", Tri},
               {"tril", Tri},
               {"size", Size},
               {"cached_attention", CachedAttention},
               {"sample_tokens", SampleTokens}});
    return m;
  }();
  return *ops;
}

// What the schema says of a node on these inputs.
struct Expected {
  DataType type = DT_INVALID;
  Shape shape;
};

// The checks every op shares: the schema's arity, shape and dtype rules
// (which also keep the loops above inside their inputs).
absl::StatusOr<Expected> CheckInputs(const OpSchema& schema, const Node& node,
                                     const Inputs& in) {
  const int n = static_cast<int>(in.size());
  if (n < schema.min_inputs || n > schema.max_inputs) {
    return Bad("takes ", schema.min_inputs, " to ", schema.max_inputs,
               " inputs, got ", n);
  }
  std::vector<Shape> shapes;
  std::vector<DataType> types;
  for (int i = 0; i < n; ++i) {
    if (static_cast<int64_t>(in[i].v.size()) != NumElements(in[i].shape)) {
      return Bad("input ", i, ": ", in[i].v.size(), " values for shape ",
                 ShapeToString(in[i].shape));
    }
    shapes.push_back(in[i].shape);
    types.push_back(in[i].dtype);
  }
  Expected e;
  ASSIGN_OR_RETURN(std::vector<Shape> out_shapes, schema.infer(node, shapes));
  e.shape = out_shapes.at(0);
  if (schema.dtype == nullptr) {
    e.type = types.at(0);
  } else {
    ASSIGN_OR_RETURN(e.type, schema.dtype(node, types));
  }
  return e;
}

absl::Status Prefixed(const Node& node, const absl::Status& status) {
  return absl::Status(status.code(),
                      absl::StrCat(node.op(), ": ", status.message()));
}

}  // namespace

RefTensor ToRef(const Tensor& t) {
  RefTensor r = Make(t.shape(), t.dtype());
  for (int64_t i = 0; i < t.numel(); ++i) {
    switch (t.dtype()) {
      case DT_FLOAT32:
        r.v[i] = t.data()[i];
        break;
      case DT_FLOAT16:
        r.v[i] = HalfToFloat(t.data_as<uint16_t>()[i]);
        break;
      case DT_BFLOAT16:
        r.v[i] = Bf16ToFloat(t.data_as<uint16_t>()[i]);
        break;
      default:  // int64, int32, bool
        r.v[i] = static_cast<double>(t.IntAt(i));
        break;
    }
  }
  return r;
}

absl::StatusOr<RefTensor> ReferenceOp(const Node& node,
                                      const std::vector<RefTensor>& inputs) {
  auto it = Ops().find(node.op());
  const OpSchema* schema = FindOp(node.op());
  if (it == Ops().end() || schema == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("the reference has no op \"", node.op(), "\""));
  }
  absl::StatusOr<Expected> expected = CheckInputs(*schema, node, inputs);
  if (!expected.ok()) return Prefixed(node, expected.status());
  absl::StatusOr<RefTensor> out = it->second(node, inputs, expected->type);
  if (!out.ok()) return Prefixed(node, out.status());
  // Two independent derivations of the shape: a disagreement is a bug in
  // this file or in the schema, never an answer to check a backend with.
  if (out->shape != expected->shape) {
    return absl::InternalError(absl::StrCat(
        node.op(), ": the reference computed ", ShapeToString(out->shape),
        ", the schema infers ", ShapeToString(expected->shape)));
  }
  return out;
}

double MaxRelativeDifference(const Tensor& got, const Tensor& want) {
  if (got.shape() != want.shape()) return INFINITY;
  double err = 0, scale = 1e-30;
  for (int64_t i = 0; i < want.numel(); ++i) {
    if (std::isnan(got.data()[i]) != std::isnan(want.data()[i])) return INFINITY;
    if (std::isinf(want.data()[i]) || std::isinf(got.data()[i])) {  // must be the same infinity
      if (got.data()[i] != want.data()[i]) return INFINITY;
      continue;
    }
    err = std::max(err, static_cast<double>(std::fabs(got.data()[i] - want.data()[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want.data()[i])));
  }
  return err / scale;
}

double RelativeError(const Tensor& got, const RefTensor& want) {
  const RefTensor g = ToRef(got);
  if (!IsFloatingPoint(got.dtype())) {
    int64_t differ = 0;
    for (size_t i = 0; i < g.v.size(); ++i) differ += g.v[i] != want.v[i];
    return g.v.empty() ? 0.0 : static_cast<double>(differ) / g.v.size();
  }
  double err = 0, norm = 0;
  for (size_t i = 0; i < g.v.size(); ++i) {
    if (std::isnan(g.v[i]) != std::isnan(want.v[i])) return INFINITY;  // unwritten, or wrong
    if (std::isnan(g.v[i])) continue;
    err += (g.v[i] - want.v[i]) * (g.v[i] - want.v[i]);
    norm += want.v[i] * want.v[i];
  }
  return norm == 0 ? std::sqrt(err) : std::sqrt(err / norm);
}

double Tolerance(DataType dtype) {
  switch (dtype) {
    case DT_FLOAT32: return 1e-5;
    case DT_FLOAT16: return 1e-3;
    case DT_BFLOAT16: return 1e-2;
    default: return 0.0;
  }
}

}  // namespace pipeserve
