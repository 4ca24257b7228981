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

// One FusedAttention call: q [batch..., Tq, D], k [batch..., Tk, D], v
// [batch..., Tk, Dv] into out, one batch index at a time, in blocks of
// kRows query rows. float16/bfloat16: one batch index of q, k and v
// widened at a time, and each block of output rows rounded back.
class AttentionRun {
 public:
  static constexpr int64_t kRows = 64;

  AttentionRun(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
               const AttentionMask& mask, Tensor* out)
      : q_(q), k_(k), v_(v), scale_(scale), mask_(mask), out_(*out), r_(q.rank()),
        tq_(q.dim(r_ - 2)), d_(q.dim(r_ - 1)), tk_(k.dim(r_ - 2)), dv_(v.dim(r_ - 1)),
        batch_(out->shape().begin(), out->shape().end() - 2),
        wide_(q.dtype() == DT_FLOAT32) {
    Shape scores = batch_;
    scores.push_back(tq_);
    scores.push_back(tk_);
    // Masks index [batch..., Tq, Tk] through broadcast strides.
    if (mask.add != nullptr) add_ = ToFloat32(*mask.add);
    if (mask.cond != nullptr) cond_st_ = BroadcastStrides(mask.cond->shape(), scores);
    if (mask.add != nullptr) add_st_ = BroadcastStrides(add_.shape(), scores);
    s_block_.resize(static_cast<size_t>(std::min(tq_, kRows) * tk_));
    if (!wide_) {
      qf_.resize(tq_ * d_);
      kf_.resize(tk_ * d_);
      vf_.resize(tk_ * dv_);
      of_.resize(std::min(tq_, kRows) * dv_);
    }
  }

  int64_t batches() const { return NumElements(batch_); }

  absl::Status Batch(int64_t b) {
    const float* qb = wide_ ? q_.data() + b * tq_ * d_ : qf_.data();
    const float* kb = wide_ ? k_.data() + b * tk_ * d_ : kf_.data();
    const float* vb = wide_ ? v_.data() + b * tk_ * dv_ : vf_.data();
    if (!wide_) {
      const DataType type = q_.dtype();
      Widen16(type, q_.data_as<uint16_t>() + b * tq_ * d_, tq_ * d_, qf_.data());
      Widen16(type, k_.data_as<uint16_t>() + b * tk_ * d_, tk_ * d_, kf_.data());
      Widen16(type, v_.data_as<uint16_t>() + b * tk_ * dv_, tk_ * dv_, vf_.data());
    }
    for (int64_t r0 = 0; r0 < tq_; r0 += kRows) {
      const int64_t m = std::min(kRows, tq_ - r0);
      float* sb = s_block_.data();
      RETURN_IF_ERROR(Gemm(true, m, tk_, d_, qb + r0 * d_, kb, 0.0f, sb));
      Softmax(b, r0, m, sb);
      float* ob = wide_ ? out_.data() + (b * tq_ + r0) * dv_ : of_.data();
      RETURN_IF_ERROR(Gemm(false, m, dv_, tk_, sb, vb, 0.0f, ob));
      if (!wide_) {
        Narrow16(q_.dtype(), ob, m * dv_, out_.data_as<uint16_t>() + (b * tq_ + r0) * dv_);
      }
    }
    return absl::OkStatus();
  }

 private:
  // Scores rows r0 .. r0+m-1 of batch index b (in sb): scaled, masked and
  // softmaxed in place.
  void Softmax(int64_t b, int64_t r0, int64_t m, float* sb) const {
    // Offsets of this batch index in the masks.
    const int64_t cond_base = mask_.cond == nullptr ? 0 : BatchOffset(b, batch_, cond_st_);
    const int64_t add_base = mask_.add == nullptr ? 0 : BatchOffset(b, batch_, add_st_);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t qi = r0 + i;
      const uint8_t* cond =
          mask_.cond == nullptr
              ? nullptr
              : mask_.cond->data_as<uint8_t>() + cond_base + qi * cond_st_[r_ - 2];
      const float* added =
          mask_.add == nullptr ? nullptr : add_.data() + add_base + qi * add_st_[r_ - 2];
      ScaleMaskRow(sb + i * tk_, tk_, scale_, cond, cond == nullptr ? 0 : cond_st_[r_ - 1],
                   mask_.fill, added, added == nullptr ? 0 : add_st_[r_ - 1]);
      SoftmaxRow(sb + i * tk_, tk_);
    }
  }

  const Tensor& q_;
  const Tensor& k_;
  const Tensor& v_;
  const float scale_;
  const AttentionMask& mask_;
  Tensor& out_;
  const int r_;
  const int64_t tq_, d_, tk_, dv_;
  const Shape batch_;
  const bool wide_;
  Tensor add_;
  Strides cond_st_, add_st_;
  std::vector<float> s_block_, qf_, kf_, vf_, of_;
};

}  // namespace

absl::StatusOr<Tensor> FusedAttention(const Tensor& q_in, const Tensor& k_in,
                                      const Tensor& v_in, float scale,
                                      const AttentionMask& mask, const Tensor& scratch) {
  ASSIGN_OR_RETURN(Shape out_shape, AttentionShape(q_in, k_in, v_in));
  ASSIGN_OR_RETURN(Tensor out, Output(out_shape, q_in.dtype(), scratch));
  if (out.numel() == 0) return out;  // nothing to write (see RunCpuOp)
  AttentionRun run(q_in, k_in, v_in, scale, mask, &out);
  for (int64_t b = 0; b < run.batches(); ++b) RETURN_IF_ERROR(run.Batch(b));
  return out;
}

}  // namespace pipeserve
