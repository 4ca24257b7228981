// The CPU kernels of the elementwise ops: binary arithmetic, compares and
// logical ops (float32, int64, int32 and bool; bfloat16 in float32 blocks),
// unary math (float32 and bfloat16; neg, abs, relu and logical_not on
// integers too), where, and ElementwiseGroup (cpu_ops.h), which runs a
// chain of them in one pass over blocks held in L1.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/dtype.h"
#include "graph/op_schema.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/cpu/ops/internal.h"
#include "runtime/cpu/ops/kernel_table.h"

namespace pipeserve {
namespace {

using cpu_ops::AllOfType;
using cpu_ops::Args;
using cpu_ops::Bad;
using cpu_ops::BroadcastStrides;
using cpu_ops::FastExp;
using cpu_ops::IsTrailingBlock;
using cpu_ops::Iterate;
using cpu_ops::MaxOf;
using cpu_ops::MinOf;
using cpu_ops::NarrowToBf16;
using cpu_ops::Output;
using cpu_ops::Strides;
using cpu_ops::WidenBf16;

// ---- binary ops -------------------------------------------------------------

enum class BinOp {
  kAdd, kSub, kMul, kDiv, kFloorDiv, kPow, kMax, kMin,
  kEq, kNe, kLt, kLe, kGt, kGe, kAnd, kOr, kUnknown,
};

BinOp BinOpOf(const std::string& op) {
  static const auto* ops = new absl::flat_hash_map<std::string, BinOp>{
      {"add", BinOp::kAdd},   {"sub", BinOp::kSub},      {"mul", BinOp::kMul},
      {"div", BinOp::kDiv},   {"floordiv", BinOp::kFloorDiv}, {"pow", BinOp::kPow},
      {"maximum", BinOp::kMax}, {"minimum", BinOp::kMin}, {"eq", BinOp::kEq},
      {"ne", BinOp::kNe},     {"lt", BinOp::kLt},        {"le", BinOp::kLe},
      {"gt", BinOp::kGt},     {"ge", BinOp::kGe},        {"logical_and", BinOp::kAnd},
      {"logical_or", BinOp::kOr}};
  auto it = ops->find(op);
  return it == ops->end() ? BinOp::kUnknown : it->second;
}

bool IsCompare(BinOp op) { return op >= BinOp::kEq; }

// out[i] = f(a[i], b[i]) over the broadcast of a and b; contiguous and
// scalar operands take plain loops the compiler vectorises.
template <typename T, typename U, typename F>
void ForEachPair(const T* a, const Strides& sa, const T* b, const Strides& sb,
                 const Shape& out_shape, U* o, F f) {
  const int64_t n = NumElements(out_shape);
  auto all = [](const Strides& st, const Shape& shape) {  // contiguous?
    return st == ContiguousStrides(shape);
  };
  auto zero = [](const Strides& st) {
    return std::all_of(st.begin(), st.end(), [](int64_t v) { return v == 0; });
  };
  if (all(sa, out_shape) && all(sb, out_shape)) {
    for (int64_t i = 0; i < n; ++i) o[i] = f(a[i], b[i]);
  } else if (all(sa, out_shape) && zero(sb)) {
    const T vb = b[0];
    for (int64_t i = 0; i < n; ++i) o[i] = f(a[i], vb);
  } else if (zero(sa) && all(sb, out_shape)) {
    const T va = a[0];
    for (int64_t i = 0; i < n; ++i) o[i] = f(va, b[i]);
  } else {
    std::array<Strides, 2> st = {sa, sb};
    Iterate<2>(out_shape, st, [&](int64_t i, const std::array<int64_t, 2>& off) {
      o[i] = f(a[off[0]], b[off[1]]);
    });
  }
}

// a ** b for integers, as PyTorch: by squaring (b may be large), wrapping
// on overflow (in the unsigned type: no undefined behaviour), and a
// negative exponent gives the truncated 1 / a^|b| (0 unless a is 1 or -1).
template <typename T>
T IntPow(T a, T b) {
  if (b < 0) return a == 1 ? 1 : a == -1 ? (b % 2 == 0 ? 1 : -1) : 0;
  using U = std::make_unsigned_t<T>;
  U r = 1, base = static_cast<U>(a);
  for (U e = static_cast<U>(b); e > 0; e >>= 1) {
    if (e & 1) r = static_cast<U>(r * base);
    if (e > 1) base = static_cast<U>(base * base);
  }
  return static_cast<T>(r);
}

// Python's floor division of floats, as PyTorch computes it: from the
// exact remainder, so 1 // 0.1f is 9 (1 / 0.1f rounds to 10, whose floor
// is 10).
template <typename T>
T FloorDivFloat(T x, T y) {
  if (y == 0) return x / y;
  const T mod = std::fmod(x, y);
  T div = (x - mod) / y;
  if (mod != 0 && (y < 0) != (mod < 0)) div -= 1;
  if (div == 0) return std::copysign(T(0), x / y);
  T floor = std::floor(div);
  if (div - floor > T(0.5)) floor += 1;
  return floor;
}

// A binary op's two operands (a scalar one repeated), broadcast to the
// output's shape.
template <typename T>
struct Pair {
  const T* a;
  Strides sa;
  const T* b;
  Strides sb;
  const Shape& shape;

  template <typename U, typename F>
  void Each(U* o, F f) const {
    ForEachPair(a, sa, b, sb, shape, o, f);
  }
};

// Comparisons and logic ops, into bools.
template <typename T>
void CompareT(BinOp op, const Pair<T>& p, uint8_t* o) {
  switch (op) {
    case BinOp::kEq: p.Each(o, [](T x, T y) -> uint8_t { return x == y; }); break;
    case BinOp::kNe: p.Each(o, [](T x, T y) -> uint8_t { return x != y; }); break;
    case BinOp::kLt: p.Each(o, [](T x, T y) -> uint8_t { return x < y; }); break;
    case BinOp::kLe: p.Each(o, [](T x, T y) -> uint8_t { return x <= y; }); break;
    case BinOp::kGt: p.Each(o, [](T x, T y) -> uint8_t { return x > y; }); break;
    case BinOp::kGe: p.Each(o, [](T x, T y) -> uint8_t { return x >= y; }); break;
    case BinOp::kAnd: p.Each(o, [](T x, T y) -> uint8_t { return x && y; }); break;
    case BinOp::kOr: p.Each(o, [](T x, T y) -> uint8_t { return x || y; }); break;
    default: break;
  }
}

// Floating-point div, floor division and pow; a scalar exponent (not
// reversed) of 2 or 3 as products (GPT-2's gelu), as PyTorch does, and
// 0.5 as a square root.
template <typename T>
void FloatDivisionT(BinOp op, const Pair<T>& p, const Node& node, T* o) {
  const bool plain_scalar = HasScalarOperand(node) && IntAttr(node, "reverse", 0) == 0;
  const double exponent = FloatAttr(node, "scalar", 0);
  if (op == BinOp::kDiv) p.Each(o, [](T x, T y) { return x / y; });
  if (op == BinOp::kFloorDiv) p.Each(o, [](T x, T y) { return FloorDivFloat(x, y); });
  if (op != BinOp::kPow) return;
  if (plain_scalar && exponent == 2.0) {
    p.Each(o, [](T x, T) { return x * x; });
  } else if (plain_scalar && exponent == 3.0) {
    p.Each(o, [](T x, T) { return x * x * x; });
  } else if (plain_scalar && exponent == 0.5) {
    p.Each(o, [](T x, T) { return std::sqrt(x); });
  } else {
    p.Each(o, [](T x, T y) { return std::pow(x, y); });
  }
}

// x / -1 as -x, wrapping (the lowest value stays itself, as numpy and a
// GPU give): the CPU's divide traps on lowest / -1, which took the whole
// stage server down.
template <typename T>
T Negated(T x) {
  return static_cast<T>(T{0} - static_cast<std::make_unsigned_t<T>>(x));
}

// Integer div and floor division (Python's), refusing a zero divisor
// among the nb values of the divisor, and pow.
template <typename T>
absl::Status IntDivisionT(BinOp op, const Pair<T>& p, const Node& node, int64_t nb, T* o) {
  if (op == BinOp::kPow) {
    p.Each(o, [](T x, T y) { return IntPow(x, y); });
    return absl::OkStatus();
  }
  for (int64_t i = 0; i < nb; ++i) {
    if (p.b[i] == 0) return Bad(absl::StrCat("integer division by zero in ", node.op()));
  }
  if (op == BinOp::kDiv) {
    p.Each(o, [](T x, T y) { return y == -1 ? Negated(x) : static_cast<T>(x / y); });
  }
  if (op == BinOp::kFloorDiv) {
    p.Each(o, [](T x, T y) {  // Python floor division
      if (y == -1) return Negated(x);
      T q = static_cast<T>(x / y);
      if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
      return q;
    });
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status BinaryT(const Node& node, const std::vector<const Tensor*>& in, Tensor* out) {
  const BinOp op = BinOpOf(node.op());
  const bool scalar = HasScalarOperand(node);
  const T s = static_cast<T>(FloatAttr(node, "scalar", 0));
  Pair<T> p{in[0]->data_as<T>(), BroadcastStrides(in[0]->shape(), out->shape()),
            scalar ? &s : in[1]->data_as<T>(),
            scalar ? Strides(out->rank(), 0) : BroadcastStrides(in[1]->shape(), out->shape()),
            out->shape()};
  if (scalar && IntAttr(node, "reverse", 0) != 0) std::swap(p.a, p.b), std::swap(p.sa, p.sb);
  if (IsCompare(op)) {
    CompareT(op, p, out->data_as<uint8_t>());
    return absl::OkStatus();
  }
  T* o = out->data_as<T>();
  switch (op) {
    case BinOp::kAdd: p.Each(o, [](T x, T y) { return static_cast<T>(x + y); }); break;
    case BinOp::kSub: p.Each(o, [](T x, T y) { return static_cast<T>(x - y); }); break;
    case BinOp::kMul: p.Each(o, [](T x, T y) { return static_cast<T>(x * y); }); break;
    case BinOp::kMax: p.Each(o, [](T x, T y) { return MaxOf(x, y); }); break;
    case BinOp::kMin: p.Each(o, [](T x, T y) { return MinOf(x, y); }); break;
    case BinOp::kDiv:
    case BinOp::kFloorDiv:
    case BinOp::kPow:
      if constexpr (std::is_floating_point_v<T>) {
        FloatDivisionT(op, p, node, o);
      } else {
        const int64_t nb = p.b == &s ? 1 : (scalar ? in[0]->numel() : in[1]->numel());
        return IntDivisionT(op, p, node, nb, o);
      }
      break;
    default:
      return Bad(absl::StrCat("no ", node.op(), " kernel"));
  }
  return absl::OkStatus();
}

absl::Status Binary(const Node& node, const std::vector<const Tensor*>& in, Tensor* out) {
  switch (in[0]->dtype()) {
    case DT_FLOAT32: return BinaryT<float>(node, in, out);
    case DT_INT64: return BinaryT<int64_t>(node, in, out);
    case DT_INT32: return BinaryT<int32_t>(node, in, out);
    case DT_BOOL: return BinaryT<uint8_t>(node, in, out);
    default: return Bad(absl::StrCat(node.op(), " has no ", TorchName(in[0]->dtype()), " kernel"));
  }
}

// ---- unary ops and the float loops ------------------------------------------

// tanh: Cephes' odd polynomial for |x| < 0.625, 1 - 2 / (exp(2|x|) + 1)
// with the sign restored above; both computed, one kept (vectorises).
inline float FastTanh(float x) {
  const float ax = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745E-3f;
  p = p * z + 2.06390887954E-2f;
  p = p * z - 5.37397155531E-2f;
  p = p * z + 1.33314422036E-1f;
  p = p * z - 3.33332819422E-1f;
  const float small = p * z * x + x;
  const float e = FastExp(2.0f * std::min(ax, 9.0f));
  const float large = std::copysign(1.0f - 2.0f / (e + 1.0f), x);
  return ax < 0.625f ? small : large;
}

float Gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }
float GeluTanh(float x) {
  return 0.5f * x * (1.0f + FastTanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}

enum UnaryKind {
  kURelu, kUGelu, kUGeluTanh, kUSilu, kUTanh, kUSigmoid, kUSqrt, kURsqrt, kUExp, kULog,
  kUCos, kUSin, kUNeg, kUAbs, kUNone,
};

UnaryKind UnaryOf(const Node& node) {
  static const auto* ops = new absl::flat_hash_map<std::string, UnaryKind>{
      {"relu", kURelu}, {"gelu", kUGelu}, {"silu", kUSilu}, {"tanh", kUTanh},
      {"sigmoid", kUSigmoid}, {"sqrt", kUSqrt}, {"rsqrt", kURsqrt}, {"exp", kUExp},
      {"log", kULog}, {"cos", kUCos}, {"sin", kUSin}, {"neg", kUNeg}, {"abs", kUAbs}};
  auto it = ops->find(node.op());
  if (it == ops->end()) return kUNone;
  if (it->second == kUGelu) {
    const std::string approx = StringAttr(node, "approximate");
    if (approx == "tanh") return kUGeluTanh;
    if (!approx.empty() && approx != "none") return kUNone;
  }
  return it->second;
}

constexpr int64_t kBlock = 256;

PIPESERVE_VECTOR_CLONES
void ApplyUnary(int kind, const float* x, float* o, int64_t n) {
  switch (kind) {
#define PIPESERVE_UNARY(K, EXPR) \
  case K:                        \
    for (int64_t i = 0; i < n; ++i) { const float v = x[i]; o[i] = (EXPR); } \
    break;
    PIPESERVE_UNARY(kURelu, v > 0 || std::isnan(v) ? v : 0.0f)
    PIPESERVE_UNARY(kUGelu, Gelu(v))
    PIPESERVE_UNARY(kUGeluTanh, GeluTanh(v))
    PIPESERVE_UNARY(kUSilu, v / (1.0f + FastExp(-v)))
    PIPESERVE_UNARY(kUTanh, FastTanh(v))
    PIPESERVE_UNARY(kUSigmoid, 1.0f / (1.0f + FastExp(-v)))
    PIPESERVE_UNARY(kUSqrt, std::sqrt(v))
    PIPESERVE_UNARY(kURsqrt, 1.0f / std::sqrt(v))
    PIPESERVE_UNARY(kUExp, FastExp(v))
    PIPESERVE_UNARY(kULog, std::log(v))
    PIPESERVE_UNARY(kUCos, std::cos(v))
    PIPESERVE_UNARY(kUSin, std::sin(v))
    PIPESERVE_UNARY(kUNeg, -v)
    PIPESERVE_UNARY(kUAbs, std::fabs(v))
#undef PIPESERVE_UNARY
    default: break;
  }
}

template <typename F>
void BinaryLoop(const float* x, const float* y, float* o, int64_t n, F f) {
  for (int64_t i = 0; i < n; ++i) o[i] = f(x[i], y[i]);
}

PIPESERVE_VECTOR_CLONES
void ApplyBinary(int kind, const float* x, const float* y, float* o, int64_t n) {
  switch (static_cast<BinOp>(kind)) {
    case BinOp::kAdd: BinaryLoop(x, y, o, n, [](float a, float b) { return a + b; }); break;
    case BinOp::kSub: BinaryLoop(x, y, o, n, [](float a, float b) { return a - b; }); break;
    case BinOp::kMul: BinaryLoop(x, y, o, n, [](float a, float b) { return a * b; }); break;
    case BinOp::kDiv: BinaryLoop(x, y, o, n, [](float a, float b) { return a / b; }); break;
    case BinOp::kMax: BinaryLoop(x, y, o, n, [](float a, float b) { return MaxOf(a, b); }); break;
    case BinOp::kMin: BinaryLoop(x, y, o, n, [](float a, float b) { return MinOf(a, b); }); break;
    case BinOp::kPow: BinaryLoop(x, y, o, n, [](float a, float b) { return std::pow(a, b); }); break;
    default: break;
  }
}

// Calls run(f) with the float function of a unary op.
template <typename Run>
absl::Status WithUnary(const Node& node, Run run) {
  const std::string& op = node.op();
  if (op == "gelu") {
    std::string approx = StringAttr(node, "approximate");
    if (approx == "tanh") return run(GeluTanh);
    if (!approx.empty() && approx != "none") {
      return Bad(absl::StrCat("gelu approximate=\"", approx, "\" is unknown (none, tanh)"));
    }
    return run(Gelu);
  }
  if (op == "silu") return run([](float v) { return v / (1.0f + FastExp(-v)); });
  if (op == "tanh") return run([](float v) { return FastTanh(v); });
  if (op == "sigmoid") return run([](float v) { return 1.0f / (1.0f + FastExp(-v)); });
  if (op == "sqrt") return run([](float v) { return std::sqrt(v); });
  if (op == "rsqrt") return run([](float v) { return 1.0f / std::sqrt(v); });
  if (op == "exp") return run([](float v) { return FastExp(v); });
  if (op == "log") return run([](float v) { return std::log(v); });
  if (op == "cos") return run([](float v) { return std::cos(v); });
  if (op == "sin") return run([](float v) { return std::sin(v); });
  if (op == "neg") return run([](float v) { return -v; });
  if (op == "abs") return run([](float v) { return std::fabs(v); });
  if (op == "relu") return run([](float v) { return v > 0 || std::isnan(v) ? v : 0.0f; });
  return Bad(absl::StrCat("no float kernel for ", op));
}

absl::Status UnaryFloat(const Node& node, const Tensor& x, Tensor* out) {
  const UnaryKind kind = UnaryOf(node);
  if (kind != kUNone) {
    ApplyUnary(kind, x.data(), out->data(), x.numel());
    return absl::OkStatus();
  }
  return WithUnary(node, [&](auto) { return absl::OkStatus(); });  // names the problem
}

// bfloat16 in and out, float32 math in blocks held in L1.
absl::Status UnaryBf16(const Node& node, const Tensor& x, Tensor* out) {
  const UnaryKind kind = UnaryOf(node);
  if (kind == kUNone) return WithUnary(node, [&](auto) { return absl::OkStatus(); });
  const uint16_t* a = x.data_as<uint16_t>();
  uint16_t* o = out->data_as<uint16_t>();
  const int64_t n = x.numel();
  float v[kBlock], r[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t m = std::min(kBlock, n - i0);
    WidenBf16(a + i0, m, v);
    ApplyUnary(kind, v, r, m);
    NarrowToBf16(r, m, o + i0);
  }
  return absl::OkStatus();
}

// x16 <op> y16 over whole operands of n values, or with `scalar`,
// x16 <op> sf (sf <op> x16 when also `reverse`): float blocks held in L1.
void BinaryBf16Blocks(BinOp op, const uint16_t* x16, const uint16_t* y16, bool scalar,
                      bool reverse, float sf, int64_t n, uint16_t* o) {
  float x[kBlock], y[kBlock], r[kBlock];
  if (scalar) std::fill(y, y + kBlock, sf);
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t m = std::min(kBlock, n - i0);
    WidenBf16(x16 + i0, m, x);
    if (!scalar) WidenBf16(y16 + i0, m, y);
    if (scalar && reverse) {
      ApplyBinary(static_cast<int>(op), y, x, r, m);
    } else {
      ApplyBinary(static_cast<int>(op), x, y, r, m);
    }
    NarrowToBf16(r, m, o + i0);
  }
}

absl::Status BinaryBf16(const Node& node, const std::vector<const Tensor*>& in, Tensor* out) {
  const BinOp op = BinOpOf(node.op());
  const uint16_t* a = in[0]->data_as<uint16_t>();
  const bool scalar = HasScalarOperand(node);
  const double scalar_value = FloatAttr(node, "scalar", 0);
  const uint16_t s = FloatToBf16(static_cast<float>(scalar_value));
  const bool reverse = IntAttr(node, "reverse", 0) != 0;
  const uint16_t* b = scalar ? &s : in[1]->data_as<uint16_t>();
  Strides sa = BroadcastStrides(in[0]->shape(), out->shape());
  Strides sb = scalar ? Strides(out->rank(), 0) : BroadcastStrides(in[1]->shape(), out->shape());
  if (scalar && reverse) std::swap(a, b), std::swap(sa, sb);
  uint16_t* o = out->data_as<uint16_t>();
  // PyTorch computes a bf16 tensor with a Python scalar in float32, using the
  // scalar unrounded.
  const float sf = static_cast<float>(scalar_value);
  if (op != BinOp::kPow && in[0]->shape() == out->shape() &&
      (scalar || in[1]->shape() == out->shape())) {
    // Both operands whole (or one a number): float blocks held in L1.
    BinaryBf16Blocks(op, in[0]->data_as<uint16_t>(),
                     scalar ? nullptr : in[1]->data_as<uint16_t>(), scalar, reverse, sf,
                     out->numel(), o);
    return absl::OkStatus();
  }
  auto run = [&](auto f) {
    if (scalar) {
      ForEachPair(a, sa, b, sb, out->shape(), o, [&](uint16_t x, uint16_t y) {
        float fx = reverse ? sf : Bf16ToFloat(x), fy = reverse ? Bf16ToFloat(y) : sf;
        return FloatToBf16(f(fx, fy));
      });
    } else {
      ForEachPair(a, sa, b, sb, out->shape(), o, [&](uint16_t x, uint16_t y) {
        return FloatToBf16(f(Bf16ToFloat(x), Bf16ToFloat(y)));
      });
    }
  };
  switch (op) {
    case BinOp::kAdd: run([](float x, float y) { return x + y; }); break;
    case BinOp::kSub: run([](float x, float y) { return x - y; }); break;
    case BinOp::kMul: run([](float x, float y) { return x * y; }); break;
    case BinOp::kDiv: run([](float x, float y) { return x / y; }); break;
    case BinOp::kMax: run([](float x, float y) { return MaxOf(x, y); }); break;
    case BinOp::kMin: run([](float x, float y) { return MinOf(x, y); }); break;
    case BinOp::kPow:
      if (scalar && !reverse && scalar_value == 2.0) {
        run([](float x, float) { return x * x; });
      } else if (scalar && !reverse && scalar_value == 3.0) {
        run([](float x, float) { return x * x * x; });
      } else {
        run([](float x, float y) { return std::pow(x, y); });
      }
      break;
    default:
      return Bad(absl::StrCat("no bfloat16 kernel for ", node.op()));
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status UnaryInt(const Node& node, const Tensor& x, Tensor* out) {
  const T* a = x.data_as<T>();
  const std::string& op = node.op();
  const int64_t n = x.numel();
  if (op == "logical_not") {
    uint8_t* o = out->data_as<uint8_t>();
    for (int64_t i = 0; i < n; ++i) o[i] = a[i] == 0;
    return absl::OkStatus();
  }
  T* o = out->data_as<T>();
  if (op == "neg") for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(-a[i]);
  else if (op == "abs") for (int64_t i = 0; i < n; ++i) o[i] = a[i] < 0 ? static_cast<T>(-a[i]) : a[i];
  else if (op == "relu") for (int64_t i = 0; i < n; ++i) o[i] = a[i] > 0 ? a[i] : 0;
  else return Bad(absl::StrCat("no ", TorchName(x.dtype()), " kernel for ", op));
  return absl::OkStatus();
}

absl::Status Unary(const Node& node, const Tensor& x, Tensor* out) {
  if (node.op() == "logical_not" && x.dtype() == DT_FLOAT32) {
    for (int64_t i = 0; i < x.numel(); ++i) out->data_as<uint8_t>()[i] = x.data()[i] == 0;
    return absl::OkStatus();
  }
  switch (x.dtype()) {
    case DT_FLOAT32: return UnaryFloat(node, x, out);
    case DT_INT64: return UnaryInt<int64_t>(node, x, out);
    case DT_INT32: return UnaryInt<int32_t>(node, x, out);
    case DT_BOOL: return UnaryInt<uint8_t>(node, x, out);
    default: return Bad(absl::StrCat(node.op(), " has no ", TorchName(x.dtype()), " kernel"));
  }
}

// ---- the kernels ------------------------------------------------------------

absl::Status WhereKernel(const Node&, const Args& in, Tensor* out) {
  const Shape& shape = out->shape();
  std::array<Strides, 3> st = {BroadcastStrides(in[0]->shape(), shape),
                               BroadcastStrides(in[1]->shape(), shape),
                               BroadcastStrides(in[2]->shape(), shape)};
  const uint8_t* c = in[0]->data_as<uint8_t>();
  const char* a = static_cast<const char*>(in[1]->raw_data());
  const char* b = static_cast<const char*>(in[2]->raw_data());
  char* o = static_cast<char*>(out->raw_data());
  const int e = out->element_size();
  Iterate<3>(shape, st, [&](int64_t i, const std::array<int64_t, 3>& f) {
    std::memcpy(o + i * e, c[f[0]] ? a + f[1] * e : b + f[2] * e, e);
  });
  return absl::OkStatus();
}

absl::Status UnaryKernel(const Node& node, const Args& in, Tensor* out) {
  return Unary(node, *in[0], out);
}

absl::Status UnaryBf16Kernel(const Node& node, const Args& in, Tensor* out) {
  return UnaryBf16(node, *in[0], out);
}

// bfloat16 values stay bfloat16 (computed in float32 blocks) for binary
// ops of two operands, or of one and a number, and for unary ops.
bool TakesBf16Binary(const Node& node, const Args& in, DataType out_type) {
  return AllOfType(DT_BFLOAT16, in, out_type) && in.size() == (HasScalarOperand(node) ? 1u : 2u);
}

bool TakesBf16Unary(const Node& node, const Args& in, DataType out_type) {
  return AllOfType(DT_BFLOAT16, in, out_type) && in.size() == 1 && !HasScalarOperand(node);
}

// ---- fused groups -----------------------------------------------------------

// How an external input maps onto the output's flat index: all of it, its
// trailing dims repeated ([D] or [T, D] against [B, H, T, D]), one value
// per row ([..., 1]), or one value.
enum class Broadcast { kFull, kRows, kPerRow, kScalar };

// How each external maps onto out_shape; kUnimplemented for a dtype other
// than `type` or another broadcast.
absl::StatusOr<std::vector<Broadcast>> BroadcastsOf(const std::vector<const Tensor*>& externals,
                                                    const Shape& out_shape, DataType type) {
  std::vector<Broadcast> how(externals.size());
  for (size_t k = 0; k < externals.size(); ++k) {
    const Tensor& t = *externals[k];
    if (t.dtype() != type) return absl::UnimplementedError("mixed dtypes");
    const Shape& s = t.shape();
    if (s == out_shape) {
      how[k] = Broadcast::kFull;
    } else if (t.numel() == 1) {
      how[k] = Broadcast::kScalar;
    } else if (IsTrailingBlock(s, out_shape)) {
      how[k] = Broadcast::kRows;  // repeats every t.numel() elements
    } else if (s.size() == out_shape.size() && !s.empty() && s.back() == 1 &&
               Shape(s.begin(), s.end() - 1) == Shape(out_shape.begin(), out_shape.end() - 1)) {
      how[k] = Broadcast::kPerRow;
    } else {
      return absl::UnimplementedError("unsupported broadcast");
    }
  }
  return how;
}

// Elements [i0, i0 + m) of the output's flat index read from external `t`
// (float32, or bfloat16 when `bf16`, widened) into dst; `last` is the
// output's last dim.
void LoadBlock(const Tensor& t, Broadcast how, bool bf16, int64_t last, int64_t i0, int64_t m,
               float* dst) {
  // Copies (widening bfloat16) c elements of t from p.
  auto copy = [&](int64_t p, int64_t c, float* to) {
    if (bf16) {
      WidenBf16(t.data_as<uint16_t>() + p, c, to);
    } else {
      std::memcpy(to, t.data() + p, c * sizeof(float));
    }
  };
  auto read = [&](int64_t i) {
    return bf16 ? Bf16ToFloat(t.data_as<uint16_t>()[i]) : t.data()[i];
  };
  switch (how) {
    case Broadcast::kFull:
      copy(i0, m, dst);
      break;
    case Broadcast::kRows: {  // the block in runs of t's elements
      const int64_t period = t.numel();
      for (int64_t done = 0, p = i0 % period; done < m; p = 0) {
        const int64_t c = std::min(m - done, period - p);
        copy(p, c, dst + done);
        done += c;
      }
      break;
    }
    case Broadcast::kPerRow:  // one value per output row
      for (int64_t done = 0; done < m;) {
        const int64_t row = (i0 + done) / last;
        const int64_t c = std::min(m - done, (row + 1) * last - (i0 + done));
        std::fill(dst + done, dst + done + c, read(row));
        done += c;
      }
      break;
    case Broadcast::kScalar:
      std::fill(dst, dst + m, read(0));
      break;
  }
}

}  // namespace

namespace cpu_ops {

void RegisterElementwiseKernels(KernelTable* table) {
  table->kernels["where"] = WhereKernel;
  table->kernels["logical_not"] = UnaryKernel;
  for (const char* op : {"relu", "gelu", "silu", "tanh", "sigmoid", "sqrt", "rsqrt", "exp",
                         "log", "cos", "sin", "neg", "abs"}) {
    table->kernels[op] = UnaryKernel;
    table->half[op] = {TakesBf16Unary, UnaryBf16Kernel};
  }
  for (const char* op : {"add", "sub", "mul", "div", "floordiv", "pow", "maximum", "minimum",
                         "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or"}) {
    table->kernels[op] = Binary;
  }
  // Compares and floordiv of bfloat16 values run in float32.
  for (const char* op : {"add", "sub", "mul", "div", "pow", "maximum", "minimum"}) {
    table->half[op] = {TakesBf16Binary, BinaryBf16};
  }
}

}  // namespace cpu_ops

bool ElementwiseGroup::Fusable(const Node& node) {
  if (UnaryOf(node) != kUNone) return true;
  BinOp op = BinOpOf(node.op());
  return op == BinOp::kAdd || op == BinOp::kSub || op == BinOp::kMul || op == BinOp::kDiv ||
         op == BinOp::kMax || op == BinOp::kMin || op == BinOp::kPow;
}

ElementwiseGroup::ElementwiseGroup(std::vector<Op> ops, int externals)
    : ops_(std::move(ops)), externals_(externals) {
  for (const Op& op : ops_) {
    Code c{};
    c.a = op.a;
    c.b = op.b;
    UnaryKind u = UnaryOf(*op.node);
    if (u != kUNone) {
      c.kind = u;
    } else {
      c.binary = true;
      c.kind = static_cast<int>(BinOpOf(op.node->op()));
      c.scalar = HasScalarOperand(*op.node);
      c.reverse = IntAttr(*op.node, "reverse", 0) != 0;
      c.number = static_cast<float>(FloatAttr(*op.node, "scalar", 0));
    }
    codes_.push_back(c);
  }
}

absl::StatusOr<Tensor> ElementwiseGroup::Run(const std::vector<const Tensor*>& externals,
                                             const Shape& out_shape, DataType type,
                                             const Tensor& scratch) const {
  const int64_t n = NumElements(out_shape);
  const int64_t last = out_shape.empty() ? 1 : out_shape.back();
  ASSIGN_OR_RETURN(std::vector<Broadcast> how, BroadcastsOf(externals, out_shape, type));
  ASSIGN_OR_RETURN(Tensor out, Output(out_shape, type, scratch));
  const bool bf16 = type == DT_BFLOAT16;
  std::vector<float> regs((codes_.size() + externals.size()) * kBlock);
  auto ext = [&](size_t k) { return regs.data() + (codes_.size() + k) * kBlock; };
  std::vector<float> number(kBlock);
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t m = std::min(kBlock, n - i0);
    for (size_t k = 0; k < externals.size(); ++k) {
      LoadBlock(*externals[k], how[k], bf16, last, i0, m, ext(k));
    }
    for (size_t j = 0; j < codes_.size(); ++j) {
      const Code& c = codes_[j];
      float* r = regs.data() + j * kBlock;
      const float* x = c.a >= 0 ? regs.data() + c.a * kBlock : ext(-1 - c.a);
      if (!c.binary) {
        ApplyUnary(c.kind, x, r, m);
      } else if (c.scalar) {
        std::fill(number.begin(), number.begin() + m, c.number);
        if (c.kind == static_cast<int>(BinOp::kPow) && !c.reverse &&
            (c.number == 2.0f || c.number == 3.0f)) {
          if (c.number == 2.0f) BinaryLoop(x, x, r, m, [](float a, float b) { return a * b; });
          else for (int64_t t2 = 0; t2 < m; ++t2) r[t2] = x[t2] * x[t2] * x[t2];
        } else if (c.reverse) {
          ApplyBinary(c.kind, number.data(), x, r, m);
        } else {
          ApplyBinary(c.kind, x, number.data(), r, m);
        }
      } else {
        const float* y = c.b >= 0 ? regs.data() + c.b * kBlock : ext(-1 - c.b);
        ApplyBinary(c.kind, x, y, r, m);
      }
    }
    const float* result = regs.data() + (codes_.size() - 1) * kBlock;
    if (bf16) {
      NarrowToBf16(result, m, out.data_as<uint16_t>() + i0);
    } else {
      std::memcpy(out.data() + i0, result, m * sizeof(float));
    }
  }
  return out;
}

}  // namespace pipeserve
