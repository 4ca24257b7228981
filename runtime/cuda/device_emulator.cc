#include "runtime/cuda/device_emulator.h"

#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/cuda/device_generation.h"
#include "runtime/cuda/device_plan.h"
#include "runtime/cuda/device_slots.h"
#include "runtime/cuda/kernels/sample.h"
#include "runtime/cuda/kernels/elementwise.h"
#include "runtime/cuda/kernels/elementwise_program.h"
#include "runtime/cuda/kernels/cast.h"
#include "runtime/cuda/kernels/embedding.h"
#include "runtime/cuda/kernels/paged_attention.h"
#include "runtime/cuda/kernels/tensor_core_attention.h"
#include "runtime/cuda/kernels/reduction.h"
#include "runtime/cuda/kernels/rotary.h"
#include "runtime/cuda/kernels/triangle.h"
#include "runtime/cuda/kernels/layer_norm.h"
#include "runtime/cuda/kernels/strided_copy.h"
#include "runtime/cuda/simt/simt.h"
#include "runtime/signature.h"

namespace pipeserve {
namespace {

// What TF32 tensor cores may do with a float32 operand: ignore its low 13
// mantissa bits (PyTorch's notes say so; others say they round). The plans
// round operands to TF32 first, so either way nothing is lost here; an
// operand that skipped rounding would show its truncation error.
float TruncateToTf32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u &= ~0x1fffu;
  std::memcpy(&f, &u, 4);
  return f;
}

class EmulatedProgram : public StageProgram {
 public:
  // A stage with a KV cache runs one step at a time (the cache is shared).
  EmulatedProgram(LoweredStage stage, int concurrent_runs)
      : stage_(std::move(stage)),
        kv_(stage_),
        slots_(kv_.present() ? 1 : concurrent_runs, [] {
          return absl::StatusOr<std::unique_ptr<Arenas>>(
              std::make_unique<Arenas>());
        }) {
    cache_.assign(stage_.cache_bytes(), 0);
    weights_.resize(stage_.weight_bytes());
    stage_.FillWeights(weights_.data());
    stage_.ReleaseWeights();  // as the CUDA program does after its upload
  }

  int max_concurrent_runs() const override { return slots_.max_slots(); }
  KvCacheUsage kv_cache() const override { return kv_.usage(); }

  absl::StatusOr<std::vector<Tensor>> Run(
      absl::Span<const Tensor> inputs) override {
    RETURN_IF_ERROR(
        CheckTensorsMatch(stage_.graph().inputs(), inputs).status());
    std::vector<Shape> shapes;
    for (const Tensor& t : inputs) shapes.push_back(t.shape());
    ASSIGN_OR_RETURN(DevicePlan plan, stage_.Plan(shapes));
    RETURN_IF_ERROR(CheckIndices(plan, inputs));
    // Per-run arenas, as the CUDA program's slots; the weights are shared.
    ASSIGN_OR_RETURN(SlotPool<Arenas>::Lease a, slots_.Acquire());
    // NaN everywhere a run should write.
    a->act.assign(plan.activation_bytes, '\xff');
    a->in.assign(plan.staging_in_bytes, '\xff');
    a->out.assign(plan.staging_out_bytes, '\xff');
    ASSIGN_OR_RETURN(std::optional<KvStep> step, kv_.Begin(plan, inputs));
    // After the cache's checks, as on the CPU (cached_attention runs first).
    if (absl::Status s = CheckSampleInputs(plan, inputs); !s.ok()) {
      kv_.Abort(step);
      return s;
    }
    StageInputs(plan, inputs, a->in.data());
    for (const DeviceOp& op : plan.ops) {
      absl::Status s = Execute(*a, op);
      if (!s.ok()) {
        kv_.Abort(step);
        return s;
      }
    }
    std::vector<Tensor> outputs;
    UnstageOutputs(plan, a->out.data(), &outputs);
    kv_.Commit(step);
    return outputs;
  }

 private:
  struct Arenas {
    std::vector<char> act, in, out;
  };

  // Each run's view: the shared weights and cache, and its slot's arenas.
  struct View {
    const std::vector<char>* weights;
    Arenas* a;
    char* cache;

    char* Ptr(const BufferRef& r) const {
      switch (r.arena) {
        case Arena::kWeights:
          // Only ever read (bias, GEMM operands).
          return const_cast<char*>(weights->data()) + r.offset;
        case Arena::kActivations:
          return a->act.data() + r.offset;
        case Arena::kCache:
          return cache + r.offset;
        case Arena::kStagingIn:
          return a->in.data() + r.offset;
        case Arena::kStagingOut:
          return a->out.data() + r.offset;
      }
      return nullptr;
    }
    float* F(const BufferRef& r) const {
      return reinterpret_cast<float*>(Ptr(r));
    }
    uint16_t* H(const BufferRef& r) const {
      return reinterpret_cast<uint16_t*>(Ptr(r));
    }
    float Load(const BufferRef& r, DType t, int64_t i) const {
      return t == DType::kBF16  ? Bf16ToFloat(H(r)[i])
             : t == DType::kF16 ? HalfToFloat(H(r)[i])
                                : F(r)[i];
    }
    void Store(const BufferRef& r, DType t, int64_t i, float v) const {
      if (t == DType::kBF16) {
        H(r)[i] = FloatToBf16(v);
      } else if (t == DType::kF16) {
        H(r)[i] = FloatToHalf(v);
      } else {
        F(r)[i] = t == DType::kTF32 ? RoundToTf32(v) : v;
      }
    }
  };

  static float Apply(ElementwiseOp op, float a, float b) {
    switch (op) {
      case ElementwiseOp::kAdd:
        return a + b;
      case ElementwiseOp::kSub:
        return a - b;
      case ElementwiseOp::kMul:
        return a * b;
    }
    return 0;
  }

  // The kernels' own source (runtime/cuda/kernels) on the simt emulator,
  // launched as the CUDA backend launches them: a race or barrier misuse
  // in one fails the run.
  absl::Status EmulateKernel(Arenas& arenas, const DeviceOp& op) const {
    const View view{&weights_, &arenas, cache_.data()};
    absl::Status s;
    if (op.type == DeviceOp::Type::kStridedCopy) {
      s = EmulateCopy(view, op);
    } else if (op.type == DeviceOp::Type::kTriangle) {
      s = EmulateTriangle(view, op);
    } else if (op.type == DeviceOp::Type::kCast) {
      s = EmulateCast(view, op);
    } else if (op.ftype == DT_FLOAT16) {
      s = EmulateTyped<simt::Half>(view, op);
    } else if (op.ftype == DT_BFLOAT16) {
      s = EmulateTyped<simt::Bf16>(view, op);
    } else {
      s = EmulateTyped<float>(view, op);
    }
    if (!s.ok()) return absl::InternalError(absl::StrCat("node \"", op.node, "\": ", s.message()));
    return absl::OkStatus();
  }

  // The kernels over float values stored as T (float, simt::Half, simt::Bf16).
  template <typename T>
  static absl::Status EmulateTyped(const View& view, const DeviceOp& op) {
    auto at = [&](const BufferRef& r) { return reinterpret_cast<T*>(view.Ptr(r)); };
    const T* x = at(op.src);
    T* y = at(op.dst);
    switch (op.type) {
      case DeviceOp::Type::kProgram: {
        kernels::EwPointers ptrs;
        const BufferRef* srcs[] = {&op.src, &op.src2, &op.src3, &op.src4};
        for (int i = 0; i < op.program.num_inputs; ++i) ptrs.in[i] = view.Ptr(*srcs[i]);
        ptrs.out = view.Ptr(op.dst);
        return simt::Emulate(kernels::ProgramBlocks(op.n), kernels::kProgramThreads,
                             [&] { kernels::ElementwiseProgram<T>(op.program, ptrs); });
      }
      case DeviceOp::Type::kReduce:
        return simt::Emulate(static_cast<unsigned>(op.reduce.out_n), kernels::kReduceThreads,
                             [&] { kernels::Reduce<T>(x, y, op.reduce); });
      case DeviceOp::Type::kAttention:
        return EmulateAttention<T>(view, op);
      case DeviceOp::Type::kEmbedding: {
        const auto* ids = reinterpret_cast<const int64_t*>(view.Ptr(op.src));
        return simt::Emulate(kernels::EmbeddingBlocks(op.n, op.cols), kernels::kEmbeddingThreads,
                             [&] {
                               kernels::EmbeddingRows<T>(ids, at(op.src2), y, op.n, op.rows,
                                                         op.cols);
                             });
      }
      case DeviceOp::Type::kUnary: {
        const int64_t blocks =
            (op.n + kernels::kElementwiseThreads - 1) / kernels::kElementwiseThreads;
        return simt::Emulate(static_cast<unsigned>(blocks), kernels::kElementwiseThreads,
                             [&] { kernels::UnaryElementwise<T>(x, y, op.n, op.unary); });
      }
      case DeviceOp::Type::kSoftmax:
        return simt::Emulate(static_cast<unsigned>(op.rows), kernels::kSoftmaxThreads, [&] {
          kernels::SoftmaxRows<T>(x, y, op.rows, static_cast<int>(op.cols), op.log);
        });
      default:
        return EmulateTransformer<T>(view, op);
    }
  }

  // The norms, rotary embedding and sample_tokens' picks.
  template <typename T>
  static absl::Status EmulateTransformer(const View& view, const DeviceOp& op) {
    auto at = [&](const BufferRef& r) { return reinterpret_cast<T*>(view.Ptr(r)); };
    const T* x = at(op.src);
    T* y = at(op.dst);
    const T* r = op.has_residual ? at(op.src4) : nullptr;  // the norms' fused residual add
    T* h = op.has_residual ? at(op.residual_sum) : nullptr;
    switch (op.type) {
      case DeviceOp::Type::kLayerNorm: {
        const T* w = op.has_weight ? at(op.src2) : nullptr;
        const T* b = op.has_bias ? at(op.src3) : nullptr;
        return simt::Emulate(static_cast<unsigned>(op.rows), kernels::kLayerNormThreads, [&] {
          kernels::LayerNormRows<T, T>(x, r, w, b, y, h, op.rows, static_cast<int>(op.cols),
                                       op.eps);
        });
      }
      case DeviceOp::Type::kRotary: {
        const unsigned blocks = static_cast<unsigned>(
            (op.n + kernels::kElementwiseThreads - 1) / kernels::kElementwiseThreads);
        return simt::Emulate(blocks, kernels::kElementwiseThreads, [&] {
          kernels::RotaryRows<T>(x, at(op.src2), at(op.src3), y, op.rotary);
        });
      }
      case DeviceOp::Type::kRmsNorm: {
        const T* w = op.has_weight ? at(op.src2) : nullptr;
        return simt::Emulate(static_cast<unsigned>(op.rows), kernels::kLayerNormThreads, [&] {
          kernels::RmsNormRows<T, T>(x, r, w, y, h, op.rows, static_cast<int>(op.cols), op.eps);
        });
      }
      case DeviceOp::Type::kSample: {
        const kernels::SampleArgs args =
            SampleArgsOf(op, [&](const BufferRef& r) { return view.Ptr(r); });
        return simt::Emulate(static_cast<unsigned>(op.rows), kernels::kSampleThreads,
                             [&] { kernels::SampleTokenRows<T>(x, args); });
      }
      default:
        return absl::InternalError(absl::StrCat("node \"", op.node, "\": no emulated kernel"));
    }
  }


  // The strided copy kernel for the value's element size.
  static absl::Status EmulateCopy(const View& view, const DeviceOp& op) {
    const unsigned blocks = kernels::CopyBlocks(op.n);
    const int threads = kernels::kCopyThreads;
    char* src = view.Ptr(op.src);
    char* dst = view.Ptr(op.dst);
    switch (op.element_bytes) {
      case 2:
        return simt::Emulate(blocks, threads, [&] {
          kernels::StridedCopy<uint16_t>(reinterpret_cast<uint16_t*>(src),
                                         reinterpret_cast<uint16_t*>(dst), op.copy);
        });
      case 1:
        return simt::Emulate(blocks, threads, [&] {
          kernels::StridedCopy<uint8_t>(reinterpret_cast<uint8_t*>(src),
                                        reinterpret_cast<uint8_t*>(dst), op.copy);
        });
      case 8:
        return simt::Emulate(blocks, threads, [&] {
          kernels::StridedCopy<int64_t>(reinterpret_cast<int64_t*>(src),
                                        reinterpret_cast<int64_t*>(dst), op.copy);
        });
      default:
        return simt::Emulate(blocks, threads, [&] {
          kernels::StridedCopy<float>(reinterpret_cast<float*>(src),
                                      reinterpret_cast<float*>(dst), op.copy);
        });
    }
  }

  // cached_attention: the step's keys and values into the cache, then the
  // attention over it.
  template <typename T>
  static absl::Status EmulateAttention(const View& view, const DeviceOp& op) {
    kernels::PagedCache c = op.paged;
    c.positions = reinterpret_cast<const int64_t*>(view.Ptr(op.src4));
    c.seq = reinterpret_cast<const int64_t*>(view.Ptr(op.seq));
    c.tables = reinterpret_cast<const int64_t*>(view.Ptr(op.tables));
    if (op.rope_q.on) c.rope_q.cos = view.Ptr(op.rope_q.cos), c.rope_q.sin = view.Ptr(op.rope_q.sin);
    if (op.rope_k.on) c.rope_k.cos = view.Ptr(op.rope_k.cos), c.rope_k.sin = view.Ptr(op.rope_k.sin);
    T* cache = reinterpret_cast<T*>(view.Ptr(op.cache));
    auto at = [&](const BufferRef& r) { return reinterpret_cast<T*>(view.Ptr(r)); };
    const kernels::AttentionBlocks blocks{
        op.group, op.splits,
        op.splits > 1 ? reinterpret_cast<float*>(view.Ptr(op.partials)) : nullptr};
    if (const char* why = kernels::AttentionArgsRefusal(std::is_same_v<T, float>, c, op.heads,
                                                        op.tensor_cores, blocks)) {
      return absl::InternalError(absl::StrCat(op.node, ": ", why));  // as the launcher, first
    }
    absl::Status s = simt::Emulate(
        kernels::AppendBlocks(c.tokens, c.kv_heads, c.head_dim), kernels::kKvThreads,
        [&] { kernels::KvAppend<T>(at(op.src2), at(op.src3), cache, c); });
    if (!s.ok() || op.num_tiles == 0) return s;
    const auto* tiles = reinterpret_cast<const int32_t*>(view.Ptr(op.tiles));
    const simt::Dim3 grid(static_cast<unsigned>(op.num_tiles), op.heads);
    if (op.tensor_cores) {  // 16-bit values, whole fragments: or its tiles are not PagedAttention's
      if constexpr (!std::is_same_v<T, float>) {
        return simt::Emulate(grid, kernels::kTcThreads, [&] {
          kernels::TensorCoreAttention<T>(at(op.src), cache, tiles, at(op.dst), c, op.heads,
                                          op.scalar);
        });
      }
      return absl::OkStatus();  // refused above
    }
    const simt::Dim3 paged(grid.x, op.heads / op.group);
    s = simt::Emulate(simt::Dim3(paged.x, paged.y, op.splits), kernels::kAttentionThreads, [&] {
      kernels::PagedAttention<T>(at(op.src), cache, tiles, at(op.dst), c, op.heads, op.scalar,
                                 blocks);
    });
    if (!s.ok() || op.splits == 1) return s;
    return simt::Emulate(paged, kernels::kAttentionThreads, [&] {
      kernels::CombineSplits<T>(tiles, at(op.dst), c, blocks);
    });
  }

  // The cast kernel for the op's two types (float32, int64, bool).
  static absl::Status EmulateCast(const View& view, const DeviceOp& op) {
    char* src = view.Ptr(op.src);
    char* dst = view.Ptr(op.dst);
    auto to = [&](auto in) {
      using In = decltype(in);
      auto run = [&](auto out) {
        using Out = decltype(out);
        return simt::Emulate(kernels::CopyBlocks(op.n), kernels::kCopyThreads, [&] {
          kernels::Cast<In, Out>(reinterpret_cast<const In*>(src), reinterpret_cast<Out*>(dst),
                                 op.n);
        });
      };
      return op.cast_to == DT_INT64      ? run(int64_t{})
             : op.cast_to == DT_BOOL     ? run(uint8_t{})
             : op.cast_to == DT_FLOAT16  ? run(simt::Half{})
             : op.cast_to == DT_BFLOAT16 ? run(simt::Bf16{})
                                         : run(float{});
    };
    return op.cast_from == DT_INT64      ? to(int64_t{})
           : op.cast_from == DT_BOOL     ? to(uint8_t{})
           : op.cast_from == DT_FLOAT16  ? to(simt::Half{})
           : op.cast_from == DT_BFLOAT16 ? to(simt::Bf16{})
                                         : to(float{});
  }

  // The triangle kernel for the value's element size.
  static absl::Status EmulateTriangle(const View& view, const DeviceOp& op) {
    const unsigned blocks = kernels::CopyBlocks(op.n);
    char* src = view.Ptr(op.src);
    char* dst = view.Ptr(op.dst);
    auto run = [&](auto zero) {
      using T = decltype(zero);
      return simt::Emulate(blocks, kernels::kCopyThreads, [&] {
        kernels::Triangle<T>(reinterpret_cast<T*>(src), reinterpret_cast<T*>(dst), op.n, op.rows,
                             op.cols, op.diagonal, op.upper);
      });
    };
    return op.element_bytes == 1   ? run(uint8_t{})
           : op.element_bytes == 2 ? run(uint16_t{})
           : op.element_bytes == 8 ? run(int64_t{})
                                   : run(float{});
  }

  // cuBLAS, column-major: D(i, j) = sum_p op(A)(i, p) * B(p, j), for each
  // GEMM of a batch.
  static void Gemm(const View& view, GemmOp g) {
    for (int64_t i = 0; i < g.batch; ++i) {
      GemmOne(view, g);
      g.a.offset += g.stride_a * DTypeBytes(g.ab_type);
      g.b.offset += g.stride_b * DTypeBytes(g.ab_type);
      g.d.offset += g.stride_d * DTypeBytes(g.d_type);
    }
  }

  static void GemmOne(const View& view, const GemmOp& g) {
    auto Load = [&](const BufferRef& r, DType t, int64_t i) { return view.Load(r, t, i); };
    auto Store = [&](const BufferRef& r, DType t, int64_t i, float x) {
      view.Store(r, t, i, x);
    };
    bool tf32 = g.precision == Precision::kTF32;
    auto operand = [&](const BufferRef& r, int64_t idx) {
      float v = Load(r, g.ab_type, idx);
      return tf32 ? TruncateToTf32(v) : v;
    };
    for (int64_t j = 0; j < g.n; ++j) {
      for (int64_t i = 0; i < g.m; ++i) {
        double acc = 0;
        for (int64_t p = 0; p < g.k; ++p) {
          float a = operand(g.a, g.trans_a ? p + i * g.lda : i + p * g.lda);
          float b = operand(g.b, p + j * g.ldb);
          acc += static_cast<double>(a) * b;
        }
        float v = static_cast<float>(acc);
        if (g.has_bias) v += Load(g.bias, g.bias_type, i);
        if (g.relu && v < 0) v = 0;
        if (g.gelu) v = kernels::ApplyUnary(kernels::UnaryKind::kGeluTanh, v);
        Store(g.d, g.d_type, i + j * g.ldd, v);
      }
    }
  }

  absl::Status Execute(Arenas& arenas, const DeviceOp& op) const {
    const View view{&weights_, &arenas, cache_.data()};
    switch (op.type) {
      case DeviceOp::Type::kCopyIn:
      case DeviceOp::Type::kCopy:
      case DeviceOp::Type::kCopyOut:
        std::memcpy(view.Ptr(op.dst), view.Ptr(op.src), op.bytes);
        return absl::OkStatus();
      case DeviceOp::Type::kConvert:
        ConvertFloats(view.F(op.src), op.n, op.dtype, view.Ptr(op.dst));
        return absl::OkStatus();
      case DeviceOp::Type::kGemm:
        Gemm(view, op.gemm);
        return absl::OkStatus();
      case DeviceOp::Type::kFill:
      case DeviceOp::Type::kBinary:
      case DeviceOp::Type::kScalar:
      case DeviceOp::Type::kRelu:
        Float32Loop(view, op);
        return absl::OkStatus();
      default:  // the kernels of runtime/cuda/kernels
        return EmulateKernel(arenas, op);
    }
  }

  // The ops whose CUDA kernels are cuda_kernels.cu's (float32; not simt
  // source): a GEMM's fill, add/sub/mul and relu, as loops.
  static void Float32Loop(const View& view, const DeviceOp& op) {
    auto F = [&](const BufferRef& r) { return view.F(r); };
    switch (op.type) {
      case DeviceOp::Type::kFill: {
        const GemmOp& g = op.gemm;
        for (int64_t j = 0; j < g.n; ++j) {
          for (int64_t i = 0; i < g.m; ++i) {
            float v = g.has_bias ? view.Load(g.bias, g.bias_type, i) : 0.0f;
            if (g.relu && v < 0) v = 0;
            view.Store(g.d, g.d_type, i + j * g.ldd, v);
          }
        }
        return;
      }
      case DeviceOp::Type::kBinary:
        for (int64_t i = 0; i < op.n; ++i) {
          int64_t ia, ib;
          op.index.Offsets(i, &ia, &ib);
          F(op.dst)[i] = Apply(op.op, F(op.src)[ia], F(op.src2)[ib]);
        }
        return;
      case DeviceOp::Type::kScalar:
        for (int64_t i = 0; i < op.n; ++i) {
          const float x = F(op.src)[i];
          F(op.dst)[i] = op.reverse ? Apply(op.op, op.scalar, x) : Apply(op.op, x, op.scalar);
        }
        return;
      default:  // kRelu
        for (int64_t i = 0; i < op.n; ++i) {
          const float x = F(op.src)[i];
          F(op.dst)[i] = x < 0 ? 0.0f : x;  // NaN stays NaN, as in PyTorch
        }
        return;
    }
  }


  LoweredStage stage_;
  DeviceKv kv_;
  mutable std::vector<char> cache_;  // the KV cache's keys and values (Arena::kCache)
  std::vector<char> weights_;  // read only after construction
  SlotPool<Arenas> slots_;
};

class EmulatorBackend : public ComputeBackend {
 public:
  EmulatorBackend(Precision p, int concurrent_runs)
      : precision_(p), concurrent_runs_(concurrent_runs) {}
  std::string Name() const override {
    return absl::StrCat("device_emulator_", PrecisionName(precision_));
  }
  absl::StatusOr<std::unique_ptr<StageProgram>> Compile(
      const Graph& graph, const WeightMap& weights) override {
    ASSIGN_OR_RETURN(LoweredStage stage,
                     LoweredStage::Create(graph, weights, precision_,
                                          /*fuse_linear_relu=*/true,
                                          // it checks kernels before a GPU does
                                          CudaOps::kUnconfirmed));
    return std::unique_ptr<StageProgram>(
        new EmulatedProgram(std::move(stage), concurrent_runs_));
  }

 private:
  const Precision precision_;
  const int concurrent_runs_;
};

}  // namespace

std::unique_ptr<ComputeBackend> MakeDeviceEmulatorBackend(Precision precision,
                                                          int concurrent_runs) {
  return std::make_unique<EmulatorBackend>(precision, concurrent_runs);
}

}  // namespace pipeserve
