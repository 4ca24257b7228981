// FusedAttention (cpu_ops.h): attention's matmul, scale, mask, softmax and
// matmul in one pass over blocks of query rows, as the CPU backend fuses
// them in a stage graph. No op of its own in the kernel table.
#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/cpu/ops/internal.h"

namespace pipeserve {
namespace {

using cpu_ops::Bad;
using cpu_ops::BroadcastStrides;
using cpu_ops::Output;
using cpu_ops::Strides;

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

}  // namespace pipeserve
