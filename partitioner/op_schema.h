// The ops a pipeserve graph may use, with their arity, shape rules and cost.
// The exporter (client/python/pipeserve) emits exactly these; the validator,
// the partitioner and every compute backend look ops up here.
//
//   const OpSchema* op = FindOp("linear");
//   ASSIGN_OR_RETURN(std::vector<Shape> out, op->infer(node, {{-1, 512},
//                                                      {256, 512}, {256}}));
//   // out == {{-1, 256}}
//
// Shapes may hold -1, the batch dimension, which broadcasts only with 1 or
// with itself.
#ifndef PIPESERVE_PARTITIONER_OP_SCHEMA_H_
#define PIPESERVE_PARTITIONER_OP_SCHEMA_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/model.pb.h"
#include "runtime/tensor.h"

namespace pipeserve {

// Ops the partitioner treats specially.
inline constexpr absl::string_view kParamOp = "param";
inline constexpr absl::string_view kPipeSplitOp = "pipe_split";

struct OpSchema {
  std::string name;
  int min_inputs = 0;
  int max_inputs = 0;
  int num_outputs = 1;
  // Output shapes for the given input shapes; kInvalidArgument (without the
  // node's name: the caller adds it) when they do not fit the op.
  std::function<absl::StatusOr<std::vector<Shape>>(
      const Node& node, const std::vector<Shape>& inputs)>
      infer;
  // Floating-point operations for concrete input shapes.
  std::function<double(const std::vector<Shape>& inputs)> flops;
};

// The schema of `op`, or nullptr if pipeserve does not know it.
const OpSchema* FindOp(absl::string_view op);

// Names of every known op, sorted.
std::vector<std::string> KnownOps();

// The broadcast shape of `a` and `b` (numpy rules), or kInvalidArgument.
absl::StatusOr<Shape> BroadcastShapes(const Shape& a, const Shape& b);

// Binary ops take a scalar operand as attribute "scalar" (one tensor input);
// "reverse" = 1 when the scalar is the left operand (`1.0 - x`).
bool HasScalarOperand(const Node& node);

}  // namespace pipeserve

#endif  // PIPESERVE_PARTITIONER_OP_SCHEMA_H_
