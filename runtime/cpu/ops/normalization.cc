// The CPU kernels of the normalisations and reductions: softmax and
// log_softmax, layer_norm (the rows loop shared with RMSNorm), sum, mean
// and amax; and from cpu_ops.h, SoftmaxRow and FusedNorm (an add before
// layer_norm or RMSNorm, in one pass per row).
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

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
using cpu_ops::FastExp;
using cpu_ops::IsHalf;
using cpu_ops::IsTrailingBlock;
using cpu_ops::Iterate;
using cpu_ops::MaxOf;
using cpu_ops::Strides;

// Vector loops' sums run in 16 float lanes (see ops/internal.h).
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
    if (node.op() == "mean") {  // over nothing: NaN, as in PyTorch
      v = count > 0 ? v / static_cast<Acc>(count) : std::numeric_limits<Acc>::quiet_NaN();
    }
    o[i] = static_cast<T>(v);
  }
}

absl::Status Reduce(const Node& node, const Tensor& x, Tensor* out) {
  RETURN_IF_ERROR(CheckReductionHasValues(node, x.shape()));
  switch (x.dtype()) {
    case DT_FLOAT32: ReduceT<float, double>(node, x, out); break;
    case DT_INT64: ReduceT<int64_t, int64_t>(node, x, out); break;
    case DT_INT32: ReduceT<int32_t, int64_t>(node, x, out); break;
    default: return Bad(absl::StrCat(node.op(), " has no ", TorchName(x.dtype()), " kernel"));
  }
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

// float16 and bfloat16 layer_norm rows are computed in float32 and rounded
// back, row by row.
bool TakesHalfLayerNorm(const Node&, const Args& in, DataType out_type) {
  return AllOfType(DT_BFLOAT16, in, out_type) || AllOfType(DT_FLOAT16, in, out_type);
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

namespace cpu_ops {

void RegisterNormalizationKernels(KernelTable* table) {
  table->kernels["softmax"] = SoftmaxKernel;
  table->kernels["log_softmax"] = SoftmaxKernel;
  table->kernels["layer_norm"] = LayerNormKernel;
  table->half["layer_norm"] = {TakesHalfLayerNorm, LayerNormKernel};
  table->kernels["sum"] = ReduceKernel;
  table->kernels["mean"] = ReduceKernel;
  table->kernels["amax"] = ReduceKernel;
}

}  // namespace cpu_ops
}  // namespace pipeserve
