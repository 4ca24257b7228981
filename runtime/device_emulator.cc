#include "runtime/device_emulator.h"

#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "runtime/device_plan.h"
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
  explicit EmulatedProgram(LoweredStage stage) : stage_(std::move(stage)) {
    weights_.resize(stage_.weight_bytes());
    stage_.FillWeights(weights_.data());
    stage_.ReleaseWeights();  // as the CUDA program does after its upload
  }

  absl::StatusOr<std::vector<Tensor>> Run(
      absl::Span<const Tensor> inputs) override {
    RETURN_IF_ERROR(
        CheckTensorsMatch(stage_.graph().inputs(), inputs).status());
    std::vector<Shape> shapes;
    for (const Tensor& t : inputs) shapes.push_back(t.shape());
    ASSIGN_OR_RETURN(DevicePlan plan, stage_.Plan(shapes));
    // NaN everywhere a run should write.
    act_.assign(plan.activation_bytes, '\xff');
    in_.assign(plan.staging_in_bytes, '\xff');
    out_.assign(plan.staging_out_bytes, '\xff');
    StageInputs(plan, inputs, in_.data());
    for (const DeviceOp& op : plan.ops) Execute(op);
    std::vector<Tensor> outputs;
    UnstageOutputs(plan, out_.data(), &outputs);
    return outputs;
  }

 private:
  char* Ptr(const BufferRef& r) {
    switch (r.arena) {
      case Arena::kWeights:
        return weights_.data() + r.offset;
      case Arena::kActivations:
        return act_.data() + r.offset;
      case Arena::kStagingIn:
        return in_.data() + r.offset;
      case Arena::kStagingOut:
        return out_.data() + r.offset;
    }
    return nullptr;
  }
  float* F(const BufferRef& r) { return reinterpret_cast<float*>(Ptr(r)); }
  uint16_t* H(const BufferRef& r) {
    return reinterpret_cast<uint16_t*>(Ptr(r));
  }

  float Load(const BufferRef& r, DType t, int64_t i) {
    return t == DType::kBF16 ? Bf16ToFloat(H(r)[i]) : F(r)[i];
  }
  void Store(const BufferRef& r, DType t, int64_t i, float v) {
    if (t == DType::kBF16) {
      H(r)[i] = FloatToBf16(v);
    } else {
      F(r)[i] = t == DType::kTF32 ? RoundToTf32(v) : v;
    }
  }

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

  void Execute(const DeviceOp& op) {
    switch (op.type) {
      case DeviceOp::Type::kCopyIn:
      case DeviceOp::Type::kCopy:
      case DeviceOp::Type::kCopyOut:
        std::memcpy(Ptr(op.dst), Ptr(op.src), op.bytes);
        return;
      case DeviceOp::Type::kConvert:
        ConvertFloats(F(op.src), op.n, op.dtype, Ptr(op.dst));
        return;
      case DeviceOp::Type::kGemm: {
        // cuBLAS, column-major: D(i, j) = sum_p op(A)(i, p) * B(p, j).
        const GemmOp& g = op.gemm;
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
            if (g.has_bias) v += F(g.bias)[i];
            if (g.relu && v < 0) v = 0;
            Store(g.d, g.d_type, i + j * g.ldd, v);
          }
        }
        return;
      }
      case DeviceOp::Type::kFill: {
        const GemmOp& g = op.gemm;
        for (int64_t j = 0; j < g.n; ++j) {
          for (int64_t i = 0; i < g.m; ++i) {
            float v = g.has_bias ? F(g.bias)[i] : 0.0f;
            if (g.relu && v < 0) v = 0;
            Store(g.d, g.d_type, i + j * g.ldd, v);
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
          float x = F(op.src)[i];
          F(op.dst)
          [i] = op.reverse ? Apply(op.op, op.scalar, x)
                           : Apply(op.op, x, op.scalar);
        }
        return;
      case DeviceOp::Type::kRelu:
        for (int64_t i = 0; i < op.n; ++i) {
          float x = F(op.src)[i];
          F(op.dst)[i] = x < 0 ? 0.0f : x;  // NaN stays NaN, as in PyTorch
        }
        return;
    }
  }

  LoweredStage stage_;
  std::vector<char> weights_, act_, in_, out_;
};

class EmulatorBackend : public ComputeBackend {
 public:
  explicit EmulatorBackend(Precision p) : precision_(p) {}
  std::string Name() const override {
    return absl::StrCat("device_emulator_", PrecisionName(precision_));
  }
  absl::StatusOr<std::unique_ptr<StageProgram>> Compile(
      const Graph& graph, const WeightMap& weights) override {
    ASSIGN_OR_RETURN(LoweredStage stage,
                     LoweredStage::Create(graph, weights, precision_));
    return std::unique_ptr<StageProgram>(new EmulatedProgram(std::move(stage)));
  }

 private:
  const Precision precision_;
};

}  // namespace

std::unique_ptr<ComputeBackend> MakeDeviceEmulatorBackend(Precision precision) {
  return std::make_unique<EmulatorBackend>(precision);
}

}  // namespace pipeserve
