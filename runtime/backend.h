// The compute backend interface: turns one stage's graph and weights into a
// program that runs it. The CPU backend (cpu_backend.h) interprets the
// graph with oneDNN GEMMs; a GPU backend keeps weights on the device and may
// fuse or capture kernels. Callers (LocalPipeline, the stage server) only
// see this interface.
//
//   std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({.threads = 1});
//   ASSIGN_OR_RETURN(std::unique_ptr<StageProgram> prog,
//                    cpu->Compile(plan.stages(0).graph(), model.weights));
//   ASSIGN_OR_RETURN(std::vector<Tensor> outs, prog->Run({x, y}));
#ifndef PIPESERVE_RUNTIME_BACKEND_H_
#define PIPESERVE_RUNTIME_BACKEND_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "proto/model.pb.h"
#include "runtime/model_file.h"
#include "runtime/tensor.h"

namespace pipeserve {

// The KV cache a cache-aware program keeps (runtime/cpu/kv_cache.h).
struct KvCacheUsage {
  int64_t blocks = 0;            // blocks it may hold (0: no cache)
  int64_t blocks_allocated = 0;  // blocks with memory taken
  int64_t block_bytes = 0;       // bytes of one block over its layers
};

// A compiled stage. One Run at a time per program (a stage server runs each
// program on its own worker thread), unless max_concurrent_runs() says more.
class StageProgram {
 public:
  virtual ~StageProgram() = default;

  // How many Run calls may be in flight at once, from as many threads. Each
  // call is independent (its own inputs and outputs, results as if the
  // calls ran one after another), so a caller may run microbatch i+1 while
  // i is still running: a GPU program then overlaps one's copies with the
  // other's compute. Never make more concurrent calls than this (the CUDA
  // program blocks the extra ones until a run ends, others need not).
  // 1, the default: thread-compatible only, as described above.
  virtual int max_concurrent_runs() const { return 1; }

  // Whether each new set of input shapes costs the program a setup that it
  // caches for a few shapes (the CUDA program: buffers, GEMM plans and a
  // CUDA graph per shape set). A stage server that joins queued
  // microbatches into one run then keeps to few run sizes, so joining does
  // not thrash that cache. false, the default: any batch size is as cheap.
  virtual bool prefers_few_shapes() const { return false; }

  // The program's KV cache now (all 0 without one). Thread-safe, also
  // while Run runs.
  virtual KvCacheUsage kv_cache() const { return {}; }

  // Runs the stage on host tensors given in the order of the stage graph's
  // inputs; returns host tensors in the order of its outputs. The batch
  // dimension (-1 in the graph) may take any size, the same for all inputs.
  // Errors: kInvalidArgument for inputs that do not fit the graph (naming
  // the input), kInternal for a compute failure.
  virtual absl::StatusOr<std::vector<Tensor>> Run(
      absl::Span<const Tensor> inputs) = 0;
};

class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;

  // "cpu", "cuda:0", ...
  virtual std::string Name() const = 0;

  // Compiles `stage_graph` (a graph whose params are all in `weights`,
  // keyed by canonical FQN). The program keeps what it needs of the
  // weights (shares CPU tensors, or copies them to the device once).
  // Errors: kInvalidArgument (invalid graph, missing weight, an op the
  // backend lacks), kResourceExhausted (device memory). Thread-safe.
  virtual absl::StatusOr<std::unique_ptr<StageProgram>> Compile(
      const Graph& stage_graph, const WeightMap& weights) = 0;
};

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_BACKEND_H_
