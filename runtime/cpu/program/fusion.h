// The CPU backend's graph-level fusions: passes over a compiled stage's
// steps (steps.h) that each find a pattern by walking back from a step
// through the producers of its inputs, turn one step of it into a fused
// step and mark the others kSkip. CompileSteps (compile.h) runs them, in
// this order, as CpuBackendOptions asks. Internal to
// //runtime/cpu:cpu_backend.
//
//   if (options.fuse_attention) FuseAttention(shapes, types, &stage);
//   if (options.fuse_elementwise) FuseNorms(shapes, types, &stage);
//   if (options.fuse_elementwise) FuseElementwise(shapes, types, &stage);
#ifndef PIPESERVE_RUNTIME_CPU_PROGRAM_FUSION_H_
#define PIPESERVE_RUNTIME_CPU_PROGRAM_FUSION_H_

#include "graph/validate.h"
#include "runtime/cpu/program/steps.h"

namespace pipeserve::cpu_program {

// Finds matmul(q, k^T) -> [mul/div by a number] -> [where(mask, c, .) or
// + mask] -> softmax(-1) -> matmul(., v), every value in between read
// once (identities and casts seen through), and turns the last matmul
// into one kAttention step; the others become kSkip.
void FuseAttention(const ValueShapes& shapes, const ValueTypes& types, CompiledStage* stage);

// Finds each layer_norm and each RMSNorm pattern (float32, bfloat16 or
// float16, one dtype throughout) and runs it as one kNorm step. When its
// input is made by add(x, residual) (x of the sum's shape, the residual
// of it or of its trailing dims; the norm's weight and bias made before
// the add), the add joins: the pre-norm transformer's residual stream,
// where the sum is read again later. A lone layer_norm is left as it is
// (it is one pass already).
void FuseNorms(const ValueShapes& shapes, const ValueTypes& types, CompiledStage* stage);

// Groups elementwise float ops (ElementwiseGroup::Fusable) of one shape
// whose values between them have no other reader into one kElementwise
// step at the last of them.
void FuseElementwise(const ValueShapes& shapes, const ValueTypes& types, CompiledStage* stage);

}  // namespace pipeserve::cpu_program

#endif  // PIPESERVE_RUNTIME_CPU_PROGRAM_FUSION_H_
