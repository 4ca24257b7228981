#include "graph/validate.h"

#include <algorithm>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "graph/dtype.h"

namespace pipeserve {
namespace {

template <typename... Args>
absl::Status Invalid(const Args&... parts) {
  return absl::InvalidArgumentError(absl::StrCat(parts...));
}

std::string NodeLabel(const Node& node) {
  return absl::StrCat("node \"", node.name(), "\" (", node.op(), ")");
}

absl::Status CheckInputs(const Graph& graph, ValueShapes* shapes,
                         ValueTypes* types) {
  for (const ValueSpec& in : graph.inputs()) {
    if (in.name().empty()) return Invalid("a model input has no name");
    if (shapes->contains(in.name())) {
      return Invalid("duplicate model input name \"", in.name(), "\"");
    }
    if (!IsValidDataType(in.dtype())) {
      return Invalid("input \"", in.name(), "\": dtype ", TorchName(in.dtype()),
                     " is not supported");
    }
    Shape shape(in.shape().begin(), in.shape().end());
    if (in.batched() && (shape.empty() || shape[0] != -1)) {
      return Invalid("input \"", in.name(), "\": a batched input needs ",
                     "dim 0 = -1 (batch), got ", ShapeToString(shape));
    }
    Shape one_row = shape;
    for (int64_t& d : one_row) {
      if (d < -1) {
        return Invalid("input \"", in.name(), "\": invalid dimension ", absl::StrCat(d),
                       " (-1 is a free dimension)");
      }
      if (d == -1) d = 1;
    }
    (*types)[in.name()] = in.dtype();
    absl::Status size = CheckedByteSize(one_row, ElementSize(in.dtype())).status();
    if (!size.ok()) return Invalid("input \"", in.name(), "\": ", size.message());
    (*shapes)[in.name()] = std::move(shape);
  }
  return absl::OkStatus();
}

absl::Status CheckParams(const Graph& graph,
                         absl::flat_hash_map<std::string, Shape>* params,
                         absl::flat_hash_map<std::string, DataType>* param_types) {
  for (const TensorInfo& p : graph.params()) {
    if (params->contains(p.fqn())) {
      return Invalid("duplicate parameter \"", p.fqn(), "\"");
    }
    if (!IsValidDataType(p.dtype())) {
      return Invalid("parameter \"", p.fqn(), "\": dtype ", TorchName(p.dtype()),
                     " is not supported");
    }
    Shape shape(p.shape().begin(), p.shape().end());
    absl::StatusOr<uint64_t> size = CheckedByteSize(shape, ElementSize(p.dtype()));
    if (!size.ok()) return Invalid("parameter \"", p.fqn(), "\": ", size.status().message());
    const uint64_t expected = *size;
    if (p.byte_size() != expected) {
      return Invalid("parameter \"", p.fqn(), "\": byte_size ",
                     absl::StrCat(p.byte_size()), " does not match shape ",
                     ShapeToString(shape),
                     absl::StrCat(" (", expected, " bytes of ", TorchName(p.dtype()), ")"));
    }
    (*params)[p.fqn()] = std::move(shape);
    (*param_types)[p.fqn()] = p.dtype();
  }
  return absl::OkStatus();
}

// Called when nodes[user] reads `value`, made by nodes[producer] at or after
// `user`: either a cycle or nodes out of topological order.
absl::Status ForwardReference(const Graph& graph, int user, int producer,
                              const std::string& value,
                              const absl::flat_hash_map<std::string, int>&
                                  producer_of) {
  // Depth-first search from the producer back through its inputs; reaching
  // `user` closes a cycle. Iterative: a graph may be a million nodes deep.
  std::vector<int> path;
  absl::flat_hash_map<int, int> parent;  // node -> the node that reached it
  std::vector<int> stack = {producer};
  parent[producer] = -1;
  bool found = false;
  while (!stack.empty() && !found) {
    int n = stack.back();
    stack.pop_back();
    if (n == user) {
      found = true;
      for (int at = n; at != -1; at = parent[at]) path.push_back(at);
      std::reverse(path.begin(), path.end());
      break;
    }
    for (const std::string& in : graph.nodes(n).inputs()) {
      auto it = producer_of.find(in);
      if (it != producer_of.end() && parent.emplace(it->second, n).second) {
        stack.push_back(it->second);
      }
    }
  }
  if (found) {
    std::vector<std::string> names;
    names.push_back(graph.nodes(user).name());
    for (int n : path) names.push_back(graph.nodes(n).name());
    if (names.size() > 12) {  // a cycle may be a million nodes long
      size_t total = names.size();
      names.erase(names.begin() + 6, names.end() - 5);
      names.insert(names.begin() + 6, absl::StrCat("... (", total, " nodes) ..."));
    }
    return Invalid("cycle: ", absl::StrJoin(names, " <- "));
  }
  return Invalid(NodeLabel(graph.nodes(user)), ": uses value \"", value,
                 "\" before node \"", graph.nodes(producer).name(),
                 "\" defines it (nodes must be in topological order)");
}

// Where each value is made, to tell undefined values from cycles; every
// node named, once, and every value defined once.
absl::Status FindProducers(const Graph& graph, const ValueShapes& inputs,
                           absl::flat_hash_map<std::string, int>* producer_of) {
  absl::flat_hash_set<std::string> node_names;
  for (int i = 0; i < graph.nodes_size(); ++i) {
    const Node& node = graph.nodes(i);
    if (node.name().empty()) {
      return Invalid("node #", absl::StrCat(i), " (", node.op(), ") has no name");
    }
    if (!node_names.insert(node.name()).second) {
      return Invalid("duplicate node name \"", node.name(), "\"");
    }
    for (const std::string& out : node.outputs()) {
      if (inputs.contains(out) || producer_of->contains(out)) {
        return Invalid(NodeLabel(node), ": value \"", out, "\" is defined more than once");
      }
      (*producer_of)[out] = i;
    }
  }
  return absl::OkStatus();
}

// The node's op, known and with as many inputs and outputs as it takes.
absl::StatusOr<const OpSchema*> SchemaOf(const Node& node) {
  const OpSchema* op = FindOp(node.op());
  if (op == nullptr) {
    return Invalid(NodeLabel(node), ": unknown op \"", node.op(),
                   "\" (known: " + absl::StrJoin(KnownOps(), ", ") + ")");
  }
  int n_in = node.inputs_size();
  if (n_in < op->min_inputs || n_in > op->max_inputs || node.outputs_size() != op->num_outputs) {
    return Invalid(NodeLabel(node),
                   absl::StrCat(": expects ", op->min_inputs,
                                op->min_inputs == op->max_inputs
                                    ? std::string()
                                    : absl::StrCat("-", op->max_inputs),
                                " inputs and ", op->num_outputs, " outputs, got ", n_in, " and ",
                                node.outputs_size()));
  }
  return op;
}

// Walks the nodes in order, giving each value its shape and type.
class ShapeWalk {
 public:
  ShapeWalk(const Graph& graph, const absl::flat_hash_map<std::string, int>& producer_of,
            const absl::flat_hash_map<std::string, Shape>& params,
            const absl::flat_hash_map<std::string, DataType>& param_types)
      : graph_(graph), producer_of_(producer_of), params_(params), param_types_(param_types) {}

  // Node i's outputs into shapes and types.
  absl::Status Visit(int i, ValueShapes* shapes, ValueTypes* types) const {
    const Node& node = graph_.nodes(i);
    ASSIGN_OR_RETURN(const OpSchema* op, SchemaOf(node));
    std::vector<Shape> in_shapes;
    std::vector<DataType> in_types;
    for (const std::string& in : node.inputs()) {
      auto it = shapes->find(in);
      if (it == shapes->end()) return Undefined(i, in);
      in_shapes.push_back(it->second);
      in_types.push_back(types->at(in));
    }
    std::vector<Shape> out_shapes;
    DataType out_type = in_types.empty() ? DT_FLOAT32 : in_types[0];
    if (node.op() == kParamOp) {
      ASSIGN_OR_RETURN(const std::string* fqn, ParamOf(node));
      out_shapes.push_back(params_.at(*fqn));
      out_type = param_types_.at(*fqn);
    } else {
      absl::StatusOr<std::vector<Shape>> inferred = op->infer(node, in_shapes);
      if (!inferred.ok()) return Invalid(NodeLabel(node), ": ", inferred.status().message());
      out_shapes = *std::move(inferred);
      if (op->dtype != nullptr) {
        absl::StatusOr<DataType> t = op->dtype(node, in_types);
        if (!t.ok()) return Invalid(NodeLabel(node), ": ", t.status().message());
        out_type = *t;
      }
    }
    for (int k = 0; k < node.outputs_size(); ++k) {
      RETURN_IF_ERROR(CheckInferred(node, out_shapes[k]));
      (*shapes)[node.outputs(k)] = out_shapes[k];
      (*types)[node.outputs(k)] = out_type;
    }
    return absl::OkStatus();
  }

  // An inferred shape within kMaxRank dims and kMaxElements elements (a
  // free dim counted as 1), as a tensor of it must be: a chain of 100,000
  // unsqueezes (a 4.7 MB upload) held 5e9 dims, and a reshape whose size
  // overflowed read far past its input.
  static absl::Status CheckInferred(const Node& node, Shape shape) {
    for (int64_t& d : shape) d = std::max<int64_t>(d, 1);
    absl::StatusOr<uint64_t> n = CheckedElementCount(shape);
    if (!n.ok()) return Invalid(NodeLabel(node), ": its output ", n.status().message());
    return absl::OkStatus();
  }

 private:
  // Node i reads `in` before it is made, or it is made nowhere.
  absl::Status Undefined(int i, const std::string& in) const {
    auto p = producer_of_.find(in);
    if (p != producer_of_.end()) return ForwardReference(graph_, i, p->second, in, producer_of_);
    return Invalid(NodeLabel(graph_.nodes(i)), ": input \"", in,
                   "\" is not defined by any node or model input");
  }

  // A param node's FQN, one of the model's parameters.
  absl::StatusOr<const std::string*> ParamOf(const Node& node) const {
    auto attr = node.attrs().find("fqn");
    if (attr == node.attrs().end() || attr->second.s().empty()) {
      return Invalid(NodeLabel(node), ": missing attribute \"fqn\"");
    }
    if (!params_.contains(attr->second.s())) {
      return Invalid(NodeLabel(node), ": parameter \"", attr->second.s(),
                     "\" is missing from the model's parameters");
    }
    return &attr->second.s();
  }

  const Graph& graph_;
  const absl::flat_hash_map<std::string, int>& producer_of_;
  const absl::flat_hash_map<std::string, Shape>& params_;
  const absl::flat_hash_map<std::string, DataType>& param_types_;
};

}  // namespace

absl::StatusOr<ValueShapes> ValidateGraph(const Graph& graph, ValueTypes* types_out) {
  ValueShapes shapes;
  ValueTypes types;
  RETURN_IF_ERROR(CheckInputs(graph, &shapes, &types));
  absl::flat_hash_map<std::string, Shape> params;
  absl::flat_hash_map<std::string, DataType> param_types;
  RETURN_IF_ERROR(CheckParams(graph, &params, &param_types));
  absl::flat_hash_map<std::string, int> producer_of;
  RETURN_IF_ERROR(FindProducers(graph, shapes, &producer_of));
  const ShapeWalk walk(graph, producer_of, params, param_types);
  for (int i = 0; i < graph.nodes_size(); ++i) RETURN_IF_ERROR(walk.Visit(i, &shapes, &types));
  if (graph.outputs().empty()) return Invalid("the model has no outputs");
  for (const std::string& out : graph.outputs()) {
    if (!shapes.contains(out)) {
      return Invalid("model output \"", out, "\" is not defined by any node or model input");
    }
  }
  if (types_out != nullptr) *types_out = std::move(types);
  return shapes;
}

}  // namespace pipeserve
