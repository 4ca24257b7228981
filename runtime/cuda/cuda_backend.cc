#include "runtime/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/cuda/cuda_kernels.h"
#include "runtime/cuda/kernels/transformer_kernels.h"
#include "runtime/cuda/cuda_status.h"
#include "runtime/cuda/device_generation.h"
#include "runtime/cuda/device_plan.h"
#include "runtime/cuda/device_slots.h"
#include "runtime/signature.h"

namespace pipeserve {
namespace {

// Owners for CUDA and cuBLASLt objects. Each program destroys its objects
// with its device current (see ~CudaProgram).
struct FreeDevice {
  void operator()(void* p) const { cudaFree(p); }
};
struct FreeHost {
  void operator()(void* p) const { cudaFreeHost(p); }
};
struct DestroyStream {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
struct DestroyEvent {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
struct DestroyGraph {
  void operator()(cudaGraph_t g) const { cudaGraphDestroy(g); }
};
struct DestroyGraphExec {
  void operator()(cudaGraphExec_t g) const { cudaGraphExecDestroy(g); }
};
struct DestroyBlas {
  void operator()(cublasHandle_t h) const { cublasDestroy(h); }
};
struct DestroyLt {
  void operator()(cublasLtHandle_t h) const { cublasLtDestroy(h); }
};
struct DestroyDesc {
  void operator()(cublasLtMatmulDesc_t d) const {
    cublasLtMatmulDescDestroy(d);
  }
};
struct DestroyLayout {
  void operator()(cublasLtMatrixLayout_t l) const {
    cublasLtMatrixLayoutDestroy(l);
  }
};
struct DestroyPreference {
  void operator()(cublasLtMatmulPreference_t p) const {
    cublasLtMatmulPreferenceDestroy(p);
  }
};

template <typename T, typename D>
using Owned = std::unique_ptr<std::remove_pointer_t<T>, D>;
using DeviceBuffer = std::unique_ptr<void, FreeDevice>;
using PinnedBuffer = std::unique_ptr<void, FreeHost>;
using Stream = Owned<cudaStream_t, DestroyStream>;
using Event = Owned<cudaEvent_t, DestroyEvent>;
using Graph_ = Owned<cudaGraph_t, DestroyGraph>;
using GraphExec = Owned<cudaGraphExec_t, DestroyGraphExec>;
using BlasHandle = Owned<cublasHandle_t, DestroyBlas>;
using LtHandle = Owned<cublasLtHandle_t, DestroyLt>;
using MatmulDesc = Owned<cublasLtMatmulDesc_t, DestroyDesc>;
using Layout = Owned<cublasLtMatrixLayout_t, DestroyLayout>;
using Preference = Owned<cublasLtMatmulPreference_t, DestroyPreference>;

absl::StatusOr<DeviceBuffer> AllocDevice(int64_t bytes) {
  void* p = nullptr;
  CUDA_RETURN_IF_ERROR(
      cudaMalloc(&p, std::max<int64_t>(bytes, kArenaAlignment)));
  return DeviceBuffer(p);
}

absl::StatusOr<PinnedBuffer> AllocPinned(int64_t bytes) {
  void* p = nullptr;
  CUDA_RETURN_IF_ERROR(cudaHostAlloc(
      &p, std::max<int64_t>(bytes, kArenaAlignment), cudaHostAllocDefault));
  return PinnedBuffer(p);
}

// Keeps the code of `s`, prefixing the node the failing op came from.
absl::Status AtNode(const absl::Status& s, const std::string& node) {
  if (s.ok()) return s;
  return absl::Status(s.code(),
                      absl::StrCat("node \"", node, "\": ", s.message()));
}

// TF32 operands are float32 storage (already rounded, see device_plan.h).
cudaDataType_t CudaType(DType t) {
  return t == DType::kBF16 ? CUDA_R_16BF : t == DType::kF16 ? CUDA_R_16F : CUDA_R_32F;
}

kernels::CastType CastTypeOf(DataType t) {
  switch (t) {
    case DT_INT64: return kernels::CastType::kI64;
    case DT_BOOL: return kernels::CastType::kBool;
    case DT_FLOAT16: return kernels::CastType::kF16;
    case DT_BFLOAT16: return kernels::CastType::kBF16;
    default: return kernels::CastType::kF32;
  }
}

kernels::FloatType FloatTypeOf(DataType t) {
  return t == DT_FLOAT16    ? kernels::FloatType::kF16
         : t == DT_BFLOAT16 ? kernels::FloatType::kBF16
                            : kernels::FloatType::kF32;
}

KernelOp ToKernelOp(ElementwiseOp op) {
  return op == ElementwiseOp::kAdd   ? KernelOp::kAdd
         : op == ElementwiseOp::kSub ? KernelOp::kSub
                                     : KernelOp::kMul;
}

// One GEMM's cuBLASLt descriptors and the algorithm the heuristic chose,
// made once per input shape set.
// When cuBLASLt has no algorithm for it (odd sizes in a reduced precision,
// say) the GEMM runs through cublasGemmEx and a bias/ReLU kernel instead.
struct LtGemm {
  MatmulDesc desc;
  Layout a, b, d;
  cublasLtMatmulAlgo_t algo;
  bool fallback = false;
  // cuBLASLt had no algorithm with the GELU epilogue but has one without:
  // the elementwise GELU runs after it.
  bool gelu_after = false;
};

cublasComputeType_t ComputeType(const GemmOp& g) {
  return g.precision == Precision::kTF32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                         : CUBLAS_COMPUTE_32F;
}

// The cuBLASLt layouts of A, B and D, column-major (A is [k, m] when
// transposed, else [m, k]), with the batch count and strides of a batch.
absl::Status MakeLtLayouts(const GemmOp& g, LtGemm* out) {
  cublasLtMatrixLayout_t l = nullptr;
  CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&l, CudaType(g.ab_type), g.trans_a ? g.k : g.m,
                                 g.trans_a ? g.m : g.k, g.lda));
  out->a.reset(l);
  CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&l, CudaType(g.ab_type), g.k, g.n, g.ldb));
  out->b.reset(l);
  CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&l, CudaType(g.d_type), g.m, g.n, g.ldd));
  out->d.reset(l);
  if (g.batch <= 1) return absl::OkStatus();
  const int32_t count = static_cast<int32_t>(g.batch);
  const std::pair<cublasLtMatrixLayout_t, int64_t> layouts[] = {
      {out->a.get(), g.stride_a}, {out->b.get(), g.stride_b}, {out->d.get(), g.stride_d}};
  for (const auto& [layout, stride] : layouts) {
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutSetAttribute(
        layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutSetAttribute(
        layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
  }
  return absl::OkStatus();
}

// The epilogue of `g` (bias, then ReLU or GELU) on `desc`.
absl::Status SetLtEpilogue(cublasLtMatmulDesc_t desc, const GemmOp& g, const void* bias) {
  cublasLtEpilogue_t epilogue =
      g.has_bias ? (g.relu   ? CUBLASLT_EPILOGUE_RELU_BIAS
                    : g.gelu ? CUBLASLT_EPILOGUE_GELU_BIAS
                             : CUBLASLT_EPILOGUE_BIAS)
                 : (g.relu   ? CUBLASLT_EPILOGUE_RELU
                    : g.gelu ? CUBLASLT_EPILOGUE_GELU
                             : CUBLASLT_EPILOGUE_DEFAULT);
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (g.has_bias) {
    // The bias is stored in D's type: cuBLASLt's default bias type.
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<LtGemm>> MakeLtGemm(cublasLtHandle_t lt,
                                                   const GemmOp& g,
                                                   const void* bias,
                                                   int64_t workspace,
                                                   bool use_lt) {
  auto out = std::make_unique<LtGemm>();
  if (!use_lt) {
    out->fallback = true;
    return out;
  }
  cublasLtMatmulDesc_t desc = nullptr;
  CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescCreate(&desc, ComputeType(g), CUDA_R_32F));
  out->desc.reset(desc);
  cublasOperation_t trans_a = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t trans_b = CUBLAS_OP_N;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)));
  RETURN_IF_ERROR(SetLtEpilogue(desc, g, bias));
  RETURN_IF_ERROR(MakeLtLayouts(g, out.get()));

  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref));
  Preference owned_pref(pref);
  uint64_t max_workspace = static_cast<uint64_t>(workspace);
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace,
      sizeof(max_workspace)));
  cublasLtMatmulHeuristicResult_t result;
  std::memset(&result, 0, sizeof(result));
  int found = 0;
  cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(
      lt, desc, out->a.get(), out->b.get(), out->d.get(), out->d.get(), pref, 1,
      &result, &found);
  if (s == CUBLAS_STATUS_NOT_SUPPORTED ||
      (s == CUBLAS_STATUS_SUCCESS && found == 0)) {
    if (g.gelu) {  // the same GEMM with the bias epilogue only, then GELU
      GemmOp plain = g;
      plain.gelu = false;
      ASSIGN_OR_RETURN(out, MakeLtGemm(lt, plain, bias, workspace, use_lt));
      out->gelu_after = !out->fallback;
      return out;
    }
    out->fallback = true;
    return out;
  }
  RETURN_IF_ERROR(CublasStatus(s, "cublasLtMatmulAlgoGetHeuristic"));
  out->algo = result.algo;
  return out;
}

// Buffers, cuBLASLt descriptors and graphs for one set of input shapes, on
// one slot.
struct ShapeEntry {
  DevicePlan plan;
  DeviceBuffer activations;
  PinnedBuffer staging_in, staging_out;
  std::vector<std::unique_ptr<LtGemm>> gemms;  // per op; null but for GEMMs
  GraphExec full;                              // the whole run, copies included
  GraphExec compute;                           // compute only (benchmarks)
  std::vector<Tensor> outputs;  // last run's, reused once released
  int64_t runs = 0;
  uint64_t last_used = 0;
};

// One concurrent run's resources (see SlotPool): a stream, cuBLASLt and
// cuBLAS handles with their workspace, and the per-shape plans, buffers and
// graphs. A program's slots share only its weights.
struct Slot {
  // Declared first, destroyed last: everything below is used on it.
  Stream stream;
  LtHandle lt;
  DeviceBuffer workspace;
  BlasHandle blas;
  std::vector<std::unique_ptr<ShapeEntry>> cache;
  uint64_t clock = 0;
  ~Slot();
};

Slot::~Slot() {
  // Nothing may still use the buffers freed after this body.
  if (stream != nullptr) cudaStreamSynchronize(stream.get());
}

class CudaProgram : public CudaStageProgram {
 public:
  static absl::StatusOr<std::unique_ptr<CudaProgram>> Create(
      LoweredStage stage, const CudaBackendOptions& options) {
    auto prog = std::unique_ptr<CudaProgram>(
        new CudaProgram(std::move(stage), options));
    RETURN_IF_ERROR(prog->Init());
    return prog;
  }

  ~CudaProgram() override {
    // Members (the slots first, then the weights) are destroyed after this
    // body, with the device current; no Run may be in flight.
    cudaSetDevice(options_.device);
  }

  int max_concurrent_runs() const override { return slots_.max_slots(); }
  KvCacheUsage kv_cache() const override { return kv_.usage(); }
  // Buffers, plans and a graph per input shape set, max_cached_shapes kept.
  bool prefers_few_shapes() const override { return true; }

  absl::StatusOr<std::vector<Tensor>> Run(
      absl::Span<const Tensor> inputs) override {
    CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    RETURN_IF_ERROR(
        CheckTensorsMatch(stage_.graph().inputs(), inputs).status());
    ASSIGN_OR_RETURN(SlotPool<Slot>::Lease slot, slots_.Acquire());
    ASSIGN_OR_RETURN(ShapeEntry * e, EntryFor(*slot, inputs));
    ASSIGN_OR_RETURN(std::optional<KvStep> step, kv_.Begin(e->plan, inputs));
    absl::Status run = RunEntry(*slot, e, inputs);
    if (!run.ok()) {
      kv_.Abort(step);
      return run;
    }
    kv_.Commit(step);
    return e->outputs;  // copied while the slot is still ours
  }

  Stats stats() const override {
    std::lock_guard<std::mutex> lock(stats_mu_);
    Stats s = stats_;
    s.fused_relus = stage_.fused_relus();
    s.slots = slots_.slots_made();
    return s;
  }

  absl::StatusOr<std::vector<double>> TimeDeviceWork(
      absl::Span<const Tensor> inputs, int iters,
      bool include_copies) override {
    CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    RETURN_IF_ERROR(CheckTensorsMatch(stage_.graph().inputs(), inputs).status());
    // Replays would write the KV cache behind its bookkeeping.
    if (kv_.present()) return absl::FailedPreconditionError("a KV cache stage is timed by Run");
    // One slot for the whole call: the warm-up run and the timed work.
    ASSIGN_OR_RETURN(SlotPool<Slot>::Lease slot, slots_.Acquire());
    // Plans, stages and warms up.
    ASSIGN_OR_RETURN(ShapeEntry * e, EntryFor(*slot, inputs));
    RETURN_IF_ERROR(RunEntry(*slot, e, inputs));
    cudaStream_t stream = slot->stream.get();
    const size_t begin = include_copies ? 0 : e->plan.compute_begin;
    const size_t end =
        include_copies ? e->plan.ops.size() : e->plan.compute_end;
    // Without copies the inputs already on the device are reused, so the
    // buffers are not poisoned.
    const bool poison = include_copies && options_.poison_buffers;
    cudaGraphExec_t exec = nullptr;
    if (options_.use_cuda_graphs) {
      GraphExec& g = include_copies ? e->full : e->compute;
      if (g == nullptr) {
        ASSIGN_OR_RETURN(g, Capture(*slot, *e, begin, end, poison));
      }
      exec = g.get();
    }
    std::vector<Event> events;
    for (int i = 0; i <= iters; ++i) {
      cudaEvent_t ev = nullptr;
      CUDA_RETURN_IF_ERROR(cudaEventCreate(&ev));
      events.emplace_back(ev);
    }
    absl::Status status;
    for (int i = 0; i < iters && status.ok(); ++i) {
      status = CudaStatus(cudaEventRecord(events[i].get(), stream),
                          "cudaEventRecord");
      if (!status.ok()) break;
      status = exec != nullptr ? CudaStatus(cudaGraphLaunch(exec, stream),
                                            "cudaGraphLaunch")
                               : Enqueue(*slot, *e, begin, end, poison);
    }
    if (status.ok()) {
      status = CudaStatus(cudaEventRecord(events[iters].get(), stream),
                          "cudaEventRecord");
    }
    absl::Status sync =
        CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    RETURN_IF_ERROR(status);
    RETURN_IF_ERROR(sync);
    std::vector<double> ms;
    for (int i = 0; i < iters; ++i) {
      float t = 0;
      CUDA_RETURN_IF_ERROR(
          cudaEventElapsedTime(&t, events[i].get(), events[i + 1].get()));
      ms.push_back(t);
    }
    return ms;
  }

 private:
  // A stage with a KV cache runs one step at a time (the cache is shared).
  CudaProgram(LoweredStage stage, const CudaBackendOptions& options)
      : stage_(std::move(stage)),
        options_(options),
        kv_(stage_),
        slots_(kv_.present() ? 1 : options.concurrent_runs, [this] { return MakeSlot(); }) {}

  absl::Status Init() {
    CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    // Weights go up once, in the dtypes the plans read; the host copies
    // are released. Every slot reads them.
    std::vector<char> image(stage_.weight_bytes());
    stage_.FillWeights(image.data());
    ASSIGN_OR_RETURN(weights_, AllocDevice(stage_.weight_bytes()));
    if (!image.empty()) {
      CUDA_RETURN_IF_ERROR(cudaMemcpy(weights_.get(), image.data(),
                                      image.size(), cudaMemcpyHostToDevice));
    }
    stage_.ReleaseWeights();
    // The KV cache: every layer's blocks, zeroed once, kept across runs.
    ASSIGN_OR_RETURN(cache_, AllocDevice(stage_.cache_bytes()));
    if (stage_.cache_bytes() > 0) {
      CUDA_RETURN_IF_ERROR(cudaMemset(cache_.get(), 0, stage_.cache_bytes()));
    }
    // Both went on the legacy default stream, which the slots' streams
    // (cudaStreamNonBlocking) do not wait for, and both may return before
    // the device has finished: a first step's KvAppend could be zeroed
    // after it wrote, or a first GEMM read weights still in flight.
    CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    // The first slot now, so a device without room for its workspace
    // fails Compile; the others when concurrent runs first need them.
    ASSIGN_OR_RETURN(SlotPool<Slot>::Lease first, slots_.Acquire());
    return absl::OkStatus();
  }

  // Called by the pool on the thread that needs the slot, whose device is
  // already current (Init, Run and TimeDeviceWork set it).
  absl::StatusOr<std::unique_ptr<Slot>> MakeSlot() {
    auto slot = std::make_unique<Slot>();
    cudaStream_t s = nullptr;
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    slot->stream.reset(s);
    cublasLtHandle_t lt = nullptr;
    CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&lt));
    slot->lt.reset(lt);
    ASSIGN_OR_RETURN(slot->workspace, AllocDevice(options_.workspace_bytes));
    // cuBLAS proper, for GEMMs cuBLASLt has no algorithm for; with its
    // workspace set it allocates nothing, so its calls can be captured.
    cublasHandle_t blas = nullptr;
    CUBLAS_RETURN_IF_ERROR(cublasCreate(&blas));
    slot->blas.reset(blas);
    CUBLAS_RETURN_IF_ERROR(cublasSetStream(blas, s));
    CUBLAS_RETURN_IF_ERROR(
        cublasSetWorkspace(blas, slot->workspace.get(),
                           static_cast<size_t>(options_.workspace_bytes)));
    return slot;
  }

  char* Address(const ShapeEntry& e, const BufferRef& r) const {
    switch (r.arena) {
      case Arena::kWeights:
        return static_cast<char*>(weights_.get()) + r.offset;
      case Arena::kActivations:
        return static_cast<char*>(e.activations.get()) + r.offset;
      case Arena::kCache:
        return static_cast<char*>(cache_.get()) + r.offset;
      case Arena::kStagingIn:
        return static_cast<char*>(e.staging_in.get()) + r.offset;
      case Arena::kStagingOut:
        return static_cast<char*>(e.staging_out.get()) + r.offset;
    }
    return nullptr;
  }
  float* F(const ShapeEntry& e, const BufferRef& r) const {
    return reinterpret_cast<float*>(Address(e, r));
  }

  void Count(int64_t Stats::*counter, int64_t n = 1) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    stats_.*counter += n;
  }

  // The slot's cached entry for these input shapes, or a new one (evicting
  // the least recently used beyond max_cached_shapes).
  absl::StatusOr<ShapeEntry*> EntryFor(Slot& slot,
                                       absl::Span<const Tensor> inputs) {
    std::vector<Shape> shapes;
    for (const Tensor& t : inputs) shapes.push_back(t.shape());
    for (auto& e : slot.cache) {
      if (e->plan.input_shapes == shapes) {
        e->last_used = ++slot.clock;
        return e.get();
      }
    }
    ASSIGN_OR_RETURN(DevicePlan plan, stage_.Plan(shapes));
    auto e = std::make_unique<ShapeEntry>();
    e->plan = std::move(plan);
    ASSIGN_OR_RETURN(e->activations, AllocDevice(e->plan.activation_bytes));
    ASSIGN_OR_RETURN(e->staging_in, AllocPinned(e->plan.staging_in_bytes));
    ASSIGN_OR_RETURN(e->staging_out, AllocPinned(e->plan.staging_out_bytes));
    e->gemms.resize(e->plan.ops.size());
    int64_t fallbacks = 0;
    for (size_t i = 0; i < e->plan.ops.size(); ++i) {
      const DeviceOp& op = e->plan.ops[i];
      if (op.type != DeviceOp::Type::kGemm) continue;
      const void* bias = op.gemm.has_bias ? Address(*e, op.gemm.bias) : nullptr;
      absl::StatusOr<std::unique_ptr<LtGemm>> g =
          MakeLtGemm(slot.lt.get(), op.gemm, bias, options_.workspace_bytes,
                     options_.use_cublaslt);
      if (!g.ok()) return AtNode(g.status(), op.node);
      if ((*g)->fallback) ++fallbacks;
      e->gemms[i] = *std::move(g);
    }
    Count(&Stats::gemm_fallbacks, fallbacks);
    Count(&Stats::plans_built);
    if (slot.cache.size() >=
        static_cast<size_t>(std::max(options_.max_cached_shapes, 1))) {
      auto lru = std::min_element(slot.cache.begin(), slot.cache.end(),
                                  [](const auto& a, const auto& b) {
                                    return a->last_used < b->last_used;
                                  });
      slot.cache.erase(lru);  // the slot's stream is idle between runs
    }
    e->last_used = ++slot.clock;
    slot.cache.push_back(std::move(e));
    return slot.cache.back().get();
  }

  // Runs `e`'s plan on `inputs`.
  absl::Status RunEntry(Slot& slot, ShapeEntry* e, absl::Span<const Tensor> inputs) {
    const DevicePlan& plan = e->plan;
    cudaStream_t stream = slot.stream.get();
    RETURN_IF_ERROR(CheckIndices(plan, inputs));
    RETURN_IF_ERROR(CheckSampleInputs(plan, inputs));
    StageInputs(plan, inputs, e->staging_in.get());
    if (options_.poison_buffers) {
      std::memset(e->staging_out.get(), 0xff, plan.staging_out_bytes);
    }
    absl::Status status;
    // The first run of a shape set goes op by op (it also loads every
    // kernel); later runs replay its graph.
    if (options_.use_cuda_graphs && e->runs > 0) {
      if (e->full == nullptr) {
        absl::StatusOr<GraphExec> g =
            Capture(slot, *e, 0, plan.ops.size(), options_.poison_buffers);
        if (!g.ok()) return g.status();
        e->full = *std::move(g);
      }
      status =
          CudaStatus(cudaGraphLaunch(e->full.get(), stream), "cudaGraphLaunch");
      if (status.ok()) Count(&Stats::graph_launches);
    } else {
      status = Enqueue(slot, *e, 0, plan.ops.size(), options_.poison_buffers);
    }
    // Wait even after an error: nothing may still read the staging buffers.
    absl::Status sync =
        CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    RETURN_IF_ERROR(status);
    RETURN_IF_ERROR(sync);
    UnstageOutputs(plan, e->staging_out.get(), &e->outputs);
    ++e->runs;
    Count(&Stats::runs);
    return absl::OkStatus();
  }

  // Captures ops [begin, end) (after a poisoning memset) into a graph.
  // Thread-local capture mode: other slots' threads may allocate, free and
  // launch meanwhile.
  absl::StatusOr<GraphExec> Capture(Slot& slot, const ShapeEntry& e,
                                    size_t begin, size_t end, bool poison) {
    cudaStream_t stream = slot.stream.get();
    CUDA_RETURN_IF_ERROR(
        cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    absl::Status status = Enqueue(slot, e, begin, end, poison);
    cudaGraph_t graph = nullptr;
    cudaError_t ended = cudaStreamEndCapture(stream, &graph);
    Graph_ owned(graph);
    RETURN_IF_ERROR(status);
    RETURN_IF_ERROR(CudaStatus(ended, "cudaStreamEndCapture(stream, &graph)"));
    cudaGraphExec_t exec = nullptr;
    CUDA_RETURN_IF_ERROR(cudaGraphInstantiate(&exec, graph, 0));
    Count(&Stats::graphs_captured);
    return GraphExec(exec);
  }

  // Enqueues ops [begin, end) of `e`'s plan on the slot's stream.
  absl::Status Enqueue(Slot& slot, const ShapeEntry& e, size_t begin,
                       size_t end, bool poison) {
    if (poison && e.plan.activation_bytes > 0) {
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(e.activations.get(), 0xff,
                                           e.plan.activation_bytes,
                                           slot.stream.get()));
    }
    for (size_t i = begin; i < end; ++i) {
      const DeviceOp& op = e.plan.ops[i];
      RETURN_IF_ERROR(AtNode(EnqueueOp(slot, e, i, op), op.node));
    }
    return absl::OkStatus();
  }

  // The GELU epilogue of a GEMM cuBLASLt had no algorithm for: the
  // elementwise kernel over D, in place (the plan's D is contiguous: ldd is
  // m, and a batch's outputs lie side by side; a GEMM group, whose outputs
  // are padded apart, never has an epilogue).
  static absl::Status GeluInPlace(const GemmOp& g, void* d, cudaStream_t s) {
    const kernels::FloatType t = g.d_type == DType::kBF16  ? kernels::FloatType::kBF16
                                 : g.d_type == DType::kF16 ? kernels::FloatType::kF16
                                                           : kernels::FloatType::kF32;
    CUDA_RETURN_IF_ERROR(kernels::LaunchUnary(t, kernels::UnaryKind::kGeluTanh, d, d,
                                              g.m * g.n * g.batch, s));
    return absl::OkStatus();
  }

  // cuBLASLt, or cublasGemmEx and an epilogue kernel where cuBLASLt had no
  // algorithm.
  absl::Status EnqueueGemm(Slot& slot, const ShapeEntry& e, size_t i, const DeviceOp& op) {
    cudaStream_t s = slot.stream.get();
    const GemmOp& g = op.gemm;
    const LtGemm& lt = *e.gemms[i];
    const float alpha = 1.0f, beta = 0.0f;
    void* d = Address(e, g.d);
    if (lt.fallback) {
      CUBLAS_RETURN_IF_ERROR(cublasGemmStridedBatchedEx(
          slot.blas.get(), g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
          CUBLAS_OP_N, g.m, g.n, g.k, &alpha, Address(e, g.a),
          CudaType(g.ab_type), g.lda, g.stride_a, Address(e, g.b), CudaType(g.ab_type),
          g.ldb, g.stride_b, &beta, d, CudaType(g.d_type), g.ldd, g.stride_d, g.batch,
          ComputeType(g), CUBLAS_GEMM_DEFAULT));
      // The epilogue kernel takes float32 biases and float32 or bfloat16 outputs.
      if ((g.has_bias && g.bias_type != DType::kF32) ||
          (g.d_type == DType::kF16 && (g.has_bias || g.relu))) {
        return absl::UnimplementedError(
            "cuBLASLt has no algorithm for this 16-bit GEMM with a bias or ReLU epilogue");
      }
      // A batch's outputs lie side by side: n * batch columns.
      CUDA_RETURN_IF_ERROR(LaunchBiasRelu(
          d, g.d_type == DType::kBF16, g.has_bias ? F(e, g.bias) : nullptr,
          g.m, g.n * g.batch, g.ldd, g.relu, s));
      return g.gelu ? GeluInPlace(g, d, s) : absl::OkStatus();
    }
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(
        slot.lt.get(), lt.desc.get(), &alpha, Address(e, g.a), lt.a.get(),
        Address(e, g.b), lt.b.get(), &beta, d, lt.d.get(), d, lt.d.get(),
        &lt.algo, slot.workspace.get(),
        static_cast<size_t>(options_.workspace_bytes), s));
    return lt.gelu_after ? GeluInPlace(g, d, s) : absl::OkStatus();
  }

  // The kernels of runtime/cuda/kernels (those the emulator runs as simt).
  // cached_attention: the metadata's device copies into the launch.
  absl::Status EnqueueAttention(const ShapeEntry& e, const DeviceOp& op, cudaStream_t s) {
    auto ints = [&](const BufferRef& r) { return reinterpret_cast<const int64_t*>(Address(e, r)); };
    kernels::PagedCache c = op.paged;
    c.positions = ints(op.src4);
    c.seq = ints(op.seq);
    c.tables = ints(op.tables);
    if (op.rope_q.on) c.rope_q.cos = Address(e, op.rope_q.cos), c.rope_q.sin = Address(e, op.rope_q.sin);
    if (op.rope_k.on) c.rope_k.cos = Address(e, op.rope_k.cos), c.rope_k.sin = Address(e, op.rope_k.sin);
    CUDA_RETURN_IF_ERROR(kernels::LaunchPagedAttention(
        FloatTypeOf(op.ftype), Address(e, op.src), Address(e, op.src2), Address(e, op.src3),
        Address(e, op.cache), c, reinterpret_cast<const int32_t*>(Address(e, op.tiles)),
        op.num_tiles, op.heads, op.scalar, Address(e, op.dst), op.tensor_cores,
        {op.group, op.splits,
         op.splits > 1 ? reinterpret_cast<float*>(Address(e, op.partials)) : nullptr},
        s));
    return absl::OkStatus();
  }

  absl::Status EnqueueKernel(const ShapeEntry& e, const DeviceOp& op, cudaStream_t s) {
    const kernels::FloatType t = FloatTypeOf(op.ftype);
    auto at = [&](const BufferRef& r) { return static_cast<void*>(Address(e, r)); };
    switch (op.type) {
      case DeviceOp::Type::kUnary:
        CUDA_RETURN_IF_ERROR(kernels::LaunchUnary(t, op.unary, at(op.src), at(op.dst), op.n, s));
        return absl::OkStatus();
      case DeviceOp::Type::kSoftmax:
        CUDA_RETURN_IF_ERROR(kernels::LaunchSoftmax(t, at(op.src), at(op.dst), op.rows,
                                                    static_cast<int>(op.cols), op.log, s));
        return absl::OkStatus();
      case DeviceOp::Type::kStridedCopy:
        CUDA_RETURN_IF_ERROR(kernels::LaunchStridedCopy(
            at(op.src), at(op.dst), static_cast<int>(op.element_bytes), op.copy, s));
        return absl::OkStatus();
      case DeviceOp::Type::kProgram: {
        kernels::EwPointers ptrs;
        const BufferRef* srcs[] = {&op.src, &op.src2, &op.src3, &op.src4};
        for (int i = 0; i < op.program.num_inputs; ++i) ptrs.in[i] = at(*srcs[i]);
        ptrs.out = at(op.dst);
        CUDA_RETURN_IF_ERROR(kernels::LaunchProgram(t, op.program, ptrs, s));
        return absl::OkStatus();
      }
      case DeviceOp::Type::kReduce:
        CUDA_RETURN_IF_ERROR(kernels::LaunchReduce(t, at(op.src), at(op.dst), op.reduce, s));
        return absl::OkStatus();
      case DeviceOp::Type::kTriangle:
        CUDA_RETURN_IF_ERROR(kernels::LaunchTriangle(at(op.src), at(op.dst),
                                                     static_cast<int>(op.element_bytes), op.n,
                                                     op.rows, op.cols, op.diagonal, op.upper, s));
        return absl::OkStatus();
      case DeviceOp::Type::kAttention:
        return EnqueueAttention(e, op, s);
      case DeviceOp::Type::kCast:
        CUDA_RETURN_IF_ERROR(kernels::LaunchCast(at(op.src), CastTypeOf(op.cast_from), at(op.dst),
                                                 CastTypeOf(op.cast_to), op.n, s));
        return absl::OkStatus();
      default:  // the transformer blocks' own
        return EnqueueTransformerKernel(e, op, s);
    }
  }

  // Embedding, the norms, rotary embedding and sample_tokens' picks.
  absl::Status EnqueueTransformerKernel(const ShapeEntry& e, const DeviceOp& op, cudaStream_t s) {
    const kernels::FloatType t = FloatTypeOf(op.ftype);
    auto at = [&](const BufferRef& r) { return static_cast<void*>(Address(e, r)); };
    void* r = op.has_residual ? at(op.src4) : nullptr;  // the norms' fused residual add
    void* h = op.has_residual ? at(op.residual_sum) : nullptr;
    switch (op.type) {
      case DeviceOp::Type::kLayerNorm:
        CUDA_RETURN_IF_ERROR(kernels::LaunchLayerNorm(
            t, at(op.src), r, op.has_weight ? at(op.src2) : nullptr,
            op.has_bias ? at(op.src3) : nullptr, at(op.dst), h, op.rows,
            static_cast<int>(op.cols), op.eps, s));
        return absl::OkStatus();
      case DeviceOp::Type::kRotary:
        CUDA_RETURN_IF_ERROR(kernels::LaunchRotary(t, at(op.src), at(op.src2), at(op.src3),
                                                   at(op.dst), op.rotary, s));
        return absl::OkStatus();
      case DeviceOp::Type::kRmsNorm:
        CUDA_RETURN_IF_ERROR(kernels::LaunchRmsNorm(
            t, at(op.src), r, op.has_weight ? at(op.src2) : nullptr, at(op.dst), h, op.rows,
            static_cast<int>(op.cols), op.eps, s));
        return absl::OkStatus();
      case DeviceOp::Type::kEmbedding:
        CUDA_RETURN_IF_ERROR(kernels::LaunchEmbedding(
            t, reinterpret_cast<const int64_t*>(at(op.src)), at(op.src2), at(op.dst), op.n,
            op.rows, op.cols, s));
        return absl::OkStatus();
      case DeviceOp::Type::kSample:
        CUDA_RETURN_IF_ERROR(kernels::LaunchSampleTokens(t, at(op.src), op.rows,
                                                         SampleArgsOf(op, at), s));
        return absl::OkStatus();
      default:
        return absl::InternalError("not a kernels/ op");
    }
  }


  absl::Status EnqueueOp(Slot& slot, const ShapeEntry& e, size_t i,
                         const DeviceOp& op) {
    cudaStream_t s = slot.stream.get();
    switch (op.type) {
      case DeviceOp::Type::kCopyIn:
        CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(Address(e, op.dst),
                                             Address(e, op.src), op.bytes,
                                             cudaMemcpyHostToDevice, s));
        return absl::OkStatus();
      case DeviceOp::Type::kCopyOut:
        CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(Address(e, op.dst),
                                             Address(e, op.src), op.bytes,
                                             cudaMemcpyDeviceToHost, s));
        return absl::OkStatus();
      case DeviceOp::Type::kCopy:
        CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(Address(e, op.dst),
                                             Address(e, op.src), op.bytes,
                                             cudaMemcpyDeviceToDevice, s));
        return absl::OkStatus();
      case DeviceOp::Type::kConvert:
        if (op.dtype == DType::kTF32) {
          CUDA_RETURN_IF_ERROR(
              LaunchToTf32(F(e, op.src), F(e, op.dst), op.n, s));
        } else {
          CUDA_RETURN_IF_ERROR(
              LaunchToBf16(F(e, op.src), Address(e, op.dst), op.n, s));
        }
        return absl::OkStatus();
      case DeviceOp::Type::kGemm:
        return EnqueueGemm(slot, e, i, op);
      case DeviceOp::Type::kFill: {
        const GemmOp& g = op.gemm;
        CUDA_RETURN_IF_ERROR(LaunchFill(
            Address(e, g.d), g.d_type == DType::kBF16,
            g.has_bias ? F(e, g.bias) : nullptr, g.m, g.n, g.ldd, g.relu, s));
        return absl::OkStatus();
      }
      case DeviceOp::Type::kBinary:
        CUDA_RETURN_IF_ERROR(LaunchBinary(ToKernelOp(op.op), F(e, op.src),
                                          F(e, op.src2), F(e, op.dst), op.n,
                                          op.index, s));
        return absl::OkStatus();
      case DeviceOp::Type::kScalar:
        CUDA_RETURN_IF_ERROR(LaunchScalar(ToKernelOp(op.op), F(e, op.src),
                                          op.scalar, op.reverse, F(e, op.dst),
                                          op.n, s));
        return absl::OkStatus();
      case DeviceOp::Type::kRelu:
        CUDA_RETURN_IF_ERROR(LaunchRelu(F(e, op.src), F(e, op.dst), op.n, s));
        return absl::OkStatus();
      default:  // the kernels of runtime/cuda/kernels
        return EnqueueKernel(e, op, s);
    }
  }

  LoweredStage stage_;
  const CudaBackendOptions options_;
  DeviceBuffer weights_;  // shared by every slot, read only
  DeviceKv kv_;           // the KV cache's bookkeeping
  DeviceBuffer cache_;    // the KV cache's keys and values (Arena::kCache)
  mutable std::mutex stats_mu_;
  Stats stats_;  // guarded by stats_mu_ (fused_relus, slots filled in)
  // Declared last, destroyed first: the slots' graphs and plans read the
  // weights.
  SlotPool<Slot> slots_;
};

class CudaBackend : public ComputeBackend {
 public:
  explicit CudaBackend(const CudaBackendOptions& options) : options_(options) {}

  std::string Name() const override {
    return absl::StrCat("cuda:", options_.device);
  }

  absl::StatusOr<std::unique_ptr<StageProgram>> Compile(
      const Graph& stage_graph, const WeightMap& weights) override {
    ASSIGN_OR_RETURN(
        LoweredStage stage,
        LoweredStage::Create(stage_graph, weights, options_.precision,
                             options_.fuse_linear_relu, options_.cuda_ops));
    ASSIGN_OR_RETURN(std::unique_ptr<CudaProgram> prog,
                     CudaProgram::Create(std::move(stage), options_));
    return std::unique_ptr<StageProgram>(std::move(prog));
  }

 private:
  const CudaBackendOptions options_;
};

}  // namespace

bool CudaBuiltIn() { return true; }

absl::StatusOr<int> CudaDeviceCount() {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // do not leave the error for the next call
    return absl::FailedPreconditionError(absl::StrCat(
        "no CUDA device: cudaGetDeviceCount failed: ", cudaGetErrorName(e),
        " (", cudaGetErrorString(e), ")"));
  }
  if (count == 0) {
    return absl::FailedPreconditionError(
        "no CUDA device: cudaGetDeviceCount found none");
  }
  return count;
}

absl::StatusOr<std::unique_ptr<ComputeBackend>> MakeCudaBackend(
    const CudaBackendOptions& options) {
  ASSIGN_OR_RETURN(int count, CudaDeviceCount());
  const int d = options.device;
  if (d < 0 || d >= count) {
    return absl::FailedPreconditionError(absl::StrCat(
        "CUDA device ", d, " does not exist (", count, " device(s) visible)"));
  }
  int major = 0, minor = 0;
  CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d));
  CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d));
  if (major < 9) {
    cudaDeviceProp prop;
    std::memset(&prop, 0, sizeof(prop));
    cudaGetDeviceProperties(&prop, d);
    return absl::FailedPreconditionError(absl::StrCat(
        "CUDA device ", d, " (", prop.name, ") has compute capability ", major,
        ".", minor, "; this build's kernels need 9.0 or newer (sm_90)"));
  }
  if (options.workspace_bytes < 0 || options.max_cached_shapes < 1 ||
      options.concurrent_runs < 1) {
    return absl::InvalidArgumentError(
        "CudaBackendOptions: workspace_bytes must be >= 0, "
        "max_cached_shapes >= 1 and concurrent_runs >= 1");
  }
  // Create the context now, so a broken device fails here and not in the
  // first Compile.
  CUDA_RETURN_IF_ERROR(cudaSetDevice(d));
  CUDA_RETURN_IF_ERROR(cudaFree(nullptr));
  return std::unique_ptr<ComputeBackend>(new CudaBackend(options));
}

}  // namespace pipeserve
