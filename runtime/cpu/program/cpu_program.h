// The CPU backend's StageProgram: a stage graph validated and compiled into
// steps (compile.h), then run step by step with the kernels of
// cpu_kernels.h and cpu_ops.h, each step's output buffer kept for the next
// run within a budget. With PIPESERVE_CPU_PROFILE=1 it prints time per op
// to stderr when destroyed. MakeCpuBackend (cpu_backend.h) compiles with
// it. Internal to //runtime/cpu:cpu_backend.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<StageProgram> program,
//                    MakeCpuProgram(graph, weights, options));
//   ASSIGN_OR_RETURN(std::vector<Tensor> outputs, program->Run(inputs));
#ifndef PIPESERVE_RUNTIME_CPU_PROGRAM_CPU_PROGRAM_H_
#define PIPESERVE_RUNTIME_CPU_PROGRAM_CPU_PROGRAM_H_

#include <memory>

#include "absl/status/statusor.h"
#include "proto/model.pb.h"
#include "runtime/backend.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/model_file.h"

namespace pipeserve::cpu_program {

// Validates and compiles `graph` with `weights`: kInvalidArgument for a
// graph ValidateGraph refuses, a parameter with no loaded weights or an op
// the CPU backend has no kernel for. The program keeps its own copy of the
// graph. One Run at a time (max_concurrent_runs() is 1); a Run that runs
// out of memory fails with kResourceExhausted.
absl::StatusOr<std::unique_ptr<StageProgram>> MakeCpuProgram(const Graph& graph,
                                                             const WeightMap& weights,
                                                             const CpuBackendOptions& options);

}  // namespace pipeserve::cpu_program

#endif  // PIPESERVE_RUNTIME_CPU_PROGRAM_CPU_PROGRAM_H_
