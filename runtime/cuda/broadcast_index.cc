#include "runtime/cuda/broadcast_index.h"

#include <cstddef>

namespace pipeserve {
namespace {

// Row-major strides of `shape` aligned to the right of a rank-`rank` output,
// 0 for dimensions the operand lacks or holds once (size 1). Returns false
// when a dimension neither matches the output's nor is 1.
bool OperandStrides(const std::vector<int64_t>& shape,
                    const std::vector<int64_t>& out_shape,
                    std::vector<int64_t>* strides) {
  const size_t rank = out_shape.size();
  if (shape.size() > rank) return false;
  strides->assign(rank, 0);
  int64_t stride = 1;
  for (size_t k = 0; k < shape.size(); ++k) {
    size_t s = shape.size() - 1 - k;  // operand dim, from the right
    size_t o = rank - 1 - k;          // output dim it lines up with
    if (shape[s] == out_shape[o]) {
      (*strides)[o] = shape[s] == 1 ? 0 : stride;
    } else if (shape[s] != 1) {
      return false;
    }
    stride *= shape[s];
  }
  return true;
}

}  // namespace

bool MakeBroadcastIndex(const std::vector<int64_t>& a_shape,
                        const std::vector<int64_t>& b_shape,
                        const std::vector<int64_t>& out_shape,
                        BroadcastIndex* out) {
  std::vector<int64_t> as, bs;
  if (!OperandStrides(a_shape, out_shape, &as) ||
      !OperandStrides(b_shape, out_shape, &bs)) {
    return false;
  }
  // Drop size-1 output dimensions, then merge neighbours that both operands
  // walk contiguously (or both repeat): dim i folds into i+1 when
  // stride[i] == stride[i+1] * dims[i+1] for a and for b.
  std::vector<int64_t> dims, sa, sb;
  for (size_t d = 0; d < out_shape.size(); ++d) {
    if (out_shape[d] == 1) continue;
    if (!dims.empty() && sa.back() == as[d] * out_shape[d] &&
        sb.back() == bs[d] * out_shape[d]) {
      dims.back() *= out_shape[d];
      sa.back() = as[d];
      sb.back() = bs[d];
      continue;
    }
    dims.push_back(out_shape[d]);
    sa.push_back(as[d]);
    sb.push_back(bs[d]);
  }
  if (dims.size() > static_cast<size_t>(kMaxBroadcastRank)) return false;
  *out = BroadcastIndex();
  out->rank = static_cast<int>(dims.size());
  for (size_t d = 0; d < dims.size(); ++d) {
    out->dims[d] = dims[d];
    out->a_stride[d] = sa[d];
    out->b_stride[d] = sb[d];
  }
  return true;
}

}  // namespace pipeserve
