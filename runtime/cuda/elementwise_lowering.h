// The device plan's elementwise ops beyond add, sub and mul (which keep
// their GPU-confirmed kernels): each becomes a program of
// kernels/elementwise_program.h, with broadcasting.
//
//   ASSIGN_OR_RETURN(kernels::ElementwiseProgramOp p,
//                    ProgramOf(node, {x.shape, y.shape}, {DT_FLOAT32, DT_FLOAT32},
//                              out_shape, DT_BOOL));
#ifndef PIPESERVE_RUNTIME_CUDA_ELEMENTWISE_LOWERING_H_
#define PIPESERVE_RUNTIME_CUDA_ELEMENTWISE_LOWERING_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "graph/dtype.h"
#include "graph/shape.h"
#include "proto/model.pb.h"
#include "runtime/cuda/kernels/launch_args.h"

namespace pipeserve {

// div, pow, maximum, minimum, the comparisons and where.
bool IsProgramOp(const std::string& op);

// The program computing `node` (a scalar operand from its "scalar" and
// "reverse" attributes) from inputs of shapes `in` and types `types`
// (float32, or bool for where's condition) into a contiguous output of
// `out` (float32, or bool for a comparison). kUnimplemented for more than
// kMaxCopyRank dims.
absl::StatusOr<kernels::ElementwiseProgramOp> ProgramOf(const Node& node,
                                                        const std::vector<Shape>& in,
                                                        const std::vector<DataType>& types,
                                                        const Shape& out, DataType out_type);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_ELEMENTWISE_LOWERING_H_
