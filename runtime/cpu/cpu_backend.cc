#include "runtime/cpu/cpu_backend.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "partitioner/op_schema.h"
#include "partitioner/validate.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/signature.h"

namespace pipeserve {
namespace {

enum class Kind {
  kMm, kMatmul, kLinear, kAdd, kSub, kMul, kRelu, kClone, kIdentity,
  kForward,  // a ReLU already fused into the linear before it
  kGeneric,  // RunCpuOp (cpu_ops.h): every other op, and other dtypes
};

// The float32 fast paths; everything else is kGeneric.
Kind KindOf(const Node& node, const ValueShapes& shapes, const ValueTypes& types) {
  static const auto* kinds = new absl::flat_hash_map<std::string, Kind>{
      {"mm", Kind::kMm},         {"matmul", Kind::kMatmul},
      {"linear", Kind::kLinear}, {"add", Kind::kAdd},
      {"sub", Kind::kSub},       {"mul", Kind::kMul},
      {"relu", Kind::kRelu},     {"clone", Kind::kClone},
      {"identity", Kind::kIdentity}};
  auto it = kinds->find(node.op());
  if (it == kinds->end()) return Kind::kGeneric;
  if (it->second == Kind::kIdentity) return Kind::kIdentity;
  for (const std::string& v : node.inputs()) {
    if (types.at(v) != DT_FLOAT32) return Kind::kGeneric;
  }
  if (it->second == Kind::kMatmul &&
      (shapes.at(node.inputs(1)).size() != 2 || shapes.at(node.inputs(0)).size() < 2)) {
    return Kind::kGeneric;  // batched or vector operands
  }
  return it->second;
}

bool HasSymbolicAttrs(const Node& node) {
  for (const auto& [key, value] : node.attrs()) {
    if (absl::EndsWith(key, "_from")) return true;
  }
  return false;
}

BinaryOp BinaryOf(Kind k) {
  return k == Kind::kAdd ? BinaryOp::kAdd
         : k == Kind::kSub ? BinaryOp::kSub
                           : BinaryOp::kMul;
}

struct Step {
  Kind kind;
  const Node* node;        // points into CpuProgram::graph_
  const OpSchema* schema;
  std::vector<int> in;     // value slots read
  int out = -1;            // value slot written
  bool fused_relu = false; // linear: apply ReLU in the same pass
  bool w_transposed = false;  // linear: in[1] holds weight^T [in, out]
  bool symbolic = false;      // attributes taken from runtime integers
  DataType out_type = DT_FLOAT32;
};

class CpuProgram : public StageProgram {
 public:
  static absl::StatusOr<std::unique_ptr<CpuProgram>> Create(
      const Graph& graph, const WeightMap& weights,
      const CpuBackendOptions& options) {
    ValueTypes types;
    ASSIGN_OR_RETURN(ValueShapes shapes, ValidateGraph(graph, &types));
    auto prog = std::unique_ptr<CpuProgram>(new CpuProgram(graph, options));
    RETURN_IF_ERROR(prog->Build(weights, shapes, types));
    return prog;
  }

  absl::StatusOr<std::vector<Tensor>> Run(
      absl::Span<const Tensor> inputs) override {
    RETURN_IF_ERROR(CheckTensorsMatch(graph_.inputs(), inputs).status());
    std::vector<Tensor> values = constants_;
    for (size_t i = 0; i < inputs.size(); ++i) {
      values[input_slots_[i]] = inputs[i];
    }
    SetComputeThreads(options_.threads);
    std::vector<Shape> in_shapes;
    for (size_t step_index = 0; step_index < steps_.size(); ++step_index) {
      const Step& step = steps_[step_index];
      in_shapes.clear();
      for (int slot : step.in) in_shapes.push_back(values[slot].shape());
      if (step.w_transposed) {  // shape rules see the weight as [out, in]
        std::reverse(in_shapes[1].begin(), in_shapes[1].end());
      }
      if (step.kind == Kind::kForward || step.kind == Kind::kIdentity) {
        values[step.out] = values[step.in[0]];
        continue;
      }
      if (step.kind == Kind::kGeneric) {
        RETURN_IF_ERROR(RunGeneric(step_index, in_shapes, &values));
        continue;
      }
      absl::StatusOr<std::vector<Shape>> out_shape =
          step.schema->infer(*step.node, in_shapes);
      if (!out_shape.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "node \"", step.node->name(), "\": ", out_shape.status().message()));
      }
      Tensor out = OutputBuffer(step_index, std::move((*out_shape)[0]));
      RETURN_IF_ERROR(Compute(step, values, &out));
      values[step.out] = std::move(out);
    }
    std::vector<Tensor> outputs;
    outputs.reserve(output_slots_.size());
    for (int slot : output_slots_) outputs.push_back(values[slot]);
    return outputs;
  }

 private:
  CpuProgram(const Graph& graph, const CpuBackendOptions& options)
      : graph_(graph), options_(options) {}

  // Runs a kGeneric step: its attributes resolved from runtime integers
  // when symbolic, its output shape from the op's rule.
  absl::Status RunGeneric(size_t step_index, const std::vector<Shape>& in_shapes,
                          std::vector<Tensor>* values) {
    const Step& step = steps_[step_index];
    std::vector<const Tensor*> in;
    for (int slot : step.in) in.push_back(&(*values)[slot]);
    Node resolved;
    const Node* node = step.node;
    if (step.symbolic) {
      std::vector<int64_t> sym(in.size(), 0);
      for (size_t k = 0; k < in.size(); ++k) {
        if (in[k]->rank() == 0 && in[k]->numel() == 1 && in[k]->dtype() != DT_FLOAT32) {
          sym[k] = in[k]->IntAt(0);
        }
      }
      resolved = ResolveSymbolic(*step.node, sym);
      node = &resolved;
    }
    absl::StatusOr<std::vector<Shape>> out_shape = step.schema->infer(*node, in_shapes);
    if (out_shape.ok()) {
      for (int64_t d : (*out_shape)[0]) {
        if (d < 0) {
          out_shape = absl::InvalidArgumentError(
              absl::StrCat("output shape ", ShapeToString((*out_shape)[0]), " is not concrete"));
          break;
        }
      }
    }
    if (!out_shape.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "node \"", step.node->name(), "\" (", step.node->op(), "): ",
          out_shape.status().message()));
    }
    absl::StatusOr<Tensor> out =
        RunCpuOp(*node, in, (*out_shape)[0], step.out_type, scratch_[step_index]);
    if (!out.ok()) {
      return absl::Status(out.status().code(),
                          absl::StrCat("node \"", step.node->name(), "\" (", step.node->op(),
                                       "): ", out.status().message()));
    }
    if (out->storage() != (*values)[step.in.empty() ? 0 : step.in[0]].storage() || step.in.empty()) {
      scratch_[step_index] = *out;
    }
    (*values)[step.out] = *std::move(out);
    return absl::OkStatus();
  }

  absl::Status Build(const WeightMap& weights, const ValueShapes& shapes,
                     const ValueTypes& types) {
    absl::flat_hash_map<std::string, int> slot;
    auto slot_of = [&](const std::string& v) {
      auto [it, inserted] = slot.emplace(v, static_cast<int>(slot.size()));
      return it->second;
    };
    for (const ValueSpec& in : graph_.inputs()) {
      input_slots_.push_back(slot_of(in.name()));
    }
    // Readers of each value, to find linears whose only reader is a ReLU.
    absl::flat_hash_map<std::string, int> readers;
    for (const Node& n : graph_.nodes()) {
      for (const std::string& v : n.inputs()) ++readers[v];
    }
    for (const std::string& v : graph_.outputs()) ++readers[v];

    std::vector<std::pair<int, Tensor>> params;
    absl::flat_hash_map<int, int> linear_step_of_slot;
    absl::flat_hash_map<int, size_t> param_index;  // slot -> index in params
    absl::flat_hash_map<int, int> transposed;      // weight slot -> its ^T slot
    for (const Node& node : graph_.nodes()) {
      if (node.op() == kPipeSplitOp) continue;
      if (node.op() == kParamOp) {
        const std::string& fqn = node.attrs().at("fqn").s();
        auto w = weights.find(fqn);
        if (w == weights.end()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "parameter \"", fqn, "\" has no loaded weights"));
        }
        param_index[slot_of(node.outputs(0))] = params.size();
        params.emplace_back(slot_of(node.outputs(0)), w->second);
        continue;
      }
      if (!HasCpuOp(node.op())) {
        return absl::InvalidArgumentError(
            absl::StrCat("the cpu backend has no kernel for op \"", node.op(), "\""));
      }
      Kind kind = KindOf(node, shapes, types);
      Step step{kind, &node, FindOp(node.op()), {}, slot_of(node.outputs(0))};
      step.symbolic = HasSymbolicAttrs(node);
      step.out_type = types.at(node.outputs(0));
      for (const std::string& v : node.inputs()) step.in.push_back(slot_of(v));
      if (kind == Kind::kRelu && options_.fuse_linear_relu) {
        auto lin = linear_step_of_slot.find(step.in[0]);
        if (lin != linear_step_of_slot.end() && readers[node.inputs(0)] == 1) {
          steps_[lin->second].fused_relu = true;
          step.kind = Kind::kForward;
        }
      }
      if (kind == Kind::kLinear) {
        linear_step_of_slot[step.out] = static_cast<int>(steps_.size());
        // A constant weight [out, in] is transposed once, here, so every
        // run multiplies by [in, out] (the fast GEMM layout).
        auto p = param_index.find(step.in[1]);
        if (p != param_index.end() && kind == Kind::kLinear) {
          const Tensor& w = params[p->second].second;
          auto [t, inserted] = transposed.emplace(step.in[1], -1);
          if (inserted) {
            Tensor wt = Tensor::Empty({w.dim(1), w.dim(0)});
            Transpose(w.data(), w.dim(0), w.dim(1), wt.data());
            t->second = slot_of(absl::StrCat(node.inputs(1), "/transposed"));
            params.emplace_back(t->second, wt);
          }
          step.in[1] = t->second;
          step.w_transposed = true;
        }
      }
      steps_.push_back(std::move(step));
    }
    for (const std::string& v : graph_.outputs()) output_slots_.push_back(slot_of(v));
    constants_.resize(slot.size());
    scratch_.resize(steps_.size());
    for (auto& [s, t] : params) constants_[s] = std::move(t);
    return absl::OkStatus();
  }

  // A buffer for step i's output: last run's, when nobody else holds it any
  // more and it is large enough, else a new one. Reuse matters: a fresh
  // 512 KiB buffer costs 128 page faults on first touch.
  Tensor OutputBuffer(size_t i, Shape shape) {
    Tensor& cached = scratch_[i];
    int64_t bytes = NumElements(shape) * 4;
    if (cached.SoleOwner() && cached.capacity_bytes() >= bytes) {
      return cached.Reshaped(std::move(shape));
    }
    cached = Tensor::Empty(std::move(shape));
    return cached;
  }

  absl::Status Compute(const Step& step, const std::vector<Tensor>& v,
                       Tensor* out) const {
    const Tensor& a = v[step.in[0]];
    switch (step.kind) {
      case Kind::kMm:
      case Kind::kMatmul: {
        // a [..., K] @ b [K, N]: the leading dims of a are rows.
        const Tensor& b = v[step.in[1]];
        int64_t k = b.dim(0), n = b.dim(1);
        return Gemm(false, k == 0 ? 0 : a.numel() / k, n, k, a.data(),
                    b.data(), 0.0f, out->data());
      }
      case Kind::kLinear: {
        // x [..., K], w [N, K], bias [N]
        const Tensor& w = v[step.in[1]];
        const float* bias = step.in.size() > 2 ? v[step.in[2]].data() : nullptr;
        int64_t n = step.w_transposed ? w.dim(1) : w.dim(0);
        int64_t k = step.w_transposed ? w.dim(0) : w.dim(1);
        return LinearForward(a.data(), w.data(), bias,
                             k == 0 ? 0 : a.numel() / k, n, k, out->data(),
                             step.fused_relu, step.w_transposed);
      }
      case Kind::kAdd:
      case Kind::kSub:
      case Kind::kMul: {
        if (HasScalarOperand(*step.node)) {
          const auto& attrs = step.node->attrs();
          auto rev = attrs.find("reverse");
          BinaryScalar(BinaryOf(step.kind), a.data(),
                       static_cast<float>(attrs.at("scalar").f()),
                       rev != attrs.end() && rev->second.i() != 0, a.numel(),
                       out->data());
        } else {
          const Tensor& b = v[step.in[1]];
          BinaryBroadcast(BinaryOf(step.kind), a.data(), a.shape(), b.data(),
                          b.shape(), out->data(), out->shape());
        }
        return absl::OkStatus();
      }
      case Kind::kRelu:
        Relu(a.data(), a.numel(), out->data());
        return absl::OkStatus();
      case Kind::kClone:
        if (a.numel() > 0) std::memcpy(out->data(), a.data(), a.byte_size());
        return absl::OkStatus();
      case Kind::kIdentity:
      case Kind::kForward:
        break;
    }
    return absl::InternalError("unreachable");
  }

  const Graph graph_;
  const CpuBackendOptions options_;
  std::vector<Step> steps_;
  std::vector<Tensor> constants_;  // weights in their slots, others empty
  std::vector<Tensor> scratch_;    // per step: its last output buffer
  std::vector<int> input_slots_;
  std::vector<int> output_slots_;
};

class CpuBackend : public ComputeBackend {
 public:
  explicit CpuBackend(const CpuBackendOptions& options) : options_(options) {}

  std::string Name() const override { return "cpu"; }

  absl::StatusOr<std::unique_ptr<StageProgram>> Compile(
      const Graph& stage_graph, const WeightMap& weights) override {
    ASSIGN_OR_RETURN(std::unique_ptr<CpuProgram> prog,
                     CpuProgram::Create(stage_graph, weights, options_));
    return std::unique_ptr<StageProgram>(std::move(prog));
  }

 private:
  const CpuBackendOptions options_;
};

}  // namespace

std::unique_ptr<ComputeBackend> MakeCpuBackend(const CpuBackendOptions& options) {
  return std::make_unique<CpuBackend>(options);
}

}  // namespace pipeserve
