// Validation of a pipeserve graph before it is cut or run.
//
//   ASSIGN_OR_RETURN(ValueShapes shapes, ValidateGraph(model.graph));
//   shapes.at("linear_1")  // {-1, 512}: batch dimension, then 512
//
// Every failure is kInvalidArgument with a message naming the node, value,
// input or parameter that is wrong.
#ifndef PIPESERVE_GRAPH_VALIDATE_H_
#define PIPESERVE_GRAPH_VALIDATE_H_

#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "proto/model.pb.h"
#include "graph/dtype.h"
#include "graph/shape.h"

namespace pipeserve {

// The shape of every value: model inputs, node outputs (param outputs too).
using ValueShapes = absl::flat_hash_map<std::string, Shape>;
// The element type of every value.
using ValueTypes = absl::flat_hash_map<std::string, DataType>;

// Checks, in order: model inputs (unique names, a valid dtype, batched
// inputs have dim 0 = -1); parameters (unique FQNs, a valid dtype,
// byte_size matching the shape); nodes (unique names, known op, arity, each value defined once,
// every input defined by an earlier node or a model input — a cycle is
// reported as one — `param` nodes naming a stored parameter); shapes and
// dtypes (each op's rules); model outputs (defined). Returns the inferred
// shapes (-1 where only the run decides) and, when `types` is given,
// fills it with the inferred dtypes.
absl::StatusOr<ValueShapes> ValidateGraph(const Graph& graph,
                                          ValueTypes* types = nullptr);

}  // namespace pipeserve

#endif  // PIPESERVE_GRAPH_VALIDATE_H_
