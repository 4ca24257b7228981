// cuda_bench: the CUDA backend on a real GPU, each row against a baseline
// measured in the same run. Built with --config=cuda; shipped in the GPU
// bundle (tools/gpu_bundle.sh) and run by tools/gpu_check.sh.
//
//   cuda_bench --fixtures DIR [--iters 200]
//
// DIR holds ExampleCode fixtures from tests/pytorch/make_fixtures.py at
// batch 16 (DIR/b16/example_code) and 256 (DIR/b256/example_code).
//
// 1. ExampleCode through LocalPipeline on the GPU in each precision against
//    the CPU backend and the float64 answer (relative to the largest
//    magnitude).
// 2. GEMM TFLOP/s, 16x512x512, 256x512x512, 4096x4096x4096, per precision:
//    the executor (a one-node `mm` stage program, compute only, CUDA graph)
//    against cuBLASLt and cublasGemmEx called directly on the same data.
//    Target: executor within 10% of cuBLAS at 4096^3.
// 3. Each ExampleCode stage at batch 16: Run() latency (host, copies and
//    synchronisation included) and device time, with and without its CUDA
//    graph. Target: under 50 us with the graph.
// 4. LocalPipeline throughput on ExampleCode at batch 256.
// 5. Overlap: the whole ExampleCode as one stage program (d = 512, random
//    weights) at batch 256 and 1024, K microbatches run by 1 thread on a
//    1-slot program (concurrent_runs = 1) vs 2 threads on a 2-slot program,
//    same run: rows/s and the speedup from one run's copies overlapping
//    the other's compute.
// 6. Issue 25's generation targets (bench/llama_targets.h): a
//    TinyLlama-1.1B-shaped model (DIR/tinyllama/graph.pb from
//    bench/llama_skeleton.py, random bfloat16 weights) on the CUDA backend
//    with every kernel allowed: prefill of 4 x 1024 tokens as a share of
//    the card's dense bfloat16 peak and of a cuBLASLt 8192^3 GEMM measured
//    here, attention alone (KvAppend and PagedAttention), decode at 1 and
//    64 sequences as a share
//    of the memory bandwidth and as a speedup.
// 7. sample_tokens on the device (kernels/sample.h): a one-node stage on
//    bfloat16 logits of 32000 tokens, 1 and 64 rows a step, greedy rows
//    (the argmax, the baseline) against rows that draw (temperature 0.8,
//    top-k 50, top-p 0.9, a repetition penalty over 256 tokens of context
//    each and a frequency penalty over its last 128):
//    device time a step, and what drawing adds to a step.
// Every timing is a median after a warm-up; device times come from CUDA
// events. Exit status: 0 when it ran (targets are reported, not enforced),
// 2 when there is no usable GPU, 1 on an error.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/cuda_limits.h"
#include "bench/llama_targets.h"
#include "common/status_macros.h"
#include "graph/dtype.h"
#include "partitioner/graph_builder.h"
#include "partitioner/partition.h"
#include "runtime/cpu/cpu_backend.h"
#include "runtime/random_tensor.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/cuda_kernels.h"
#include "runtime/cuda/cuda_status.h"
#include "runtime/local_pipeline.h"
#include "tests/fixtures.h"

namespace pipeserve {
namespace {

constexpr Precision kPrecisions[] = {Precision::kFloat32, Precision::kTF32,
                                     Precision::kBF16};

double Tolerance(Precision p) {
  return p == Precision::kFloat32 ? 1e-5 : p == Precision::kTF32 ? 1e-3 : 1e-2;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median seconds of `iters` calls after `warmup` more.
double MedianSeconds(int warmup, int iters, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
            .count());
  }
  return Median(t);
}


absl::StatusOr<std::unique_ptr<ComputeBackend>> Gpu(Precision p, bool graphs) {
  CudaBackendOptions o;
  o.precision = p;
  o.use_cuda_graphs = graphs;
  return MakeCudaBackend(o);
}

// max |got - want| / max |want| over all outputs.
double RelError(const std::vector<Tensor>& got,
                const std::vector<std::vector<double>>& want) {
  double err = 0, scale = 1e-30;
  for (size_t o = 0; o < want.size(); ++o) {
    for (size_t i = 0; i < want[o].size(); ++i) {
      scale = std::max(scale, std::fabs(want[o][i]));
      double e = std::fabs(got[o].data()[i] - want[o][i]);
      err = std::max(err, std::isnan(e) ? INFINITY : e);
    }
  }
  return err / scale;
}

std::vector<std::vector<double>> AsDouble(const std::vector<Tensor>& ts) {
  std::vector<std::vector<double>> out;
  for (const Tensor& t : ts) out.emplace_back(t.data(), t.data() + t.numel());
  return out;
}

absl::Status AccuracyTable(const Fixture& f16, const Fixture& f256) {
  std::printf(
      "\n== ExampleCode on the GPU vs the CPU backend (LocalPipeline, 4 "
      "stages)\n");
  std::printf(
      "max |diff| / max |reference|; float64 = the same model in float64 "
      "(PyTorch)\n");
  std::printf("%-6s %-6s %12s %12s %12s %12s  %s\n", "batch", "prec",
              "gpu-vs-cpu", "gpu-vs-f64", "cpu-vs-f64", "torch-vs-f64",
              "gpu-vs-cpu < tol");
  for (const Fixture* f : {&f16, &f256}) {
    ASSIGN_OR_RETURN(Plan plan, Partition(f->model.graph, {}));
    std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
    ASSIGN_OR_RETURN(auto cpu_pipe,
                     LocalPipeline::Create(f->model, plan, *cpu, {}));
    ASSIGN_OR_RETURN(std::vector<Tensor> cpu_out, cpu_pipe->Run(f->inputs));
    for (Precision p : kPrecisions) {
      ASSIGN_OR_RETURN(auto gpu, Gpu(p, true));
      ASSIGN_OR_RETURN(auto pipe,
                       LocalPipeline::Create(f->model, plan, *gpu, {}));
      std::vector<Tensor> out;
      for (int run = 0; run < 3; ++run) {  // op by op, capture, replay
        ASSIGN_OR_RETURN(out, pipe->Run(f->inputs));
      }
      double vs_cpu = RelError(out, AsDouble(cpu_out));
      std::printf("%-6lld %-6s %12.2e %12.2e %12.2e %12.2e  %s\n",
                  static_cast<long long>(f->inputs[0].dim(0)),
                  PrecisionName(p).c_str(), vs_cpu, RelError(out, f->exact),
                  RelError(cpu_out, f->exact), RelError(f->expected, f->exact),
                  vs_cpu < Tolerance(p) ? "PASS" : "FAIL");
    }
  }
  return absl::OkStatus();
}

// cuBLAS(Lt) called directly on device buffers, for the GEMM baselines.
class DirectGemm {
 public:
  // y [m, n] = x [m, k] @ w [k, n], row-major, as the executor's mm.
  static absl::StatusOr<std::unique_ptr<DirectGemm>> Create(
      int64_t m, int64_t n, int64_t k, Precision p, const Tensor& x,
      const Tensor& w) {
    auto g = std::unique_ptr<DirectGemm>(new DirectGemm(m, n, k, p));
    RETURN_IF_ERROR(g->Init(x, w));
    return g;
  }

  ~DirectGemm() {
    for (void* ptr : {x_, w_, y_, x16_, w16_, ws_}) {
      if (ptr != nullptr) cudaFree(ptr);
    }
    if (a_) cublasLtMatrixLayoutDestroy(a_);
    if (b_) cublasLtMatrixLayoutDestroy(b_);
    if (d_) cublasLtMatrixLayoutDestroy(d_);
    if (desc_) cublasLtMatmulDescDestroy(desc_);
    if (lt_) cublasLtDestroy(lt_);
    if (blas_) cublasDestroy(blas_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  // Median device ms per call, CUDA events around each of `iters` calls.
  absl::StatusOr<double> Time(bool use_lt, int iters) {
    for (int i = 0; i < 3; ++i) RETURN_IF_ERROR(Launch(use_lt));
    std::vector<cudaEvent_t> ev(iters + 1);
    for (auto& e : ev) CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
    for (int i = 0; i < iters; ++i) {
      CUDA_RETURN_IF_ERROR(cudaEventRecord(ev[i], stream_));
      RETURN_IF_ERROR(Launch(use_lt));
    }
    CUDA_RETURN_IF_ERROR(cudaEventRecord(ev[iters], stream_));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    std::vector<double> ms;
    for (int i = 0; i < iters; ++i) {
      float t = 0;
      CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&t, ev[i], ev[i + 1]));
      ms.push_back(t);
    }
    for (auto& e : ev) cudaEventDestroy(e);
    return Median(ms);
  }

 private:
  static constexpr size_t kWorkspace = 32 << 20;

  DirectGemm(int64_t m, int64_t n, int64_t k, Precision p)
      : m_(m), n_(n), k_(k), p_(p) {}

  absl::Status Init(const Tensor& x, const Tensor& w) {
    RETURN_IF_ERROR(UploadOperands(x, w));
    CUBLAS_RETURN_IF_ERROR(cublasCreate(&blas_));
    CUBLAS_RETURN_IF_ERROR(cublasSetStream(blas_, stream_));
    CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(blas_, ws_, kWorkspace));
    return ChooseLtAlgo();
  }

  // The stream, the buffers, x and w on the device (and in bf16 their
  // converted copies), and the operands' types.
  absl::Status UploadOperands(const Tensor& x, const Tensor& w) {
    CUDA_RETURN_IF_ERROR(
        cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&x_, x.byte_size()));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&w_, w.byte_size()));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&y_, m_ * n_ * 4));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&ws_, kWorkspace));
    CUDA_RETURN_IF_ERROR(
        cudaMemcpy(x_, x.data(), x.byte_size(), cudaMemcpyHostToDevice));
    CUDA_RETURN_IF_ERROR(
        cudaMemcpy(w_, w.data(), w.byte_size(), cudaMemcpyHostToDevice));
    // Landed before stream_ (non-blocking: it does not wait for the
    // default stream's copies) reads them.
    CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    const bool bf16 = p_ == Precision::kBF16;
    if (bf16) {  // operands converted once, outside the timing
      CUDA_RETURN_IF_ERROR(cudaMalloc(&x16_, x.numel() * 2));
      CUDA_RETURN_IF_ERROR(cudaMalloc(&w16_, w.numel() * 2));
      CUDA_RETURN_IF_ERROR(
          LaunchToBf16(static_cast<float*>(x_), x16_, x.numel(), stream_));
      CUDA_RETURN_IF_ERROR(
          LaunchToBf16(static_cast<float*>(w_), w16_, w.numel(), stream_));
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    }
    ab_type_ = bf16 ? CUDA_R_16BF : CUDA_R_32F;
    compute_ = p_ == Precision::kTF32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                      : CUBLAS_COMPUTE_32F;
    a_ptr_ = bf16 ? w16_ : w_;
    b_ptr_ = bf16 ? x16_ : x_;
    return absl::OkStatus();
  }

  // cuBLASLt's layouts and its first heuristic algorithm.
  absl::Status ChooseLtAlgo() {
    // Column-major: D [n, m] = W [n, k] (row-major w [k, n]) · X [k, m].
    CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&lt_));
    CUBLAS_RETURN_IF_ERROR(
        cublasLtMatmulDescCreate(&desc_, compute_, CUDA_R_32F));
    CUBLAS_RETURN_IF_ERROR(
        cublasLtMatrixLayoutCreate(&a_, ab_type_, n_, k_, n_));
    CUBLAS_RETURN_IF_ERROR(
        cublasLtMatrixLayoutCreate(&b_, ab_type_, k_, m_, k_));
    CUBLAS_RETURN_IF_ERROR(
        cublasLtMatrixLayoutCreate(&d_, CUDA_R_32F, n_, m_, n_));
    cublasLtMatmulPreference_t pref = nullptr;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = kWorkspace;
    cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    if (s == CUBLAS_STATUS_SUCCESS) {
      s = cublasLtMatmulAlgoGetHeuristic(lt_, desc_, a_, b_, d_, d_, pref, 1,
                                         &result, &found);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    RETURN_IF_ERROR(CublasStatus(s, "cublasLtMatmulAlgoGetHeuristic"));
    if (found == 0) return absl::InternalError("cuBLASLt found no algorithm");
    algo_ = result.algo;
    return absl::OkStatus();
  }

  absl::Status Launch(bool use_lt) {
    const float alpha = 1, beta = 0;
    if (use_lt) {
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(lt_, desc_, &alpha, a_ptr_, a_,
                                            b_ptr_, b_, &beta, y_, d_, y_, d_,
                                            &algo_, ws_, kWorkspace, stream_));
    } else {
      CUBLAS_RETURN_IF_ERROR(
          cublasGemmEx(blas_, CUBLAS_OP_N, CUBLAS_OP_N, n_, m_, k_, &alpha,
                       a_ptr_, ab_type_, n_, b_ptr_, ab_type_, k_, &beta, y_,
                       CUDA_R_32F, n_, compute_, CUBLAS_GEMM_DEFAULT));
    }
    return absl::OkStatus();
  }

  const int64_t m_, n_, k_;
  const Precision p_;
  cudaStream_t stream_ = nullptr;
  void *x_ = nullptr, *w_ = nullptr, *y_ = nullptr, *x16_ = nullptr,
       *w16_ = nullptr, *ws_ = nullptr;
  const void *a_ptr_ = nullptr, *b_ptr_ = nullptr;
  cudaDataType_t ab_type_ = CUDA_R_32F;
  cublasComputeType_t compute_ = CUBLAS_COMPUTE_32F;
  cublasHandle_t blas_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, d_ = nullptr;
  cublasLtMatmulAlgo_t algo_ = {};
};

absl::Status GemmTable(int iters, std::vector<std::string>* summary) {
  std::printf(
      "\n== GEMM TFLOP/s: executor (one-node mm program, compute only) vs "
      "cuBLAS direct\n");
  std::printf("%-16s %-5s %10s %10s %10s %8s\n", "m x n x k", "prec",
              "executor", "cublasLt", "GemmEx", "ratio");
  struct Size {
    int64_t m, n, k;
  };
  for (Size s :
       {Size{16, 512, 512}, Size{256, 512, 512}, Size{4096, 4096, 4096}}) {
    const bool big = s.m == 4096;
    const int n_iters = big ? std::max(10, iters / 10) : iters;
    GraphBuilder b;
    b.Input("x", {-1, s.k}).Param("w", {s.k, s.n});
    b.Op("mm", {"x", "w"}, "y").Output("y");
    Model model = b.Build();
    Tensor x = RandomTensor({s.m, s.k}, 7);
    const double flop = 2.0 * s.m * s.n * s.k;
    for (Precision p : kPrecisions) {
      ASSIGN_OR_RETURN(auto gpu, Gpu(p, true));
      ASSIGN_OR_RETURN(std::unique_ptr<StageProgram> prog,
                       gpu->Compile(model.graph, model.weights));
      auto* cuda = dynamic_cast<CudaStageProgram*>(prog.get());
      if (cuda == nullptr) return absl::InternalError("not a CUDA program");
      RETURN_IF_ERROR(cuda->TimeDeviceWork({x}, 3, false).status());  // warm-up
      ASSIGN_OR_RETURN(std::vector<double> ms,
                       cuda->TimeDeviceWork({x}, n_iters, false));
      double exec_ms = Median(ms);
      ASSIGN_OR_RETURN(auto direct, DirectGemm::Create(s.m, s.n, s.k, p, x,
                                                       model.weights.at("w")));
      ASSIGN_OR_RETURN(double lt_ms, direct->Time(true, n_iters));
      ASSIGN_OR_RETURN(double ex_ms, direct->Time(false, n_iters));
      double best = std::min(lt_ms, ex_ms);
      double ratio = best / exec_ms;
      std::printf("%4lld x %4lld x %4lld %-5s %10.2f %10.2f %10.2f %8.3f\n",
                  static_cast<long long>(s.m), static_cast<long long>(s.n),
                  static_cast<long long>(s.k), PrecisionName(p).c_str(),
                  flop / exec_ms / 1e9, flop / lt_ms / 1e9, flop / ex_ms / 1e9,
                  ratio);
      if (big) {
        summary->push_back(absl::StrCat(
            "executor/cuBLAS at 4096^3 ", PrecisionName(p), ": ",
            absl::StrFormat("%.3f", ratio),
            ratio >= 0.9 ? "  PASS (>= 0.90)" : "  FAIL (< 0.90)"));
      }
    }
  }
  std::printf(
      "ratio = fastest direct call's time / executor's time (1 = as fast)\n");
  return absl::OkStatus();
}

absl::Status StageLatencyTable(const Fixture& f16, int iters,
                               std::vector<std::string>* summary) {
  std::printf(
      "\n== ExampleCode stages at batch 16: Run() latency and device time "
      "(us)\n");
  std::printf("%-6s %-5s %-7s %10s %10s %s\n", "stage", "prec", "graph",
              "Run()", "device", "ops");
  ASSIGN_OR_RETURN(Plan plan, Partition(f16.model.graph, {}));
  double worst_graph_us = 0;
  for (int st = 0; st < plan.stages_size(); ++st) {
    const Graph& g = plan.stages(st).graph();
    std::vector<Tensor> in;
    uint32_t seed = 11;
    for (const ValueSpec& v : g.inputs()) {
      Shape shape(v.shape().begin(), v.shape().end());
      for (int64_t& d : shape) {
        if (d < 0) d = 16;
      }
      in.push_back(RandomTensor(shape, seed++));
    }
    std::string ops;
    for (const Node& n : g.nodes()) {
      if (n.op() != "param" && n.op() != "pipe_split")
        absl::StrAppend(&ops, ops.empty() ? "" : ",", n.op());
    }
    for (Precision p : kPrecisions) {
      for (bool graphs : {true, false}) {
        if (p != Precision::kFloat32 && !graphs) continue;
        ASSIGN_OR_RETURN(auto gpu, Gpu(p, graphs));
        ASSIGN_OR_RETURN(std::unique_ptr<StageProgram> prog,
                         gpu->Compile(g, f16.model.weights));
        absl::Status failed;
        double run_s = MedianSeconds(20, iters, [&] {
          absl::StatusOr<std::vector<Tensor>> out = prog->Run(in);
          if (!out.ok()) failed = out.status();
        });
        RETURN_IF_ERROR(failed);
        auto* cuda = dynamic_cast<CudaStageProgram*>(prog.get());
        ASSIGN_OR_RETURN(std::vector<double> ms,
                         cuda->TimeDeviceWork(in, iters, true));
        double run_us = run_s * 1e6;
        if (graphs && p == Precision::kFloat32)
          worst_graph_us = std::max(worst_graph_us, run_us);
        std::printf("%-6d %-5s %-7s %10.1f %10.1f %s\n", st,
                    PrecisionName(p).c_str(), graphs ? "yes" : "no", run_us,
                    Median(ms) * 1e3, ops.c_str());
      }
    }
  }
  summary->push_back(absl::StrCat(
      "slowest ExampleCode stage, batch 16, fp32, graph: ",
      absl::StrFormat("%.1f us", worst_graph_us),
      worst_graph_us < 50 ? "  PASS (< 50 us)" : "  FAIL (>= 50 us)"));
  return absl::OkStatus();
}

absl::Status ThroughputTable(const Fixture& f256, int iters) {
  std::printf(
      "\n== LocalPipeline on ExampleCode, batch 256 (4 stages, one process)\n");
  std::printf("%-18s %-7s %10s %12s\n", "backend", "chunks", "ms/batch",
              "rows/s");
  ASSIGN_OR_RETURN(Plan plan, Partition(f256.model.graph, {}));
  const int n = std::max(10, iters / 4);
  auto row = [&](const std::string& name, ComputeBackend& backend,
                 int chunks) -> absl::Status {
    LocalPipelineOptions o;
    o.chunks = chunks;
    ASSIGN_OR_RETURN(auto pipe,
                     LocalPipeline::Create(f256.model, plan, backend, o));
    absl::Status failed;
    double s = MedianSeconds(5, n, [&] {
      absl::StatusOr<std::vector<Tensor>> out = pipe->Run(f256.inputs);
      if (!out.ok()) failed = out.status();
    });
    RETURN_IF_ERROR(failed);
    std::printf("%-18s %-7d %10.3f %12.0f\n", name.c_str(), chunks, s * 1e3,
                256 / s);
    return absl::OkStatus();
  };
  for (Precision p : kPrecisions) {
    ASSIGN_OR_RETURN(auto gpu, Gpu(p, true));
    for (int chunks : {1, 4}) {
      RETURN_IF_ERROR(
          row(absl::StrCat(gpu->Name(), " ", PrecisionName(p)), *gpu, chunks));
    }
  }
  std::unique_ptr<ComputeBackend> cpu = MakeCpuBackend({});
  RETURN_IF_ERROR(row("cpu (1 thread)", *cpu, 1));
  return absl::OkStatus();
}

// ExampleCode's forward (tests/pytorch/models.py) as a single stage.
Model WholeExampleCode(int64_t d) {
  GraphBuilder b;
  b.Input("x", {-1, d}).Input("y", {-1, d});
  b.Param("mm_param1", {d, d}).Param("mm_param2", {d, d});
  b.Param("lin1.weight", {d, d}).Param("lin1.bias", {d});
  b.Param("lin2.weight", {d, d}).Param("lin2.bias", {d});
  b.Op("mm", {"x", "mm_param1"}, "skip").Op("add", {"skip", "y"}, "a0");
  b.Op("relu", {"a0"}, "r0").Op("mm", {"r0", "mm_param1"}, "m1");
  b.Op("linear", {"m1", "lin1.weight", "lin1.bias"}, "l1", "lin1");
  b.Op("relu", {"l1"}, "r1").Op("add", {"r1", "skip"}, "a1");
  b.Op("mm", {"a1", "mm_param2"}, "m2");
  b.Op("linear", {"m2", "lin2.weight", "lin2.bias"}, "l2", "lin2");
  b.Op("relu", {"l2"}, "out").Output("out");
  return b.Build();
}

// Seconds for `k` microbatches (inputs cycled) split round-robin over
// `threads` threads calling prog->Run.
absl::StatusOr<double> RunMicrobatches(
    StageProgram& prog, int threads, int k,
    const std::vector<std::vector<Tensor>>& inputs) {
  std::mutex mu;
  absl::Status failed;
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = t; i < k; i += threads) {
        absl::StatusOr<std::vector<Tensor>> out =
            prog.Run(inputs[i % inputs.size()]);
        if (!out.ok()) {
          std::lock_guard<std::mutex> lock(mu);
          failed.Update(out.status());
          return;
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  double s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  RETURN_IF_ERROR(failed);
  return s;
}

absl::Status OverlapTable(int iters, std::vector<std::string>* summary) {
  std::printf(
      "\n== Overlap: ExampleCode as one stage (d=512), K microbatches; 1 "
      "thread on a 1-slot program vs 2 threads on a 2-slot program\n");
  std::printf("%-6s %-5s %5s %12s %12s %8s %6s\n", "batch", "prec", "K",
              "1x1 rows/s", "2x2 rows/s", "speedup", "slots");
  Model model = WholeExampleCode(512);
  std::vector<std::string> speedups;
  for (int64_t batch : {256, 1024}) {
    const int k = std::max(40, batch == 256 ? iters * 2 : iters);
    std::vector<std::vector<Tensor>> inputs;
    for (uint32_t i = 0; i < 8; ++i) {
      inputs.push_back({RandomTensor({batch, 512}, 100 + 2 * i),
                        RandomTensor({batch, 512}, 101 + 2 * i)});
    }
    for (Precision p : {Precision::kFloat32, Precision::kBF16}) {
      CudaBackendOptions o;
      o.precision = p;
      o.concurrent_runs = 1;
      ASSIGN_OR_RETURN(auto gpu1, MakeCudaBackend(o));
      o.concurrent_runs = 2;
      ASSIGN_OR_RETURN(auto gpu2, MakeCudaBackend(o));
      ASSIGN_OR_RETURN(std::unique_ptr<StageProgram> one,
                       gpu1->Compile(model.graph, model.weights));
      ASSIGN_OR_RETURN(std::unique_ptr<StageProgram> two,
                       gpu2->Compile(model.graph, model.weights));
      // Warm-up: plans, graph captures, both slots of the 2-slot program.
      RETURN_IF_ERROR(RunMicrobatches(*one, 1, 16, inputs).status());
      RETURN_IF_ERROR(RunMicrobatches(*two, 2, 64, inputs).status());
      // Alternate the two, 3 rounds each; the median of each.
      std::vector<double> t1, t2;
      for (int round = 0; round < 3; ++round) {
        ASSIGN_OR_RETURN(double a, RunMicrobatches(*one, 1, k, inputs));
        ASSIGN_OR_RETURN(double b, RunMicrobatches(*two, 2, k, inputs));
        t1.push_back(a);
        t2.push_back(b);
      }
      const double r1 = k * batch / Median(t1), r2 = k * batch / Median(t2);
      auto* cuda = dynamic_cast<CudaStageProgram*>(two.get());
      const int slots = cuda != nullptr ? cuda->stats().slots : 0;
      std::printf("%-6lld %-5s %5d %12.0f %12.0f %8.2f %6d\n",
                  static_cast<long long>(batch), PrecisionName(p).c_str(), k,
                  r1, r2, r2 / r1, slots);
      speedups.push_back(absl::StrFormat("batch %lld %s x%.2f",
                                         static_cast<long long>(batch),
                                         PrecisionName(p), r2 / r1));
    }
  }
  std::printf(
      "speedup = 2x2 rows/s / 1x1 rows/s (same run, medians of 3); slots = "
      "slots the 2-slot program made\n");
  summary->push_back(absl::StrCat(
      "overlap, 2 threads x 2 slots vs 1 x 1: ", absl::StrJoin(speedups, ", "),
      "  (reported, no target)"));
  return absl::OkStatus();
}

// Section 6 (see the file's header).
absl::Status LlamaTargetsTable(const std::string& fixtures, int device) {
  std::printf(
      "\n== Generation targets: TinyLlama-1.1B-shaped, bfloat16, random weights, every "
      "kernel allowed\n");
  ASSIGN_OR_RETURN(Graph g, ReadGraph(fixtures + "/tinyllama/graph.pb"));
  ASSIGN_OR_RETURN(LlamaShape shape, ShapeOf(g));
  const TargetOptions o;
  CardLimits limits;
  RETURN_IF_ERROR(SpecLimits(device, &limits));
  {
    const int64_t n = 8192;
    ASSIGN_OR_RETURN(auto direct, DirectGemm::Create(n, n, n, Precision::kBF16,
                                                     RandomTensor({n, n}, 3),
                                                     RandomTensor({n, n}, 4)));
    ASSIGN_OR_RETURN(double ms, direct->Time(true, 10));
    limits.bf16_gemm_flops = 2.0 * n * n * n / (ms * 1e-3);
  }
  ASSIGN_OR_RETURN(limits.copy_bytes_per_second, CopyBandwidth(int64_t{1} << 30, 20));
  ASSIGN_OR_RETURN(limits.attention_seconds,
                   AttentionSeconds(shape, o.prefill_seqs, o.prefill_len, 20, true));
  ASSIGN_OR_RETURN(limits.cuda_core_attention_seconds,
                   AttentionSeconds(shape, o.prefill_seqs, o.prefill_len, 20, false));
  std::printf("measured: cuBLASLt bf16 8192^3 %.0f TFLOP/s, device copy %.0f GB/s (read + write)\n",
              limits.bf16_gemm_flops / 1e12, limits.copy_bytes_per_second / 1e9);
  Model model{g, RandomWeights(g, 1)};
  CudaBackendOptions co;
  co.precision = Precision::kBF16;
  co.cuda_ops = CudaOps::kUnconfirmed;
  ASSIGN_OR_RETURN(auto gpu, MakeCudaBackend(co));
  ASSIGN_OR_RETURN(LlamaTimes t, TimeLlama(*gpu, model, o));
  PrintTargets(shape, o, t, limits);
  return absl::OkStatus();
}

// sample_tokens alone, its inputs for `rows` rows of `vocab` logits that
// draw (or are plain greedy).
std::vector<Tensor> SampleInputs(int64_t rows, int64_t vocab, bool draw) {
  const int64_t context = 256;
  const Tensor f32 = RandomTensor({rows, vocab}, 9);
  Tensor logits = Tensor::Empty({rows, vocab}, DT_BFLOAT16);
  for (int64_t i = 0; i < f32.numel(); ++i) {
    logits.data_as<uint16_t>()[i] = FloatToBf16(4 * f32.data()[i]);
  }
  Tensor floats = Tensor::Empty({rows, 4});
  Tensor ints = Tensor::Empty({rows, 3}, DT_INT64);
  Tensor tokens = Tensor::Empty({rows * context}, DT_INT64);
  Tensor ends = Tensor::Empty({rows}, DT_INT64);
  for (int64_t r = 0; r < rows; ++r) {
    const float f[4] = {draw ? 0.8f : 0.0f, draw ? 0.9f : 1.0f, draw ? 1.2f : 1.0f,
                        draw ? 0.3f : 0.0f};
    std::copy(f, f + 4, floats.data() + r * 4);
    const int64_t n[3] = {draw ? 50 : 0, r + 1, context / 2};
    std::copy(n, n + 3, ints.data_as<int64_t>() + r * 3);
    ends.data_as<int64_t>()[r] = (r + 1) * context;
  }
  for (int64_t i = 0; i < tokens.numel(); ++i) tokens.data_as<int64_t>()[i] = (i * 7919) % vocab;
  return {logits, floats, ints, tokens, ends};
}

// Section 7 (see the file's header).
absl::Status SampleTable(int iters) {
  const int64_t vocab = 32000;
  GraphBuilder b;
  b.Input("logits", {-1, vocab}).Input("floats", {-1, 4}).Input("ints", {-1, 3});
  b.Input("context", {-1}).Input("ends", {-1});
  b.graph().mutable_inputs(0)->set_dtype(DT_BFLOAT16);
  for (int i : {2, 3, 4}) b.graph().mutable_inputs(i)->set_dtype(DT_INT64);
  // As the exporter marks them: the context is not one row a sequence.
  for (int i : {1, 2, 3, 4}) b.graph().mutable_inputs(i)->set_batched(false);
  b.Op("sample_tokens", {"logits", "floats", "ints", "context", "ends"}, "next").Output("next");
  const Model m = b.Build();
  CudaBackendOptions o;
  o.precision = Precision::kBF16;
  o.cuda_ops = CudaOps::kUnconfirmed;
  ASSIGN_OR_RETURN(auto gpu, MakeCudaBackend(o));
  ASSIGN_OR_RETURN(std::unique_ptr<StageProgram> prog, gpu->Compile(m.graph, m.weights));
  auto* cuda = dynamic_cast<CudaStageProgram*>(prog.get());
  if (cuda == nullptr) return absl::InternalError("not a CUDA program");
  std::printf("\n== sample_tokens on the device: bfloat16 logits of %lld tokens, device time a "
              "step (median of %d)\n%-5s %12s %12s %12s\n",
              static_cast<long long>(vocab), iters, "rows", "greedy us", "drawing us", "added us");
  for (int64_t rows : {1, 64}) {
    double us[2];
    for (bool draw : {false, true}) {
      const std::vector<Tensor> in = SampleInputs(rows, vocab, draw);
      ASSIGN_OR_RETURN(std::vector<double> ms, cuda->TimeDeviceWork(in, iters, false));
      us[draw] = Median(ms) * 1e3;
    }
    std::printf("%-5lld %12.1f %12.1f %12.1f\n", static_cast<long long>(rows), us[0], us[1],
                us[1] - us[0]);
  }
  return absl::OkStatus();
}

absl::Status Main(const std::string& fixtures, int iters) {
  int device = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  int driver = 0, runtime = 0;
  CUDA_RETURN_IF_ERROR(cudaDriverGetVersion(&driver));
  CUDA_RETURN_IF_ERROR(cudaRuntimeGetVersion(&runtime));
  std::printf(
      "device %d: %s, compute capability %d.%d, %d SMs, %.1f GiB; driver %d, "
      "runtime %d\n",
      device, prop.name, prop.major, prop.minor, prop.multiProcessorCount,
      prop.totalGlobalMem / double(1 << 30), driver, runtime);

  ASSIGN_OR_RETURN(Fixture f16, LoadFixture(fixtures + "/b16", "example_code"));
  ASSIGN_OR_RETURN(Fixture f256,
                   LoadFixture(fixtures + "/b256", "example_code"));
  std::vector<std::string> summary;
  RETURN_IF_ERROR(AccuracyTable(f16, f256));
  std::fflush(stdout);
  RETURN_IF_ERROR(GemmTable(iters, &summary));
  std::fflush(stdout);
  RETURN_IF_ERROR(StageLatencyTable(f16, iters, &summary));
  std::fflush(stdout);
  RETURN_IF_ERROR(ThroughputTable(f256, iters));
  std::fflush(stdout);
  // The newest table: its failure still leaves the targets printed.
  absl::Status overlap = OverlapTable(iters, &summary);
  if (!overlap.ok()) {
    std::printf("overlap table failed: %s\n", overlap.ToString().c_str());
  }
  absl::Status llama = LlamaTargetsTable(fixtures, device);
  if (!llama.ok()) std::printf("generation targets failed: %s\n", llama.ToString().c_str());
  std::fflush(stdout);
  absl::Status sample = SampleTable(std::min(iters, 50));
  if (!sample.ok()) std::printf("sampling table failed: %s\n", sample.ToString().c_str());
  std::printf("\n== Targets\n");
  for (const std::string& s : summary) std::printf("%s\n", s.c_str());
  if (!overlap.ok()) return overlap;
  return llama.ok() ? sample : llama;
}

}  // namespace
}  // namespace pipeserve

int main(int argc, char** argv) {
  std::string fixtures = "fixtures";
  int iters = 200;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string f = argv[i];
    if (f == "--fixtures") fixtures = argv[i + 1];
    if (f == "--iters") iters = std::max(10, std::atoi(argv[i + 1]));
  }
  absl::StatusOr<int> devices = pipeserve::CudaDeviceCount();
  if (!devices.ok()) {
    std::printf("cuda_bench: %s\n",
                std::string(devices.status().message()).c_str());
    return 2;
  }
  absl::Status s = pipeserve::Main(fixtures, iters);
  std::fflush(stdout);
  if (!s.ok()) {
    std::fprintf(stderr, "cuda_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
