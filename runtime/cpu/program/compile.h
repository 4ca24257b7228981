// How the CPU backend compiles a stage graph into steps (steps.h): one step
// per node, on a float32 fast path where one applies; a ReLU fused into the
// linear before it; constant linear weights transposed once; then the
// fusion passes of fusion.h; and per step the values it reads last.
// Internal to //runtime/cpu:cpu_backend.
//
//   ValueTypes types;
//   ASSIGN_OR_RETURN(ValueShapes shapes, ValidateGraph(graph, &types));
//   CompiledStage stage;
//   RETURN_IF_ERROR(CompileSteps(graph, weights, shapes, types, options, &stage));
#ifndef PIPESERVE_RUNTIME_CPU_PROGRAM_COMPILE_H_
#define PIPESERVE_RUNTIME_CPU_PROGRAM_COMPILE_H_

#include "absl/status/status.h"
#include "graph/validate.h"
#include "proto/model.pb.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/cpu/program/steps.h"
#include "runtime/model_file.h"

namespace pipeserve::cpu_program {

// Compiles `graph`, validated (`shapes` and `types` are ValidateGraph's),
// with `weights` into *stage, whose steps point into `graph`: it must
// outlive them. kInvalidArgument naming a parameter with no loaded weights
// or an op the CPU backend has no kernel for.
absl::Status CompileSteps(const Graph& graph, const WeightMap& weights,
                          const ValueShapes& shapes, const ValueTypes& types,
                          const CpuBackendOptions& options, CompiledStage* stage);

}  // namespace pipeserve::cpu_program

#endif  // PIPESERVE_RUNTIME_CPU_PROGRAM_COMPILE_H_
