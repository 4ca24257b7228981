// sum, mean and amax in the device plan: the kernels/reduction.h launch
// for a node over an input shape.
//
//   ASSIGN_OR_RETURN(kernels::ReduceOp op, ReductionOf(node, {2, 7, 32}));
#ifndef PIPESERVE_RUNTIME_CUDA_REDUCTION_LOWERING_H_
#define PIPESERVE_RUNTIME_CUDA_REDUCTION_LOWERING_H_

#include <string>

#include "absl/status/statusor.h"
#include "graph/shape.h"
#include "proto/model.pb.h"
#include "runtime/cuda/kernels/launch_args.h"

namespace pipeserve {

bool IsReduction(const std::string& op);

// The reduction of `node` (attributes resolved: dims, empty for all;
// keepdim only shapes the output) over x of shape `x`. kUnimplemented for
// more than kMaxCopyRank dims.
absl::StatusOr<kernels::ReduceOp> ReductionOf(const Node& node, const Shape& x);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_REDUCTION_LOWERING_H_
