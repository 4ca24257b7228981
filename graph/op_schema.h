// The ops a pipeserve graph may use, with their arity, shape rules and cost.
// The exporter (client/python/pipeserve) emits exactly these; the validator,
// the partitioner and every compute backend look ops up here.
//
//   const OpSchema* op = FindOp("linear");
//   ASSIGN_OR_RETURN(std::vector<Shape> out, op->infer(node, {{-1, 512},
//                                                      {256, 512}, {256}}));
//   // out == {{-1, 256}}
//
// Shapes may hold -1, a dimension not known before run time (the batch, a
// sequence length, or a size computed from one): it broadcasts with
// anything. Integer arguments that depend on input sizes (`x.view(B, T, 12,
// 64)`) are rank-0 int64 values made by `size` nodes; an attribute list
// "shape" takes them through "shape_from": entry k > 0 means "the value of
// the node's input k - 1" instead of shape[i] (an int attribute "start"
// likewise through "start_from"). The ops and their attributes are the
// registry in op_schema.cc; the exporter's _ops.py emits them.
#ifndef PIPESERVE_GRAPH_OP_SCHEMA_H_
#define PIPESERVE_GRAPH_OP_SCHEMA_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/model.pb.h"
#include "graph/dtype.h"
#include "graph/shape.h"

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
  // The output's element type for the inputs' types; kInvalidArgument
  // when they do not fit the op. Null: the first input's type.
  std::function<absl::StatusOr<DataType>(
      const Node& node, const std::vector<DataType>& inputs)>
      dtype;
};

// The value of integer-list attribute `name` with its "<name>_from"
// entries (k > 0) replaced by the runtime integers `sym` (sym[k - 1] is the
// value of the node's input k - 1, a rank-0 integer), or by `unknown` when
// `sym` is empty (shape inference before run time).
std::vector<int64_t> ResolvedInts(const Node& node, const std::string& name,
                                  const std::vector<int64_t>& sym,
                                  int64_t unknown);
// An integer attribute, or `fallback` when absent; "<name>_from" > 0 as above.
int64_t IntAttr(const Node& node, const std::string& name, int64_t fallback,
                const std::vector<int64_t>& sym = {}, int64_t unknown = -1);
double FloatAttr(const Node& node, const std::string& name, double fallback);
std::string StringAttr(const Node& node, const std::string& name);

// A copy of `node` with every "<name>_from" attribute applied: entries
// taken from `sym` (sym[i] is the integer value of input i) and the
// "_from" attributes removed. Backends call it at run time.
Node ResolveSymbolic(const Node& node, const std::vector<int64_t>& sym);

// The strided view of a contiguous x of shape `x` that slice (start,
// step) or select (index) reads, `node`'s attributes resolved: the offset
// of its first element and x's strides (in elements) with slice's dim
// stepped or select's dim removed. Every backend copies from it.
struct StridedView {
  int64_t offset = 0;
  std::vector<int64_t> strides;
};
StridedView SliceView(const Node& node, const Shape& x);

// Row-major strides (in elements) of a contiguous tensor of shape `s`.
std::vector<int64_t> ContiguousStrides(const Shape& s);

// `dim` counted from the end when negative; kInvalidArgument outside rank.
absl::StatusOr<int> NormalizeDim(int64_t dim, int rank);

// The schema of `op`, or nullptr if pipeserve does not know it.
const OpSchema* FindOp(absl::string_view op);

// Names of every known op, sorted.
std::vector<std::string> KnownOps();

// The broadcast shape of `a` and `b` (numpy rules), or kInvalidArgument.
absl::StatusOr<Shape> BroadcastShapes(const Shape& a, const Shape& b);

// kInvalidArgument for an amax `node` over `x` whose reduced dimensions
// hold no element while its output has some (PyTorch refuses it: "Expected
// reduction dim to have non-zero size"); dims of -1 (sizes not known
// before run time) pass. Ok for any other op.
absl::Status CheckReductionHasValues(const Node& node, const Shape& x);

// Binary ops take a scalar operand as attribute "scalar" (one tensor input);
// "reverse" = 1 when the scalar is the left operand (`1.0 - x`).
bool HasScalarOperand(const Node& node);

}  // namespace pipeserve

#endif  // PIPESERVE_GRAPH_OP_SCHEMA_H_
