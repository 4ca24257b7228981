// Elementwise ops as programs of kernels/elementwise_program.h, with
// broadcasting: one op (div, pow, maximum, minimum, the comparisons,
// where: ProgramOf), or a chain of elementwise ops fused into one kernel
// (ProgramBuilder, which the device plan drives).
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

// div, floordiv, pow, maximum, minimum, the comparisons and where.
bool IsProgramOp(const std::string& op);

// Builds one program for an output of shape `out`, instruction by
// instruction; each returns its result's register, or -1 once the program
// is full (kMaxProgramOps instructions, kMaxProgramInputs inputs, or more
// than kMaxCopyRank dims): the caller then runs the ops one by one.
class ProgramBuilder {
 public:
  ProgramBuilder(const Shape& out, DataType out_type);

  // Input `key` (any number naming a buffer) of shape `shape` (broadcast to
  // the output's) and type `type` (float32 or bool), loaded once: a second
  // call returns the same register.
  int Input(int key, const Shape& shape, DataType type);
  int Const(float value);
  int Unary(kernels::UnaryKind kind, int a);
  int Op(kernels::EwCode code, int a, int b, int c = 0);
  // `node`'s op on the registers of its tensor inputs (add, sub, mul and
  // the program ops; a scalar operand from its "scalar" and "reverse").
  int NodeOp(const Node& node, const std::vector<int>& in);

  bool full() const { return full_; }
  // The inputs' keys, in the order the program's pointers take them.
  const std::vector<int>& keys() const { return keys_; }
  // The program, its last instruction's register the output.
  const kernels::ElementwiseProgramOp& program() const { return p_; }

 private:
  int Add(kernels::EwInstr op);
  kernels::ElementwiseProgramOp p_;
  std::vector<int> keys_;
  std::vector<int> loaded_;  // by input slot: the register holding it
  Shape out_;
  bool full_ = false;
};

// The program computing `node` alone from inputs of shapes `in` and types
// `types` (float32, or bool for where's condition) into a contiguous
// output of `out` (float32, or bool for a comparison). kUnimplemented for
// more than kMaxCopyRank dims.
absl::StatusOr<kernels::ElementwiseProgramOp> ProgramOf(const Node& node,
                                                        const std::vector<Shape>& in,
                                                        const std::vector<DataType>& types,
                                                        const Shape& out, DataType out_type);

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_ELEMENTWISE_LOWERING_H_
