#include "runtime/cuda/reduction_lowering.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "graph/op_schema.h"

namespace pipeserve {

bool IsReduction(const std::string& op) { return op == "sum" || op == "mean" || op == "amax"; }

absl::StatusOr<kernels::ReduceOp> ReductionOf(const Node& node, const Shape& x) {
  if (x.size() > static_cast<size_t>(kernels::kMaxCopyRank)) {
    return absl::UnimplementedError(absl::StrCat("a reduction over ", x.size(),
                                                 " dims; the cuda kernels take at most ",
                                                 kernels::kMaxCopyRank));
  }
  const std::vector<int64_t> dims = ResolvedInts(node, "dims", {}, 0);
  std::vector<bool> reduce(x.size(), dims.empty());
  for (int64_t d : dims) reduce[*NormalizeDim(d, static_cast<int>(x.size()))] = true;
  kernels::ReduceOp op;
  op.kind = node.op() == "sum"    ? kernels::ReduceKind::kSum
            : node.op() == "mean" ? kernels::ReduceKind::kMean
                                  : kernels::ReduceKind::kAmax;
  op.out_n = op.red_n = 1;
  const std::vector<int64_t> strides = ContiguousStrides(x);
  for (size_t k = 0; k < x.size(); ++k) {  // out and reduced dims in x's order
    if (reduce[k]) {
      op.red_dims[op.red_rank] = x[k];
      op.red_strides[op.red_rank++] = strides[k];
      op.red_n *= x[k];
    } else {
      op.out_dims[op.out_rank] = x[k];
      op.out_strides[op.out_rank++] = strides[k];
      op.out_n *= x[k];
    }
  }
  if (absl::Status s = CheckReductionHasValues(node, x); !s.ok()) return s;
  return op;
}

}  // namespace pipeserve
