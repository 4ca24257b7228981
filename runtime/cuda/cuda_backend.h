// The CUDA compute backend: a stage's weights live on one GPU, GEMMs run
// through cuBLASLt (bias and ReLU fused as epilogues), elementwise ops as
// CUDA kernels, and each input shape set's work is captured once in a CUDA
// graph and replayed. What it executes is decided by device_plan.h.
//
//   CudaBackendOptions opts;
//   opts.device = 0;
//   opts.precision = Precision::kTF32;
//   ASSIGN_OR_RETURN(std::unique_ptr<ComputeBackend> gpu,
//   MakeCudaBackend(opts)); ASSIGN_OR_RETURN(auto prog,
//   gpu->Compile(stage_graph, weights)); ASSIGN_OR_RETURN(std::vector<Tensor>
//   out, prog->Run({x}));
//
// A Run: take a free slot -> host inputs -> the slot's pinned staging
// (converted to bfloat16 there when only GEMMs read them) -> async copies
// on the slot's own stream -> ops -> async copies back -> one stream
// synchronize -> host tensors. The first run of a shape set on a slot is
// issued op by op; later runs replay a CUDA graph of the whole sequence
// (copies included). Concurrent Run calls (up to concurrent_runs) go to
// different slots, so one's copies overlap another's kernels.
//
// This header needs no CUDA headers: builds without --config=cuda link a
// stub whose MakeCudaBackend fails with kFailedPrecondition.
#ifndef PIPESERVE_RUNTIME_CUDA_CUDA_BACKEND_H_
#define PIPESERVE_RUNTIME_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/backend.h"
#include "runtime/cuda/kernel_gate.h"
#include "runtime/precision.h"

namespace pipeserve {

struct CudaBackendOptions {
  // CUDA device index (as cudaSetDevice counts them).
  int device = 0;
  // GEMM arithmetic: float32 (default), TF32 tensor cores, or bfloat16
  // operands with float32 accumulation (see precision.h).
  Precision precision = Precision::kFloat32;
  // Capture each input shape set's work in a CUDA graph and replay it.
  bool use_cuda_graphs = true;
  // Fuse `relu(linear(...))` into the GEMM's epilogue when the linear's
  // output has no other reader.
  bool fuse_linear_relu = true;
  // Kernels a GPU has not confirmed yet run only with kUnconfirmed
  // (kernel_gate.h; the stage server's --cuda_ops).
  CudaOps cuda_ops = CudaOps::kConfirmed;
  // NaN-fill every activation buffer and the output staging before each
  // run, so an element no kernel writes shows in the outputs (tests).
  bool poison_buffers = false;
  // Input shape sets whose buffers and graphs a program keeps; the least
  // recently used is freed beyond this.
  int max_cached_shapes = 8;
  // false: every GEMM through cublasGemmEx plus a bias/ReLU kernel, the
  // path otherwise taken only when cuBLASLt has no algorithm (tests).
  bool use_cublaslt = true;
  // cuBLASLt workspace per slot (cuBLAS recommends 32 MiB on Hopper).
  int64_t workspace_bytes = 32 << 20;
  // Run calls a program takes at once (its max_concurrent_runs()). Each
  // concurrent run has a slot: its own stream, cuBLASLt/cuBLAS handles and
  // workspace, pinned staging, device arena and per-shape plans and CUDA
  // graphs; the weights are shared. Two threads running microbatches i and
  // i+1 then overlap one's host<->device copies with the other's kernels.
  // Slots are made when first needed (a program only ever run by one thread
  // holds one); a call beyond the limit waits for a slot. 1: one run at a
  // time.
  int concurrent_runs = 2;
};

// False in builds without --config=cuda.
bool CudaBuiltIn();

// The number of CUDA devices, or kFailedPrecondition: "this build has no
// CUDA support (build with --config=cuda)", or "no CUDA device: ..." with
// cudaGetDeviceCount's error (no driver, no GPU).
absl::StatusOr<int> CudaDeviceCount();

// A backend on options.device. kFailedPrecondition when the build has no
// CUDA, there is no such device, or it is older than compute capability 9.0
// (the kernels are built for sm_90 with a compute_90 PTX fallback).
// Compile is thread-safe; each program owns its weights on the device and
// up to options.concurrent_runs slots (stream, cuBLASLt handle, workspace,
// buffers).
absl::StatusOr<std::unique_ptr<ComputeBackend>> MakeCudaBackend(
    const CudaBackendOptions& options);

// What Compile returns, with counters and a timing hook for tests and
// benchmarks. Run and TimeDeviceWork may be called from up to
// max_concurrent_runs() (options.concurrent_runs) threads at once, each
// call on its own slot; stats() from any thread at any time.
class CudaStageProgram : public StageProgram {
 public:
  // Totals over all slots. Plans and graphs are per slot: a shape set run
  // on two slots is planned and captured twice.
  struct Stats {
    int64_t runs = 0;
    int64_t graph_launches = 0;  // runs that replayed a captured graph
    int64_t graphs_captured = 0;
    int64_t plans_built = 0;  // input shape sets planned (evicted too)
    int fused_relus = 0;      // ReLUs done as GEMM epilogues
    // GEMMs cuBLASLt had no algorithm for, run by cublasGemmEx plus a
    // bias/ReLU kernel instead (counted per plan built).
    int64_t gemm_fallbacks = 0;
    int slots = 0;  // slots made so far: 1 until runs overlap
  };
  virtual Stats stats() const = 0;

  // On one slot: runs `inputs` once as Run does, then enqueues the device
  // work `iters` more times back to back (replaying a graph when graphs are on)
  // and returns each one's device time in milliseconds (CUDA events). With
  // include_copies the work is the whole run (host<->device copies too);
  // without, only the compute on the inputs already on the device.
  virtual absl::StatusOr<std::vector<double>> TimeDeviceWork(
      absl::Span<const Tensor> inputs, int iters, bool include_copies) = 0;
};

}  // namespace pipeserve

#endif  // PIPESERVE_RUNTIME_CUDA_CUDA_BACKEND_H_
