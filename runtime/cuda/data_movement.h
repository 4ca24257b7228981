// The device plan's shape ops as strided copies (kernels/strided_copy.h):
// permute, slice, select and expand copy their input once; cat and stack
// copy each input into its place in the output. reshape, squeeze and
// unsqueeze are not here: they are views (no copy).
//
//   ASSIGN_OR_RETURN(std::vector<Move> moves, MovesOf(node, {x}, out));
//   // moves[i]: copy from node input moves[i].input with moves[i].copy
#ifndef PIPESERVE_RUNTIME_CUDA_DATA_MOVEMENT_H_
#define PIPESERVE_RUNTIME_CUDA_DATA_MOVEMENT_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "graph/shape.h"
#include "proto/model.pb.h"
#include "runtime/cuda/kernels/launch_args.h"

namespace pipeserve {

struct Move {
  int input = 0;  // which of the node's inputs it reads
  kernels::StridedCopyOp copy;
};

// Whether `op` is a copying shape op MovesOf lowers.
bool IsMovement(const std::string& op);
// Whether `op` is a view of its first input (reshape, squeeze, unsqueeze).
bool IsView(const std::string& op);

// The copies that compute `node` (attributes resolved: no "_from") from
// inputs of shapes `in` into a contiguous output of shape `out` (all
// shapes concrete and checked by the op's schema). Copies with nothing to
// move are left out. kUnimplemented for more than kMaxCopyRank dims.
absl::StatusOr<std::vector<Move>> MovesOf(const Node& node, const std::vector<Shape>& in,
                                          const Shape& out);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_DATA_MOVEMENT_H_
