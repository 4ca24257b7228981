// What the CPU op families (runtime/cpu/ops/*.cc) share: strides and the
// walk over broadcast indices, strided gathers, output buffers, errors,
// the float functions that vector loops inline, and the bfloat16 vector
// loops. Internal to //runtime/cpu:cpu_ops, whose API is
// runtime/cpu/cpu_ops.h; the names live in pipeserve::cpu_ops.
//
//   // o [out's shape] = a [x's shape] broadcast
//   std::array<Strides, 1> st = {BroadcastStrides(x.shape(), out->shape())};
//   Iterate<1>(out->shape(), st, [&](int64_t i, const std::array<int64_t, 1>& f) {
//     o[i] = a[f[0]];
//   });
#ifndef PIPESERVE_RUNTIME_CPU_OPS_INTERNAL_H_
#define PIPESERVE_RUNTIME_CPU_OPS_INTERNAL_H_

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "graph/op_schema.h"
#include "proto/model.pb.h"
#include "runtime/tensor.h"

namespace pipeserve::cpu_ops {

using Strides = std::vector<int64_t>;

// Row-major strides of a contiguous tensor: pipeserve::ContiguousStrides
// (graph/op_schema.h).

// Strides of `in` read at the indices of `out` (numpy broadcasting: 0 for
// dims `in` lacks or has as 1).
Strides BroadcastStrides(const Shape& in, const Shape& out);

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
void GatherCopy(const Tensor& in, int64_t base, const Strides& st, Tensor* out);

// A buffer for an op's output: `scratch` when the caller holds its only
// reference and it is large enough, else a new one. Shapes can come from a
// model's attributes (full, arange, expand): kInvalidArgument or
// kResourceExhausted, not a crash, when one is too large.
absl::StatusOr<Tensor> Output(const Shape& shape, DataType type, const Tensor& scratch);

// kInvalidArgument with `what` as the message.
absl::Status Bad(absl::string_view what);

// float16 or bfloat16.
bool IsHalf(DataType t);

// The output and every input are of `type`.
bool AllOfType(DataType type, const std::vector<const Tensor*>& in, DataType out_type);

// `s`, without leading 1s, equals the trailing dims of `out`.
bool IsTrailingBlock(const Shape& s, const Shape& out);

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

// ---- vector loops -----------------------------------------------------------
// Built for the baseline x86-64 and again for AVX2 and AVX-512
// (PIPESERVE_VECTOR_CLONES); what they call is inline. Sums use 16 float
// lanes so they vectorise without reassociating flags.
// Each family keeps its own; these two are shared: n bfloat16 values as
// float32, and back.
void WidenBf16(const uint16_t* a, int64_t n, float* o);
void NarrowToBf16(const float* a, int64_t n, uint16_t* o);

}  // namespace pipeserve::cpu_ops

#endif  // PIPESERVE_RUNTIME_CPU_OPS_INTERNAL_H_
