// The conformance cases: for every op of graph/op_schema.h, one or more
// one-node graphs with inputs to run them on, in each dtype the case
// applies to. Shapes are chosen to reach every code path a kernel may have
// (lengths that are not a multiple of a tile or a vector, partial blocks,
// broadcasting from each side); values to stay in each op's domain (a
// positive divisor, ids within the table). The conformance test runs each
// case on every backend and checks it against ReferenceOp (reference.h);
// the registry test fails for an op without a case.
//
//   for (const ConformanceCase& c : ConformanceCases()) {
//     for (DataType t : c.dtypes) {
//       ASSIGN_OR_RETURN(CaseInstance run, Instantiate(c, t, /*seed=*/7));
//       ... backend->Compile(run.graph, run.weights), Run(run.inputs) ...
#ifndef PIPESERVE_RUNTIME_CONFORMANCE_CASES_H_
#define PIPESERVE_RUNTIME_CONFORMANCE_CASES_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "graph/dtype.h"
#include "graph/shape.h"
#include "proto/model.pb.h"
#include "runtime/model_file.h"
#include "runtime/tensor.h"

namespace pipeserve {

// What an input's values are drawn from.
enum class Values {
  kSigned,    // uniform in (-2, 2)
  kPositive,  // uniform in (0.5, 2): divisors, logs, roots
  kSmallInt,  // whole numbers in [-4, 4] without 0: equal pairs occur
  kIndex,     // whole numbers in [0, high)
  kBool,      // 0 or 1
  kGiven,     // `given`, as they are
};

struct InputSpec {
  std::string name;
  Shape shape;
  Values values = Values::kSigned;
  // The input's type: DT_INVALID for the case's dtype.
  DataType dtype = DT_INVALID;
  int64_t high = 0;            // kIndex
  std::vector<double> given;   // kGiven
  bool param = false;          // a parameter (a `param` node) rather than a graph input
};

struct ConformanceCase {
  std::string name;  // "softmax_dim1", unique
  Node node;         // op and attributes; inputs and outputs filled by Instantiate
  std::vector<InputSpec> inputs;
  std::vector<DataType> dtypes;  // the types it runs in
};

// Every case, in a fixed order.
const std::vector<ConformanceCase>& ConformanceCases();

// A case made concrete in one dtype: its graph (inputs, parameters, the
// node, its one output "out"), the parameters' values and the inputs'.
struct CaseInstance {
  Graph graph;
  WeightMap weights;
  std::vector<Tensor> inputs;  // in graph input order
  Node node;                   // the node as placed in `graph`
  // Every input of the node in order (graph inputs and parameters).
  std::vector<Tensor> node_inputs;
};
absl::StatusOr<CaseInstance> Instantiate(const ConformanceCase& c, DataType dtype, uint32_t seed);

// A tensor of `dtype` holding `values` (rounded to the type).
Tensor TensorOf(const Shape& shape, DataType dtype, const std::vector<double>& values);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CONFORMANCE_CASES_H_
