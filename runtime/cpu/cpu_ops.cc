#include "runtime/cpu/cpu_ops.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/sampler.h"
#include "graph/dtype.h"

namespace pipeserve {
namespace {

using Strides = std::vector<int64_t>;

Strides ContiguousStrides(const Shape& s) {
  Strides st(s.size(), 1);
  for (int i = static_cast<int>(s.size()) - 2; i >= 0; --i) st[i] = st[i + 1] * s[i + 1];
  return st;
}

// Strides of `in` read at the indices of `out` (numpy broadcasting: 0 for
// dims `in` lacks or has as 1).
Strides BroadcastStrides(const Shape& in, const Shape& out) {
  Strides st(out.size(), 0);
  Strides own = ContiguousStrides(in);
  size_t lead = out.size() - in.size();
  for (size_t i = 0; i < in.size(); ++i) {
    st[lead + i] = in[i] == 1 ? 0 : own[i];
  }
  return st;
}

// Calls f(out_index, offsets) for every element of `out` in row-major
// order; offsets[k] = sum over dims of index * st[k][dim].
template <size_t N, typename F>
void Iterate(const Shape& out, const std::array<Strides, N>& st, F f) {
  const int r = static_cast<int>(out.size());
  const int64_t total = NumElements(out);
  if (total == 0) return;
  std::array<int64_t, N> off{};
  if (r == 0) {
    f(0, off);
    return;
  }
  std::vector<int64_t> idx(r, 0);
  const int64_t inner = out[r - 1];
  for (int64_t o = 0; o < total; o += inner) {
    std::array<int64_t, N> cur = off;
    for (int64_t i = 0; i < inner; ++i) {
      f(o + i, cur);
      for (size_t k = 0; k < N; ++k) cur[k] += st[k][r - 1];
    }
    for (int d = r - 2; d >= 0; --d) {
      ++idx[d];
      for (size_t k = 0; k < N; ++k) off[k] += st[k][d];
      if (idx[d] < out[d]) break;
      for (size_t k = 0; k < N; ++k) off[k] -= st[k][d] * out[d];
      idx[d] = 0;
    }
  }
}

// Copies elements of `elem` bytes: out[o] = in[base + off].
void GatherCopy(const Tensor& in, int64_t base, const Strides& st, Tensor* out) {
  const char* src = static_cast<const char*>(in.raw_data());
  char* dst = static_cast<char*>(out->raw_data());
  const int e = in.element_size();
  const Shape& shape = out->shape();
  if (!shape.empty() && st.back() == 1 && shape.back() > 1) {
    // Rows contiguous in the input: one memcpy per row.
    const int64_t inner = shape.back();
    Shape rows(shape.begin(), shape.end() - 1);
    std::array<Strides, 1> rs = {Strides(st.begin(), st.end() - 1)};
    Iterate<1>(rows, rs, [&](int64_t o, const std::array<int64_t, 1>& f) {
      std::memcpy(dst + o * inner * e, src + (base + f[0]) * e, inner * e);
    });
    return;
  }
  std::array<Strides, 1> s = {st};
  switch (e) {
#define PIPESERVE_GATHER(BYTES, T)                                                \
  case BYTES:                                                                     \
    Iterate<1>(out->shape(), s, [&](int64_t o, const std::array<int64_t, 1>& f) { \
      reinterpret_cast<T*>(dst)[o] = reinterpret_cast<const T*>(src)[base + f[0]]; \
    });                                                                           \
    break;
    PIPESERVE_GATHER(1, uint8_t)
    PIPESERVE_GATHER(2, uint16_t)
    PIPESERVE_GATHER(4, uint32_t)
    PIPESERVE_GATHER(8, uint64_t)
#undef PIPESERVE_GATHER
  }
}

// A buffer for an op's output: `scratch` when the caller holds its only
// reference and it is large enough, else a new one. Shapes can come from a
// model's attributes (full, arange, expand): kInvalidArgument or
// kResourceExhausted, not a crash, when one is too large.
absl::StatusOr<Tensor> Output(const Shape& shape, DataType type, const Tensor& scratch) {
  absl::StatusOr<uint64_t> bytes = CheckedByteSize(shape, ElementSize(type));
  if (!bytes.ok()) return bytes.status();
  if (scratch.SoleOwner() && static_cast<uint64_t>(scratch.capacity_bytes()) >= *bytes) {
    return scratch.Retyped(type, shape);
  }
  return Tensor::TryEmpty(shape, type);
}

absl::Status Bad(absl::string_view what) { return absl::InvalidArgumentError(what); }

// ---- elementwise ----------------------------------------------------------

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

// maximum and minimum as PyTorch: a NaN on either side is the result
// (x > y ? x : y would drop a NaN in x).
template <typename T>
T MaxOf(T x, T y) {
  return (x > y || x != x) ? x : y;
}
template <typename T>
T MinOf(T x, T y) {
  return (x < y || x != x) ? x : y;
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

template <typename T>
absl::Status BinaryT(const Node& node, const std::vector<const Tensor*>& in, Tensor* out) {
  const BinOp op = BinOpOf(node.op());
  const T* a = in[0]->data_as<T>();
  const bool scalar = HasScalarOperand(node);
  const double scalar_value = FloatAttr(node, "scalar", 0);
  const T s = static_cast<T>(scalar_value);
  const bool reverse = IntAttr(node, "reverse", 0) != 0;
  const T* b = scalar ? &s : in[1]->data_as<T>();
  Strides sa = BroadcastStrides(in[0]->shape(), out->shape());
  Strides sb = scalar ? Strides(out->rank(), 0) : BroadcastStrides(in[1]->shape(), out->shape());
  if (scalar && reverse) std::swap(a, b), std::swap(sa, sb);
  const Shape& shape = out->shape();
  if (IsCompare(op)) {
    uint8_t* o = out->data_as<uint8_t>();
    auto cmp = [&](auto f) { ForEachPair(a, sa, b, sb, shape, o, f); };
    switch (op) {
      case BinOp::kEq: cmp([](T x, T y) -> uint8_t { return x == y; }); break;
      case BinOp::kNe: cmp([](T x, T y) -> uint8_t { return x != y; }); break;
      case BinOp::kLt: cmp([](T x, T y) -> uint8_t { return x < y; }); break;
      case BinOp::kLe: cmp([](T x, T y) -> uint8_t { return x <= y; }); break;
      case BinOp::kGt: cmp([](T x, T y) -> uint8_t { return x > y; }); break;
      case BinOp::kGe: cmp([](T x, T y) -> uint8_t { return x >= y; }); break;
      case BinOp::kAnd: cmp([](T x, T y) -> uint8_t { return x && y; }); break;
      case BinOp::kOr: cmp([](T x, T y) -> uint8_t { return x || y; }); break;
      default: break;
    }
    return absl::OkStatus();
  }
  T* o = out->data_as<T>();
  auto run = [&](auto f) { ForEachPair(a, sa, b, sb, shape, o, f); };
  switch (op) {
    case BinOp::kAdd: run([](T x, T y) { return static_cast<T>(x + y); }); break;
    case BinOp::kSub: run([](T x, T y) { return static_cast<T>(x - y); }); break;
    case BinOp::kMul: run([](T x, T y) { return static_cast<T>(x * y); }); break;
    case BinOp::kMax: run([](T x, T y) { return MaxOf(x, y); }); break;
    case BinOp::kMin: run([](T x, T y) { return MinOf(x, y); }); break;
    case BinOp::kDiv:
    case BinOp::kFloorDiv:
    case BinOp::kPow:
      if constexpr (std::is_floating_point_v<T>) {
        if (op == BinOp::kDiv) run([](T x, T y) { return x / y; });
        if (op == BinOp::kFloorDiv) run([](T x, T y) { return FloorDivFloat(x, y); });
        if (op == BinOp::kPow) {
          // x ** 2 and x ** 3 (GPT-2's gelu) as products, as PyTorch does.
          if (scalar && !reverse && scalar_value == 2.0) {
            run([](T x, T) { return x * x; });
          } else if (scalar && !reverse && scalar_value == 3.0) {
            run([](T x, T) { return x * x * x; });
          } else if (scalar && !reverse && scalar_value == 0.5) {
            run([](T x, T) { return std::sqrt(x); });
          } else {
            run([](T x, T y) { return std::pow(x, y); });
          }
        }
      } else {
        if (op == BinOp::kPow) {
          run([](T x, T y) { return IntPow(x, y); });
          break;
        }
        const int64_t nb = b == &s ? 1 : (scalar ? in[0]->numel() : in[1]->numel());
        for (int64_t i = 0; i < nb; ++i) {
          if (b[i] == 0) return Bad(absl::StrCat("integer division by zero in ", node.op()));
        }
        if (op == BinOp::kDiv) run([](T x, T y) { return static_cast<T>(x / y); });
        if (op == BinOp::kFloorDiv) {
          run([](T x, T y) {  // Python floor division
            T q = static_cast<T>(x / y);
            if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
            return q;
          });
        }
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

// exp(x) for float: Cephes' expf (range reduction by ln 2, a degree-6
// polynomial, the exponent built in the bits), written so loops over it
// vectorise; within 2 ulp of std::exp on [-87, 88]; -inf and large
// negatives give 0, large positives +inf; NaN stays NaN.
inline float FastExp(float x) {
  // NaN becomes 0 here (no float->int cast of a NaN) and is restored below.
  const float clamped = x != x ? 0.0f : std::min(std::max(x, -87.33654f), 88.72283f);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  float y = p * scale;
  y = x < -87.33654f ? 0.0f : y;
  y = x > 88.72283f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

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

// How an external input maps onto the output's flat index: all of it, its
// trailing dims repeated ([D] or [T, D] against [B, H, T, D]), one value
// per row ([..., 1]), or one value.
enum class Broadcast { kFull, kRows, kPerRow, kScalar };

// `s`, without leading 1s, equals the trailing dims of `out`.
bool IsTrailingBlock(const Shape& s, const Shape& out) {
  size_t first = 0;
  while (first < s.size() && s[first] == 1) ++first;
  const size_t n = s.size() - first;
  if (n == 0 || n > out.size()) return false;
  return std::equal(s.begin() + first, s.end(), out.end() - n);
}

// ---- vector loops -----------------------------------------------------------
// Built for the baseline x86-64 and again for AVX2 and AVX-512
// (PIPESERVE_VECTOR_CLONES); what they call is inline. Sums use 16 float
// lanes so they vectorise without reassociating flags.

PIPESERVE_VECTOR_CLONES
void WidenBf16(const uint16_t* a, int64_t n, float* o) {
  for (int64_t i = 0; i < n; ++i) o[i] = Bf16ToFloat(a[i]);
}

PIPESERVE_VECTOR_CLONES
void NarrowToBf16(const float* a, int64_t n, uint16_t* o) {
  for (int64_t i = 0; i < n; ++i) o[i] = FloatToBf16(a[i]);
}

}  // namespace

void Widen16(DataType type, const uint16_t* a, int64_t n, float* o) {
  if (type == DT_BFLOAT16) {
    WidenBf16(a, n, o);
    return;
  }
  for (int64_t i = 0; i < n; ++i) o[i] = HalfToFloat(a[i]);
}

void Narrow16(DataType type, const float* a, int64_t n, uint16_t* o) {
  if (type == DT_BFLOAT16) {
    NarrowToBf16(a, n, o);
    return;
  }
  for (int64_t i = 0; i < n; ++i) o[i] = FloatToHalf(a[i]);
}

namespace {

constexpr int kLanes = 16;

inline float LaneSum(const float* x, int64_t n) {
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += x[i + j];
  }
  float s = 0;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  for (; i < n; ++i) s += x[i];
  return s;
}

}  // namespace

PIPESERVE_VECTOR_CLONES
void SoftmaxRow(float* row, int64_t n) {
  float lane[kLanes];
  std::fill(lane, lane + kLanes, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] = row[i + j] > lane[j] ? row[i + j] : lane[j];
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < kLanes; ++j) mx = lane[j] > mx ? lane[j] : mx;
  for (; i < n; ++i) mx = row[i] > mx ? row[i] : mx;
  if (std::isinf(mx) && mx < 0) mx = 0;
  for (int64_t k = 0; k < n; ++k) row[k] = FastExp(row[k] - mx);
  const float inv = 1.0f / LaneSum(row, n);
  for (int64_t k = 0; k < n; ++k) row[k] *= inv;
}

namespace {

// One row of attention scores: row *= scale, then entries whose mask is
// true set to `fill`, then `add` added (each mask read with its step).
PIPESERVE_VECTOR_CLONES
void ScaleMaskRow(float* row, int64_t n, float scale, const uint8_t* cond, int64_t cond_step,
                  float fill, const float* add, int64_t add_step) {
  for (int64_t j = 0; j < n; ++j) row[j] *= scale;
  if (cond != nullptr) {
    if (cond_step == 1) {
      for (int64_t j = 0; j < n; ++j) row[j] = cond[j] ? fill : row[j];
    } else {
      for (int64_t j = 0; j < n; ++j) row[j] = cond[j * cond_step] ? fill : row[j];
    }
  }
  if (add != nullptr) {
    if (add_step == 1) {
      for (int64_t j = 0; j < n; ++j) row[j] += add[j];
    } else {
      for (int64_t j = 0; j < n; ++j) row[j] += add[j * add_step];
    }
  }
}

// o = (x - mean) / sqrt(var + eps) * w + b over one row of n (layer_norm),
// or with `rms` o = x / sqrt(mean(x^2) + eps) * w (RMSNorm); w and b may be
// null. With `add`, x + add is normalised instead and written to `sum`
// (rounded to `type` first, as an add of that type would round it).
PIPESERVE_VECTOR_CLONES
void LayerNormRow(const float* x, const float* add, DataType type, bool rms, int64_t n,
                  const float* w, const float* b, float eps, float* sum, float* o) {
  if (add != nullptr) {
    if (type == DT_BFLOAT16) {
      for (int64_t i = 0; i < n; ++i) sum[i] = Bf16ToFloat(FloatToBf16(x[i] + add[i]));
    } else if (type == DT_FLOAT16) {
      for (int64_t i = 0; i < n; ++i) sum[i] = HalfToFloat(FloatToHalf(x[i] + add[i]));
    } else {
      for (int64_t i = 0; i < n; ++i) sum[i] = x[i] + add[i];
    }
    x = sum;
  }
  if (rms) {
    float lane[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) lane[j] += x[i + j] * x[i + j];
    }
    float ss = 0;
    for (int j = 0; j < kLanes; ++j) ss += lane[j];
    for (; i < n; ++i) ss += x[i] * x[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    if (w != nullptr) {
      for (int64_t k = 0; k < n; ++k) o[k] = x[k] * inv * w[k];
    } else {
      for (int64_t k = 0; k < n; ++k) o[k] = x[k] * inv;
    }
    return;
  }
  const float mean = LaneSum(x, n) / static_cast<float>(n);
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float d = x[i + j] - mean;
      lane[j] += d * d;
    }
  }
  float var = 0;
  for (int j = 0; j < kLanes; ++j) var += lane[j];
  for (; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= static_cast<float>(n);
  const float inv = 1.0f / std::sqrt(var + eps);
  if (w != nullptr && b != nullptr) {
    for (int64_t k = 0; k < n; ++k) o[k] = (x[k] - mean) * inv * w[k] + b[k];
  } else if (w != nullptr) {
    for (int64_t k = 0; k < n; ++k) o[k] = (x[k] - mean) * inv * w[k];
  } else if (b != nullptr) {
    for (int64_t k = 0; k < n; ++k) o[k] = (x[k] - mean) * inv + b[k];
  } else {
    for (int64_t k = 0; k < n; ++k) o[k] = (x[k] - mean) * inv;
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
    const uint16_t* x16 = in[0]->data_as<uint16_t>();
    const uint16_t* y16 = scalar ? nullptr : in[1]->data_as<uint16_t>();
    const int64_t n = out->numel();
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

// ---- normalisation and reductions ----------------------------------------

void Softmax(const Tensor& x, int dim, bool log, Tensor* out) {
  const Shape& s = x.shape();
  int64_t n = s.empty() ? 1 : s[dim];
  int64_t inner = 1, outer = 1;
  for (size_t i = dim + 1; i < s.size(); ++i) inner *= s[i];
  for (int i = 0; i < dim; ++i) outer *= s[i];
  const float* a = x.data();
  float* o = out->data();
  for (int64_t p = 0; p < outer; ++p) {
    for (int64_t q = 0; q < inner; ++q) {
      const float* row = a + p * n * inner + q;
      float* orow = o + p * n * inner + q;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n; ++i) m = std::max(m, row[i * inner]);
      if (std::isinf(m) && m < 0) m = 0;  // a fully masked row: exp(-inf) = 0
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        float e = std::exp(row[i * inner] - m);
        if (!log) orow[i * inner] = e;
        sum += e;
      }
      if (log) {
        float ls = static_cast<float>(std::log(sum));
        for (int64_t i = 0; i < n; ++i) orow[i * inner] = row[i * inner] - m - ls;
      } else {
        float inv = static_cast<float>(1.0 / sum);
        for (int64_t i = 0; i < n; ++i) orow[i * inner] *= inv;
      }
    }
  }
}

// layer_norm over rows of n of x (float32, bfloat16 or float16; w and b of
// x's type or null). With `add` (x's type; x's shape, or a trailing block
// of it repeated), x + add is normalised and also written to `sum`.
void LayerNormRows(const Tensor& x, const Tensor* add, const Tensor* w, const Tensor* b,
                   int64_t n, float eps, bool rms, Tensor* sum, Tensor* out) {
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const int64_t period = add == nullptr ? 0 : add->numel();
  if (x.dtype() == DT_FLOAT32) {
    for (int64_t r = 0; r < rows; ++r) {
      LayerNormRow(x.data() + r * n, add == nullptr ? nullptr : add->data() + (r * n) % period,
                   DT_FLOAT32, rms, n, w == nullptr ? nullptr : w->data(),
                   b == nullptr ? nullptr : b->data(), eps,
                   add == nullptr ? nullptr : sum->data() + r * n, out->data() + r * n);
    }
    return;
  }
  // bfloat16 or float16: each row widened into L1, normalised, rounded
  // back.
  const DataType type = x.dtype();
  std::vector<float> wf(w == nullptr ? 0 : n), bf(b == nullptr ? 0 : n);
  if (w != nullptr) Widen16(type, w->data_as<uint16_t>(), n, wf.data());
  if (b != nullptr) Widen16(type, b->data_as<uint16_t>(), n, bf.data());
  std::vector<float> xr(n), ar(add == nullptr ? 0 : n), sr(add == nullptr ? 0 : n), orow(n);
  for (int64_t r = 0; r < rows; ++r) {
    Widen16(type, x.data_as<uint16_t>() + r * n, n, xr.data());
    if (add != nullptr) {
      Widen16(type, add->data_as<uint16_t>() + (r * n) % period, n, ar.data());
    }
    LayerNormRow(xr.data(), add == nullptr ? nullptr : ar.data(), type, rms, n,
                 w == nullptr ? nullptr : wf.data(), b == nullptr ? nullptr : bf.data(), eps,
                 sr.data(), orow.data());
    if (add != nullptr) Narrow16(type, sr.data(), n, sum->data_as<uint16_t>() + r * n);
    Narrow16(type, orow.data(), n, out->data_as<uint16_t>() + r * n);
  }
}

void LayerNorm(const Node& node, const std::vector<const Tensor*>& in, Tensor* out) {
  const Tensor& x = *in[0];
  int64_t nd = IntAttr(node, "ndim", 1);
  int64_t n = 1;
  for (int i = x.rank() - nd; i < x.rank(); ++i) n *= x.dim(i);
  const float eps = static_cast<float>(FloatAttr(node, "eps", 1e-5));
  size_t k = 1;
  const Tensor* w = IntAttr(node, "has_weight", 0) ? in[k++] : nullptr;
  const Tensor* b = IntAttr(node, "has_bias", 0) ? in[k++] : nullptr;
  LayerNormRows(x, nullptr, w, b, n, eps, /*rms=*/false, nullptr, out);
}

template <typename T, typename Acc>
void ReduceT(const Node& node, const Tensor& x, Tensor* out) {
  std::vector<int64_t> dims = ResolvedInts(node, "dims", {}, 0);
  std::vector<bool> reduce(x.rank(), dims.empty());
  for (int64_t d : dims) reduce[*NormalizeDim(d, x.rank())] = true;
  // Output strides over the input's dims: 0 for reduced ones.
  Shape kept;
  for (int i = 0; i < x.rank(); ++i) kept.push_back(reduce[i] ? 1 : x.dim(i));
  Strides st = ContiguousStrides(kept);
  for (int i = 0; i < x.rank(); ++i) if (reduce[i]) st[i] = 0;
  const int64_t m = out->numel();
  const bool is_max = node.op() == "amax";
  std::vector<Acc> acc(m, is_max ? std::numeric_limits<Acc>::lowest() : Acc{0});
  const T* a = x.data_as<T>();
  std::array<Strides, 1> s = {st};
  Iterate<1>(x.shape(), s, [&](int64_t i, const std::array<int64_t, 1>& f) {
    Acc v = static_cast<Acc>(a[i]);
    if (is_max) acc[f[0]] = MaxOf(acc[f[0]], v);  // a NaN stays
    else acc[f[0]] += v;
  });
  int64_t count = m == 0 ? 0 : x.numel() / m;
  T* o = out->data_as<T>();
  for (int64_t i = 0; i < m; ++i) {
    Acc v = acc[i];
    if (node.op() == "mean" && count > 0) v /= static_cast<Acc>(count);
    o[i] = static_cast<T>(v);
  }
}

absl::Status Reduce(const Node& node, const Tensor& x, Tensor* out) {
  switch (x.dtype()) {
    case DT_FLOAT32: ReduceT<float, double>(node, x, out); break;
    case DT_INT64: ReduceT<int64_t, int64_t>(node, x, out); break;
    case DT_INT32: ReduceT<int32_t, int64_t>(node, x, out); break;
    default: return Bad(absl::StrCat(node.op(), " has no ", TorchName(x.dtype()), " kernel"));
  }
  return absl::OkStatus();
}

// ---- GEMMs -----------------------------------------------------------------

absl::Status Matmul(const Tensor& a_in, const Tensor& b_in, Tensor* out) {
  Shape a = a_in.shape(), b = b_in.shape();
  if (a.size() == 1) a.insert(a.begin(), 1);
  if (b.size() == 1) b.push_back(1);
  const int64_t m = a[a.size() - 2], k = a.back(), n = b.back();
  Shape batch_a(a.begin(), a.end() - 2), batch_b(b.begin(), b.end() - 2);
  if (batch_b.empty() || NumElements(batch_b) == 1) {
    // b is one matrix: a's batch rows are contiguous, one GEMM does all.
    int64_t rows = NumElements(batch_a) * m;
    return Gemm(false, rows, n, k, a_in.data(), b_in.data(), 0.0f, out->data());
  }
  Shape batch = batch_a.size() >= batch_b.size() ? batch_a : batch_b;
  for (size_t i = 0; i < batch.size(); ++i) {  // broadcast batch shape
    size_t ia = i + batch_a.size() - batch.size(), ib = i + batch_b.size() - batch.size();
    int64_t da = i + batch_a.size() >= batch.size() ? batch_a[ia] : 1;
    int64_t db = i + batch_b.size() >= batch.size() ? batch_b[ib] : 1;
    batch[i] = std::max(da, db);
  }
  Strides sa = BroadcastStrides(batch_a, batch), sb = BroadcastStrides(batch_b, batch);
  std::array<Strides, 2> st = {sa, sb};
  absl::Status status;
  Iterate<2>(batch, st, [&](int64_t i, const std::array<int64_t, 2>& f) {
    if (!status.ok()) return;
    status = Gemm(false, m, n, k, a_in.data() + f[0] * m * k, b_in.data() + f[1] * k * n, 0.0f,
                  out->data() + i * m * n);
  });
  return status;
}

absl::Status Addmm(const Node& node, const std::vector<const Tensor*>& in, Tensor* out) {
  const float beta = static_cast<float>(FloatAttr(node, "beta", 1.0));
  const float alpha = static_cast<float>(FloatAttr(node, "alpha", 1.0));
  const Tensor& bias = *in[0];
  Strides sb = BroadcastStrides(bias.shape(), out->shape());
  std::array<Strides, 1> st = {sb};
  float* o = out->data();
  const float* bp = bias.data();
  Iterate<1>(out->shape(), st, [&](int64_t i, const std::array<int64_t, 1>& f) {
    o[i] = beta * bp[f[0]];
  });
  const int64_t m = in[1]->dim(0), k = in[1]->dim(1), n = in[2]->dim(1);
  if (alpha == 1.0f) return Gemm(false, m, n, k, in[1]->data(), in[2]->data(), 1.0f, o);
  Tensor tmp = Tensor::Empty({m, n});
  RETURN_IF_ERROR(Gemm(false, m, n, k, in[1]->data(), in[2]->data(), 0.0f, tmp.data()));
  for (int64_t i = 0; i < m * n; ++i) o[i] += alpha * tmp.data()[i];
  return absl::OkStatus();
}

// ---- data movement ---------------------------------------------------------

absl::Status Embedding(const Tensor& ids, const Tensor& weight, Tensor* out) {
  const int64_t rows = weight.dim(0);
  const int64_t row_bytes = weight.dim(1) * weight.element_size();
  const char* w = static_cast<const char*>(weight.raw_data());
  char* o = static_cast<char*>(out->raw_data());
  for (int64_t i = 0; i < ids.numel(); ++i) {
    int64_t id = ids.IntAt(i);
    if (id < 0 || id >= rows) {
      return Bad(absl::StrCat("embedding id ", id, " (at flat index ", i,
                              ") is out of range for a table of ", rows, " rows"));
    }
    std::memcpy(o + i * row_bytes, w + id * row_bytes, row_bytes);
  }
  return absl::OkStatus();
}

void Cat(const Node& node, const std::vector<const Tensor*>& in, Tensor* out) {
  int dim = *NormalizeDim(IntAttr(node, "dim", 0), out->rank());
  int64_t outer = 1;
  for (int i = 0; i < dim; ++i) outer *= out->dim(i);
  const int e = out->element_size();
  int64_t out_row = NumElements(out->shape()) / std::max<int64_t>(outer, 1) * e;
  char* o = static_cast<char*>(out->raw_data());
  int64_t at = 0;
  for (const Tensor* t : in) {
    int64_t part = outer == 0 ? 0 : t->numel() / outer * e;  // bytes per outer row
    const char* src = static_cast<const char*>(t->raw_data());
    for (int64_t p = 0; p < outer; ++p) {
      std::memcpy(o + p * out_row + at, src + p * part, part);
    }
    at += part;
  }
}

void Tri(const Node& node, const Tensor& x, Tensor* out) {
  const bool upper = node.op() == "triu";
  const int64_t diag = IntAttr(node, "diagonal", 0);
  const int64_t r = x.dim(x.rank() - 2), c = x.dim(x.rank() - 1);
  const int e = x.element_size();
  std::memcpy(out->raw_data(), x.raw_data(), x.byte_size());
  char* o = static_cast<char*>(out->raw_data());
  const int64_t mats = r * c == 0 ? 0 : x.numel() / (r * c);
  for (int64_t m = 0; m < mats; ++m) {
    for (int64_t i = 0; i < r; ++i) {
      for (int64_t j = 0; j < c; ++j) {
        bool keep = upper ? j - i >= diag : j - i <= diag;
        if (!keep) std::memset(o + ((m * r + i) * c + j) * e, 0, e);
      }
    }
  }
}

double ReadAsDouble(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DT_FLOAT32: return t.data()[i];
    case DT_FLOAT16: return HalfToFloat(t.data_as<uint16_t>()[i]);
    case DT_BFLOAT16: return Bf16ToFloat(t.data_as<uint16_t>()[i]);
    case DT_INT64: return static_cast<double>(t.data_as<int64_t>()[i]);
    case DT_INT32: return t.data_as<int32_t>()[i];
    case DT_BOOL: return t.data_as<uint8_t>()[i];
    default: return 0;
  }
}

void WriteFromDouble(Tensor* t, int64_t i, double v) {
  switch (t->dtype()) {
    case DT_FLOAT32: t->data()[i] = static_cast<float>(v); break;
    case DT_FLOAT16: t->data_as<uint16_t>()[i] = FloatToHalf(static_cast<float>(v)); break;
    case DT_BFLOAT16: t->data_as<uint16_t>()[i] = FloatToBf16(static_cast<float>(v)); break;
    case DT_INT64: t->data_as<int64_t>()[i] = static_cast<int64_t>(v); break;
    case DT_INT32: t->data_as<int32_t>()[i] = static_cast<int32_t>(v); break;
    case DT_BOOL: t->data_as<uint8_t>()[i] = v != 0; break;
    default: break;
  }
}

void Cast(const Tensor& x, Tensor* out) {
  if (x.dtype() == out->dtype()) {
    std::memcpy(out->raw_data(), x.raw_data(), x.byte_size());
  } else if (x.dtype() == DT_INT64 && out->dtype() == DT_INT32) {
    for (int64_t i = 0; i < x.numel(); ++i) out->data_as<int32_t>()[i] = static_cast<int32_t>(x.data_as<int64_t>()[i]);
  } else if (out->dtype() == DT_INT64 && IsInteger(x.dtype())) {
    for (int64_t i = 0; i < x.numel(); ++i) out->data_as<int64_t>()[i] = x.IntAt(i);
  } else {
    for (int64_t i = 0; i < x.numel(); ++i) WriteFromDouble(out, i, ReadAsDouble(x, i));
  }
}

bool IsMovement(const std::string& op) {
  static const auto* ops = new absl::flat_hash_set<std::string>{
      "reshape", "permute", "unsqueeze", "squeeze", "expand", "slice", "select", "cat",
      "stack", "identity", "clone", "embedding", "where", "triu", "tril", "size", "full",
      "cast", "arange"};
  return ops->contains(op);
}

bool IsHalf(DataType t) { return t == DT_FLOAT16 || t == DT_BFLOAT16; }

absl::StatusOr<Tensor> RunFloat32(const Node& node, const std::vector<const Tensor*>& in,
                                  const Shape& out_shape, DataType out_type,
                                  const Tensor& scratch);
// An op with a float16 or bfloat16 value: bfloat16 kernels where there
// are, else in float32 rounded back.
absl::StatusOr<Tensor> RunHalf(const Node& node, const std::vector<const Tensor*>& in,
                               const Shape& out_shape, DataType out_type, const Tensor& scratch);

}  // namespace

namespace {

// sample_tokens (graph/op_schema.cc): each sequence's next token from
// its logits row, as the coordinator would sample it (runtime/sampler.h).
absl::StatusOr<Tensor> SampleTokens(const std::vector<const Tensor*>& in, const Shape& out_shape,
                                    const Tensor& scratch) {
  const Tensor logits = ToFloat32(*in[0]);
  const int64_t n = logits.dim(0), vocab = logits.dim(1), context = in[3]->numel();
  const float* floats = in[1]->data();
  const int64_t* ints = in[2]->data_as<int64_t>();
  const int64_t* ends = in[4]->data_as<int64_t>();
  ASSIGN_OR_RETURN(Tensor out, Output(out_shape, DT_INT64, scratch));
  int64_t begin = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (ends[i] < begin || ends[i] > context) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sample_tokens: sequence ", i, "'s context ends at ", ends[i], ", outside [", begin,
          ", ", context, "]"));
    }
    SamplingParams p;
    p.temperature = floats[i * 4];
    p.top_p = floats[i * 4 + 1];
    p.repetition_penalty = floats[i * 4 + 2];
    p.frequency_penalty = floats[i * 4 + 3];
    p.top_k = ints[i * 3];
    p.seed = static_cast<uint64_t>(ints[i * 3 + 1]);
    if (absl::Status s = CheckSampling(p, vocab); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("sample_tokens: sequence ", i, ": ", s.message()));
    }
    const absl::Span<const int64_t> seen =
        ends[i] > begin ? absl::MakeConstSpan(in[3]->data_as<int64_t>() + begin, ends[i] - begin)
                        : absl::Span<const int64_t>();  // (an empty context may have no data)
    out.data_as<int64_t>()[i] = SampleToken(absl::MakeConstSpan(logits.data() + i * vocab, vocab),
                                            p, seen, ints[i * 3 + 2]);
    begin = ends[i];
  }
  return out;
}

}  // namespace

namespace {

// Attention's output shape, [batch..., Tq, Dv], for q [batch..., Tq, D],
// k [batch..., Tk, D] and v [batch..., Tk, Dv].
absl::StatusOr<Shape> AttentionShape(const Tensor& q, const Tensor& k, const Tensor& v) {
  if (q.rank() < 2 || k.rank() != q.rank() || v.rank() != q.rank()) {
    return Bad("attention: q, k and v need the same rank >= 2");
  }
  const int r = q.rank();
  const Shape batch(q.shape().begin(), q.shape().end() - 2);
  if (Shape(k.shape().begin(), k.shape().end() - 2) != batch ||
      Shape(v.shape().begin(), v.shape().end() - 2) != batch || k.dim(r - 1) != q.dim(r - 1) ||
      v.dim(r - 2) != k.dim(r - 2)) {
    return Bad(absl::StrCat("attention: q ", ShapeToString(q.shape()), ", k ",
                            ShapeToString(k.shape()), ", v ", ShapeToString(v.shape()),
                            " do not fit"));
  }
  Shape out = batch;
  out.push_back(q.dim(r - 2));
  out.push_back(v.dim(r - 1));
  return out;
}

// The offset of flat batch index `b` over `batch` through `strides` (one
// per batch dimension, or more).
int64_t BatchOffset(int64_t b, const Shape& batch, const Strides& strides) {
  int64_t offset = 0;
  for (int i = static_cast<int>(batch.size()) - 1; i >= 0; --i) {
    offset += (b % batch[i]) * strides[i];
    b /= batch[i];
  }
  return offset;
}

}  // namespace

absl::StatusOr<Tensor> FusedAttention(const Tensor& q_in, const Tensor& k_in,
                                      const Tensor& v_in, float scale,
                                      const AttentionMask& mask, const Tensor& scratch) {
  const DataType type = q_in.dtype();
  ASSIGN_OR_RETURN(Shape out_shape, AttentionShape(q_in, k_in, v_in));
  const int r = q_in.rank();
  const int64_t tq = q_in.dim(r - 2), d = q_in.dim(r - 1);
  const int64_t tk = k_in.dim(r - 2), dv = v_in.dim(r - 1);
  const Shape batch(out_shape.begin(), out_shape.end() - 2);
  ASSIGN_OR_RETURN(Tensor out, Output(out_shape, type, scratch));
  if (out.numel() == 0) return out;  // nothing to write (see RunCpuOp)
  Shape scores = batch;
  scores.push_back(tq);
  scores.push_back(tk);
  // Masks index [batch..., Tq, Tk] through broadcast strides.
  Tensor add = mask.add != nullptr ? ToFloat32(*mask.add) : Tensor();
  Strides cond_st, add_st;
  if (mask.cond != nullptr) cond_st = BroadcastStrides(mask.cond->shape(), scores);
  if (mask.add != nullptr) add_st = BroadcastStrides(add.shape(), scores);
  const int64_t batches = NumElements(batch);
  constexpr int64_t kRows = 64;
  std::vector<float> s_block(static_cast<size_t>(std::min(tq, kRows) * tk));
  // float16/bfloat16: one batch index of q, k and v widened at a time, and
  // each block of output rows rounded back.
  const bool wide = type == DT_FLOAT32;
  std::vector<float> qf(wide ? 0 : tq * d), kf(wide ? 0 : tk * d), vf(wide ? 0 : tk * dv),
      of(wide ? 0 : std::min(tq, kRows) * dv);
  for (int64_t b = 0; b < batches; ++b) {
    // Offsets of this batch index in the masks.
    const int64_t cond_base = mask.cond == nullptr ? 0 : BatchOffset(b, batch, cond_st);
    const int64_t add_base = mask.add == nullptr ? 0 : BatchOffset(b, batch, add_st);
    const float* qb = wide ? q_in.data() + b * tq * d : qf.data();
    const float* kb = wide ? k_in.data() + b * tk * d : kf.data();
    const float* vb = wide ? v_in.data() + b * tk * dv : vf.data();
    if (!wide) {
      Widen16(type, q_in.data_as<uint16_t>() + b * tq * d, tq * d, qf.data());
      Widen16(type, k_in.data_as<uint16_t>() + b * tk * d, tk * d, kf.data());
      Widen16(type, v_in.data_as<uint16_t>() + b * tk * dv, tk * dv, vf.data());
    }
    for (int64_t r0 = 0; r0 < tq; r0 += kRows) {
      const int64_t m = std::min(kRows, tq - r0);
      float* sb = s_block.data();
      RETURN_IF_ERROR(Gemm(true, m, tk, d, qb + r0 * d, kb, 0.0f, sb));
      for (int64_t i = 0; i < m; ++i) {
        const int64_t qi = r0 + i;
        const uint8_t* cond =
            mask.cond == nullptr
                ? nullptr
                : mask.cond->data_as<uint8_t>() + cond_base + qi * cond_st[r - 2];
        const float* added =
            mask.add == nullptr ? nullptr : add.data() + add_base + qi * add_st[r - 2];
        ScaleMaskRow(sb + i * tk, tk, scale, cond, cond == nullptr ? 0 : cond_st[r - 1],
                     mask.fill, added, added == nullptr ? 0 : add_st[r - 1]);
        SoftmaxRow(sb + i * tk, tk);
      }
      float* ob = wide ? out.data() + (b * tq + r0) * dv : of.data();
      RETURN_IF_ERROR(Gemm(false, m, dv, tk, sb, vb, 0.0f, ob));
      if (!wide) {
        Narrow16(type, ob, m * dv, out.data_as<uint16_t>() + (b * tq + r0) * dv);
      }
    }
  }
  return out;
}

absl::Status FusedNorm(const NormKind& kind, const Tensor& x, const Tensor* residual,
                       const Tensor* w, const Tensor* b, Tensor* sum, Tensor* out) {
  const char* name = kind.rms ? "RMSNorm" : "layer_norm";
  if (kind.ndim < 1 || kind.ndim > x.rank()) {
    return Bad(absl::StrCat(name, " over ", kind.ndim, " dims of ", ShapeToString(x.shape())));
  }
  int64_t n = 1;
  for (int i = x.rank() - static_cast<int>(kind.ndim); i < x.rank(); ++i) n *= x.dim(i);
  if (x.dtype() != DT_FLOAT32 && !IsHalf(x.dtype())) {
    return Bad(absl::StrCat(name, " over ", TorchName(x.dtype())));
  }
  if (kind.rms && b != nullptr) return Bad("RMSNorm takes no bias");
  const Tensor* written_sum = residual == nullptr ? nullptr : sum;
  for (const Tensor* t : {residual, w, b, written_sum, static_cast<const Tensor*>(out)}) {
    if (t != nullptr && t->dtype() != x.dtype()) {
      return Bad(absl::StrCat(name, " (fused) needs one dtype throughout"));
    }
  }
  if ((w != nullptr && w->numel() != n) || (b != nullptr && b->numel() != n) ||
      out->numel() != x.numel() || (residual != nullptr && sum->numel() != x.numel())) {
    return Bad(absl::StrCat(name, ": x ", ShapeToString(x.shape()), " over rows of ", n,
                            " with weights of ", w == nullptr ? 0 : w->numel()));
  }
  if (residual != nullptr &&
      (residual->numel() == 0 || residual->numel() % n != 0 ||
       x.numel() % residual->numel() != 0 || !IsTrailingBlock(residual->shape(), x.shape()))) {
    return absl::UnimplementedError(absl::StrCat(
        "add + ", name, ": x ", ShapeToString(x.shape()), ", residual ",
        ShapeToString(residual->shape()), " over rows of ", n));
  }
  if (x.numel() == 0) return absl::OkStatus();  // no row to normalise
  LayerNormRows(x, residual, w, b, n, kind.eps, kind.rms, sum, out);
  return absl::OkStatus();
}

Tensor ToFloat32(const Tensor& t) {
  if (t.dtype() == DT_FLOAT32) return t;
  Tensor out = Tensor::Empty(t.shape(), DT_FLOAT32);
  Widen16(t.dtype(), t.data_as<uint16_t>(), t.numel(), out.data());
  return out;
}

Tensor FromFloat32(const Tensor& t, DataType to) {
  if (to == DT_FLOAT32) return t;
  Tensor out = Tensor::Empty(t.shape(), to);
  Narrow16(to, t.data(), t.numel(), out.data_as<uint16_t>());
  return out;
}

absl::StatusOr<Tensor> RunCpuOp(const Node& node, const std::vector<const Tensor*>& in,
                                const Shape& out_shape, DataType out_type,
                                const Tensor& scratch) {
  // An output with no elements has nothing to compute, however many
  // positions its other dimensions span ([2^40, 0]): a kernel walking
  // them would loop for hours writing nothing.
  if (std::find(out_shape.begin(), out_shape.end(), 0) != out_shape.end()) {
    return Output(out_shape, out_type, scratch);  // checks the shape, holds nothing
  }
  if (node.op() == "sample_tokens") return SampleTokens(in, out_shape, scratch);
  bool half = IsHalf(out_type);
  for (const Tensor* t : in) half = half || IsHalf(t->dtype());
  if (!half || IsMovement(node.op())) return RunFloat32(node, in, out_shape, out_type, scratch);
  return RunHalf(node, in, out_shape, out_type, scratch);
}

namespace {

absl::StatusOr<Tensor> RunHalf(const Node& node, const std::vector<const Tensor*>& in,
                               const Shape& out_shape, DataType out_type, const Tensor& scratch) {
  const std::string& op = node.op();
  bool all_bf16 = out_type == DT_BFLOAT16;
  bool all_fp16 = out_type == DT_FLOAT16;
  for (const Tensor* t : in) {
    all_bf16 = all_bf16 && t->dtype() == DT_BFLOAT16;
    all_fp16 = all_fp16 && t->dtype() == DT_FLOAT16;
  }
  const BinOp bin = BinOpOf(op);
  if (all_bf16 && bin != BinOp::kUnknown && !IsCompare(bin) && bin != BinOp::kFloorDiv &&
      in.size() == (HasScalarOperand(node) ? 1u : 2u)) {
    ASSIGN_OR_RETURN(Tensor out, Output(out_shape, out_type, scratch));
    RETURN_IF_ERROR(BinaryBf16(node, in, &out));
    return out;
  }
  if (all_bf16 && in.size() == 1 && !HasScalarOperand(node) &&
      (op == "relu" || op == "gelu" || op == "silu" || op == "tanh" || op == "sigmoid" ||
       op == "sqrt" || op == "rsqrt" || op == "exp" || op == "log" || op == "cos" ||
       op == "sin" || op == "neg" || op == "abs")) {
    ASSIGN_OR_RETURN(Tensor out, Output(out_shape, out_type, scratch));
    RETURN_IF_ERROR(UnaryBf16(node, *in[0], &out));
    return out;
  }
  if (all_bf16 && op == "addmm" && in[0]->rank() == 1 && FloatAttr(node, "beta", 1) == 1 &&
      FloatAttr(node, "alpha", 1) == 1) {
    // GPT-2's Conv1D: bias [N] + x [M, K] @ w [K, N], in bfloat16.
    ASSIGN_OR_RETURN(Tensor out, Output(out_shape, out_type, scratch));
    RETURN_IF_ERROR(GemmBf16(false, in[1]->dim(0), in[2]->dim(1), in[1]->dim(1),
                             in[1]->data_as<uint16_t>(), in[2]->data_as<uint16_t>(),
                             in[0]->data_as<uint16_t>(), out.data_as<uint16_t>()));
    return out;
  }
  if (all_bf16 && (op == "linear" || op == "mm" ||
                   (op == "matmul" && in[1]->rank() == 2 && in[0]->rank() >= 2))) {
    // bfloat16 GEMMs stay in bfloat16 (oneDNN, float32 accumulation).
    ASSIGN_OR_RETURN(Tensor out, Output(out_shape, out_type, scratch));
    const bool linear = op == "linear";
    const int64_t k = linear ? in[1]->dim(1) : in[1]->dim(0);
    const int64_t n = linear ? in[1]->dim(0) : in[1]->dim(1);
    RETURN_IF_ERROR(GemmBf16(linear, k == 0 ? 0 : in[0]->numel() / k, n, k,
                             in[0]->data_as<uint16_t>(), in[1]->data_as<uint16_t>(),
                             linear && in.size() > 2 ? in[2]->data_as<uint16_t>() : nullptr,
                             out.data_as<uint16_t>()));
    return out;
  }
  if ((all_bf16 || all_fp16) && op == "layer_norm") {
    ASSIGN_OR_RETURN(Tensor out, Output(out_shape, out_type, scratch));
    LayerNorm(node, in, &out);
    return out;
  }
  // float16/bfloat16 math: in float32, rounded back to the value's type.
  std::vector<Tensor> wide;
  wide.reserve(in.size());
  std::vector<const Tensor*> ptrs;
  for (const Tensor* t : in) {
    wide.push_back(IsHalf(t->dtype()) ? ToFloat32(*t) : *t);
    ptrs.push_back(&wide.back());
  }
  DataType wide_type = IsHalf(out_type) ? DT_FLOAT32 : out_type;
  ASSIGN_OR_RETURN(Tensor y, RunFloat32(node, ptrs, out_shape, wide_type, Tensor()));
  return IsHalf(out_type) ? FromFloat32(y, out_type) : y;
}

// ---- the kernel table -------------------------------------------------------
// One entry per op that computes into a new output (views and sizes are
// RunFloat32's own): float32, integer and bool values; float16 and
// bfloat16 reach them through RunHalf.
using Args = std::vector<const Tensor*>;
using Kernel = absl::Status (*)(const Node& node, const Args& in, Tensor* out);

absl::Status MatmulKernel(const Node& node, const Args& in, Tensor* out) {
  if (in[0]->dtype() != DT_FLOAT32) return Bad(absl::StrCat(node.op(), " needs float inputs"));
  return Matmul(*in[0], *in[1], out);
}

absl::Status LinearKernel(const Node&, const Args& in, Tensor* out) {
  const int64_t k = in[1]->dim(1), n = in[1]->dim(0);
  return LinearForward(in[0]->data(), in[1]->data(), in.size() > 2 ? in[2]->data() : nullptr,
                       k == 0 ? 0 : in[0]->numel() / k, n, k, out->data(), false, false);
}

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

absl::Status SoftmaxKernel(const Node& node, const Args& in, Tensor* out) {
  const Tensor& x = *in[0];
  Softmax(x, *NormalizeDim(IntAttr(node, "dim", -1), x.rank()), node.op() == "log_softmax", out);
  return absl::OkStatus();
}

absl::Status LayerNormKernel(const Node& node, const Args& in, Tensor* out) {
  LayerNorm(node, in, out);
  return absl::OkStatus();
}

absl::Status ReduceKernel(const Node& node, const Args& in, Tensor* out) {
  return Reduce(node, *in[0], out);
}

absl::Status EmbeddingKernel(const Node&, const Args& in, Tensor* out) {
  return Embedding(*in[0], *in[1], out);
}

absl::Status PermuteKernel(const Node& node, const Args& in, Tensor* out) {
  const Tensor& x = *in[0];
  Strides own = ContiguousStrides(x.shape()), st;
  for (int64_t d : ResolvedInts(node, "dims", {}, 0)) st.push_back(own[*NormalizeDim(d, x.rank())]);
  GatherCopy(x, 0, st, out);
  return absl::OkStatus();
}

absl::Status ExpandKernel(const Node&, const Args& in, Tensor* out) {
  GatherCopy(*in[0], 0, BroadcastStrides(in[0]->shape(), out->shape()), out);
  return absl::OkStatus();
}

// slice and select: a strided view of x, copied.
absl::Status SliceKernel(const Node& node, const Args& in, Tensor* out) {
  const Tensor& x = *in[0];
  const int d = *NormalizeDim(IntAttr(node, "dim", 0), x.rank());
  Strides st = ContiguousStrides(x.shape());
  const int64_t n = x.dim(d);
  int64_t base;
  if (node.op() == "slice") {
    int64_t start = IntAttr(node, "start", 0);
    if (start < 0) start += n;
    base = std::min(std::max<int64_t>(start, 0), n) * st[d];
    st[d] *= IntAttr(node, "step", 1);
  } else {
    int64_t index = IntAttr(node, "index", 0);
    if (index < 0) index += n;
    base = index * st[d];
    st.erase(st.begin() + d);
  }
  GatherCopy(x, base, st, out);
  return absl::OkStatus();
}

absl::Status CatKernel(const Node& node, const Args& in, Tensor* out) {
  Cat(node, in, out);
  return absl::OkStatus();
}

absl::Status TriKernel(const Node& node, const Args& in, Tensor* out) {
  Tri(node, *in[0], out);
  return absl::OkStatus();
}

// cast and clone: the values converted to the output's type.
absl::Status CastKernel(const Node&, const Args& in, Tensor* out) {
  Cast(*in[0], out);
  return absl::OkStatus();
}

absl::Status ArangeKernel(const Node& node, const Args&, Tensor* out) {
  const int64_t start = IntAttr(node, "start", 0), step = IntAttr(node, "step", 1);
  for (int64_t i = 0; i < out->numel(); ++i) {
    WriteFromDouble(out, i, static_cast<double>(start + i * step));
  }
  return absl::OkStatus();
}

absl::Status FullKernel(const Node& node, const Args&, Tensor* out) {
  if (out->numel() == 0) return absl::OkStatus();
  WriteFromDouble(out, 0, FloatAttr(node, "value", 0));
  const int e = out->element_size();
  char* o = static_cast<char*>(out->raw_data());
  for (int64_t i = 1; i < out->numel(); ++i) std::memcpy(o + i * e, o, e);
  return absl::OkStatus();
}

absl::Status UnaryKernel(const Node& node, const Args& in, Tensor* out) {
  return Unary(node, *in[0], out);
}

const absl::flat_hash_map<std::string, Kernel>& Kernels() {
  static const auto* kernels = [] {
    auto* k = new absl::flat_hash_map<std::string, Kernel>{
        {"mm", MatmulKernel},       {"matmul", MatmulKernel},   {"linear", LinearKernel},
        {"addmm", Addmm},           {"where", WhereKernel},     {"softmax", SoftmaxKernel},
        {"log_softmax", SoftmaxKernel}, {"layer_norm", LayerNormKernel},
        {"sum", ReduceKernel},      {"mean", ReduceKernel},     {"amax", ReduceKernel},
        {"embedding", EmbeddingKernel}, {"permute", PermuteKernel}, {"expand", ExpandKernel},
        {"slice", SliceKernel},     {"select", SliceKernel},    {"cat", CatKernel},
        {"stack", CatKernel},       {"triu", TriKernel},        {"tril", TriKernel},
        {"cast", CastKernel},       {"clone", CastKernel},      {"arange", ArangeKernel},
        {"full", FullKernel},       {"logical_not", UnaryKernel}};
    for (const char* op : {"relu", "gelu", "silu", "tanh", "sigmoid", "sqrt", "rsqrt", "exp",
                           "log", "cos", "sin", "neg", "abs"}) {
      (*k)[op] = UnaryKernel;
    }
    for (const char* op : {"add", "sub", "mul", "div", "floordiv", "pow", "maximum", "minimum",
                           "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or"}) {
      (*k)[op] = Binary;
    }
    return k;
  }();
  return *kernels;
}

// Ops that make no new values: views of their input's storage (every
// tensor here is contiguous) and sizes.
bool IsViewOrSize(const std::string& op) {
  return op == "reshape" || op == "unsqueeze" || op == "squeeze" || op == "identity" ||
         op == "size";
}

absl::StatusOr<Tensor> RunFloat32(const Node& node, const std::vector<const Tensor*>& in,
                                  const Shape& out_shape, DataType out_type,
                                  const Tensor& scratch) {
  const std::string& op = node.op();
  const Tensor& x = in.empty() ? Tensor() : *in[0];
  if (op == "size") {
    int d = *NormalizeDim(IntAttr(node, "dim", 0), x.rank());
    return Tensor::Scalar(x.rank() == 0 ? 1 : x.dim(d));
  }
  if (IsViewOrSize(op)) return x.Reshaped(out_shape);
  auto kernel = Kernels().find(op);
  if (kernel == Kernels().end()) return Bad(absl::StrCat("no CPU kernel for op \"", op, "\""));
  ASSIGN_OR_RETURN(Tensor out, Output(out_shape, out_type, scratch));
  RETURN_IF_ERROR(kernel->second(node, in, &out));
  return out;
}

}  // namespace

bool HasCpuOp(const std::string& op) {
  return Kernels().contains(op) || IsViewOrSize(op) || op == "sample_tokens";
}


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
  ASSIGN_OR_RETURN(Tensor out, Output(out_shape, type, scratch));
  const bool bf16 = type == DT_BFLOAT16;
  std::vector<float> regs((codes_.size() + externals.size()) * kBlock);
  auto ext = [&](size_t k) { return regs.data() + (codes_.size() + k) * kBlock; };
  auto load = [&](size_t k, int64_t i0, int64_t m) {
    const Tensor& t = *externals[k];
    float* dst = ext(k);
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
    switch (how[k]) {
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
  };
  std::vector<float> number(kBlock);
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t m = std::min(kBlock, n - i0);
    for (size_t k = 0; k < externals.size(); ++k) load(k, i0, m);
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
