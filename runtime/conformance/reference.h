// Every op of graph/op_schema.h computed naively in float64: the oracle the
// conformance cases (cases.h) check each backend's kernels against. No
// fusion, no blocking, no vector code: each op is the textbook loop over
// its output, so what it computes is easy to check by reading. Integers
// and booleans are held as their values (bool 0/1); float16 and bfloat16
// inputs are widened exactly.
//
//   RefTensor x = ToRef(Tensor::FromVector({2, 3}, {...}));
//   ASSIGN_OR_RETURN(RefTensor y, ReferenceOp(node, {x}));
#ifndef PIPESERVE_RUNTIME_CONFORMANCE_REFERENCE_H_
#define PIPESERVE_RUNTIME_CONFORMANCE_REFERENCE_H_

#include <vector>

#include "absl/status/statusor.h"
#include "graph/dtype.h"
#include "graph/shape.h"
#include "proto/model.pb.h"
#include "runtime/tensor.h"

namespace pipeserve {

struct RefTensor {
  Shape shape;                  // concrete (no -1)
  DataType dtype = DT_FLOAT32;  // the value's type in the graph
  std::vector<double> v;        // row-major, NumElements(shape) values
};

// `t`'s values, widened to double (any dtype).
RefTensor ToRef(const Tensor& t);

// Runs `node` (attributes already resolved: no "<name>_from" entries) on
// `inputs`, which the op's schema accepts. The result's dtype is the
// schema's output type for the inputs' types; integer results (argmax,
// size, casts to int) hold exact integers, bool results 0 or 1, and a cast
// to float16 or bfloat16 rounds to that type (round to nearest even).
// kInvalidArgument naming the problem for inputs the op cannot take (an
// embedding id out of range); kUnimplemented for an op it does not know.
absl::StatusOr<RefTensor> ReferenceOp(const Node& node, const std::vector<RefTensor>& inputs);

// How far `got` is from `want`: ||got - want|| / ||want|| for float
// outputs (infinite where one holds a NaN the other does not: an element
// left unwritten), the fraction of elements that differ for integer and
// bool ones.
double RelativeError(const Tensor& got, const RefTensor& want);

// max |got - want| / max |want| over two float32 tensors of one shape
// (one backend's values against another's); infinity when the shapes
// differ, a NaN is in one and not the other (an element left unwritten:
// the device emulator fills its arenas with NaN) or an infinity in one is
// not the same in the other (infinities count for nothing else).
double MaxRelativeDifference(const Tensor& got, const Tensor& want);

// The error a backend may have computing in `dtype`: 1e-5 for float32,
// 1e-3 for float16, 1e-2 for bfloat16 (integers and bools: none).
double Tolerance(DataType dtype);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CONFORMANCE_REFERENCE_H_
