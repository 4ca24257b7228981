// CpuProgram (cpu_program.h): runs a compiled stage's steps in order over
// a vector of values indexed by slot, each step kind with its kernel
// (the float32 fast paths, RunCpuOp, the fused attention, norm and
// elementwise passes, the KV cache's attention), freeing values after their
// last reader and keeping output buffers for the next run.
#include "runtime/cpu/program/cpu_program.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/types/optional.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "graph/shape.h"
#include "graph/validate.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/cpu/kv_cache.h"
#include "runtime/cpu/program/compile.h"
#include "runtime/cpu/program/steps.h"
#include "runtime/signature.h"

namespace pipeserve::cpu_program {
namespace {

BinaryOp BinaryOf(Kind k) {
  return k == Kind::kAdd ? BinaryOp::kAdd
         : k == Kind::kSub ? BinaryOp::kSub
                           : BinaryOp::kMul;
}

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

  ~CpuProgram() override { PrintProfile(); }

  absl::StatusOr<std::vector<Tensor>> Run(
      absl::Span<const Tensor> inputs) override {
    // Kernels allocate their outputs, and some (Tensor::Empty) throw when
    // memory runs out: a request that needs more than there is fails with
    // kResourceExhausted, and the process serving it lives on.
    kv_step_.reset();  // checked at the stage's first cached attention
    absl::StatusOr<std::vector<Tensor>> out = RunCaught(inputs);
    // A step that failed after its cache positions were marked written
    // must not leave them marked: a later step would read them as held.
    if (!out.ok() && kv_step_.has_value()) stage_.kv->AbortStep(*kv_step_);
    return out;
  }

  KvCacheUsage kv_cache() const override {
    if (stage_.kv == nullptr) return {};
    return {stage_.kv->num_blocks(), stage_.kv->blocks_in_use(), stage_.kv->BlockBytes()};
  }

 private:
  CpuProgram(const Graph& graph, const CpuBackendOptions& options)
      : graph_(graph), options_(options) {}

  // Compiles graph_ into stage_ and sizes the per-step run state.
  absl::Status Build(const WeightMap& weights, const ValueShapes& shapes,
                     const ValueTypes& types) {
    RETURN_IF_ERROR(CompileSteps(graph_, weights, shapes, types, options_, &stage_));
    scratch_.resize(stage_.steps.size());
    static const bool profile = [] {
      const char* v = std::getenv("PIPESERVE_CPU_PROFILE");
      return v != nullptr && v[0] != '\0' && v[0] != '0';
    }();
    if (profile) profile_.assign(stage_.steps.size(), 0.0);
    return absl::OkStatus();
  }

  // ---- running the steps ----------------------------------------------------

  absl::StatusOr<std::vector<Tensor>> RunCaught(absl::Span<const Tensor> inputs) {
    try {
      return RunSteps(inputs);
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "out of memory running the stage on inputs of shape ",
          inputs.empty() ? std::string("[]") : ShapeToString(inputs[0].shape()),
          "; send fewer rows per request"));
    }
  }

  absl::StatusOr<std::vector<Tensor>> RunSteps(absl::Span<const Tensor> inputs) {
    RETURN_IF_ERROR(CheckTensorsMatch(graph_.inputs(), inputs).status());
    std::vector<Tensor> values = stage_.constants;
    for (size_t i = 0; i < inputs.size(); ++i) {
      values[stage_.input_slots[i]] = inputs[i];
    }
    SetComputeThreads(options_.threads);
    std::vector<Shape> in_shapes;
    for (size_t step_index = 0; step_index < stage_.steps.size(); ++step_index) {
      {
        // The first run (page faults, oneDNN's JIT) is not profiled.
        StepTimer timer(profile_.empty() || runs_.load() == 0 ? nullptr : &profile_[step_index]);
        RETURN_IF_ERROR(RunStep(step_index, &in_shapes, &values));
      }
      // Values no later step reads go at once, so a long prompt's step
      // holds a few layers' values at a time, not all of them.
      for (int slot : stage_.release_after[step_index]) values[slot] = Tensor();
    }
    ++runs_;
    std::vector<Tensor> outputs;
    outputs.reserve(stage_.output_slots.size());
    for (int slot : stage_.output_slots) outputs.push_back(values[slot]);
    return outputs;
  }

  absl::Status RunStep(size_t step_index, std::vector<Shape>* in_shapes,
                       std::vector<Tensor>* values_ptr) {
    std::vector<Tensor>& values = *values_ptr;
    const Step& step = stage_.steps[step_index];
    in_shapes->clear();
    for (int slot : step.in) in_shapes->push_back(values[slot].shape());
    if (step.w_transposed) {  // shape rules see the weight as [out, in]
      std::reverse((*in_shapes)[1].begin(), (*in_shapes)[1].end());
    }
    switch (step.kind) {
      case Kind::kForward:
      case Kind::kIdentity:
        values[step.out] = values[step.in[0]];
        return absl::OkStatus();
      case Kind::kSkip:
        return absl::OkStatus();
      case Kind::kElementwise:
        return RunElementwise(step_index, &values);
      case Kind::kAttention:
        return RunAttention(step_index, &values);
      case Kind::kCachedAttention:
        return RunCachedAttention(step, &values, &kv_step_);
      case Kind::kGeneric:
        return RunGeneric(step_index, *in_shapes, &values);
      case Kind::kNorm:
        return RunNorm(step_index, &values);
      default:
        break;
    }
    absl::StatusOr<std::vector<Shape>> out_shape = step.schema->infer(*step.node, *in_shapes);
    if (!out_shape.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("node \"", step.node->name(), "\": ", out_shape.status().message()));
    }
    Tensor out = OutputBuffer(step_index, std::move((*out_shape)[0]));
    RETURN_IF_ERROR(Compute(step, values, &out));
    values[step.out] = std::move(out);
    return absl::OkStatus();
  }

  // The float32 fast paths (cpu_kernels.h), into `out` of the step's
  // output shape.
  absl::Status Compute(const Step& step, const std::vector<Tensor>& v,
                       Tensor* out) const {
    const Tensor& a = v[step.in[0]];
    switch (step.kind) {
      case Kind::kMm:
      case Kind::kMatmul: {
        // a [..., K] @ b [K, N]: the leading dims of a are rows (counted
        // from the output: K may be 0).
        const Tensor& b = v[step.in[1]];
        int64_t k = b.dim(0), n = b.dim(1);
        return Gemm(false, n == 0 ? 0 : out->numel() / n, n, k, a.data(), b.data(), 0.0f,
                    out->data());
      }
      case Kind::kLinear: {
        // x [..., K], w [N, K], bias [N]
        const Tensor& w = v[step.in[1]];
        const float* bias = step.in.size() > 2 ? v[step.in[2]].data() : nullptr;
        int64_t n = step.w_transposed ? w.dim(1) : w.dim(0);
        int64_t k = step.w_transposed ? w.dim(0) : w.dim(1);
        return LinearForward(a.data(), w.data(), bias, n == 0 ? 0 : out->numel() / n, n, k,
                             out->data(), step.fused_relu, step.w_transposed);
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

  // Runs a kGeneric step: its attributes resolved from runtime integers
  // when symbolic, its output shape from the op's rule.
  absl::Status RunGeneric(size_t step_index, const std::vector<Shape>& in_shapes,
                          std::vector<Tensor>* values) {
    const Step& step = stage_.steps[step_index];
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
      Keep(step_index, *out);
    }
    (*values)[step.out] = *std::move(out);
    return absl::OkStatus();
  }

  // ---- fused steps ----------------------------------------------------------

  absl::Status RunElementwise(size_t step_index, std::vector<Tensor>* values) {
    const Step& step = stage_.steps[step_index];
    std::vector<const Tensor*> in;
    Shape shape;
    for (int slot : step.in) {
      in.push_back(&(*values)[slot]);
      absl::StatusOr<Shape> b = BroadcastShapes(shape, (*values)[slot].shape());
      if (b.ok()) shape = *b;
    }
    absl::StatusOr<Tensor> out = step.group->Run(in, shape, step.out_type, scratch_[step_index]);
    if (out.ok()) {
      Keep(step_index, *out);
      (*values)[step.out] = *std::move(out);
      return absl::OkStatus();
    }
    if (out.status().code() != absl::StatusCode::kUnimplemented) return out.status();
    // Shapes the fused pass does not take: the member ops one by one.
    return RunMembers(step_index, values);
  }

  absl::Status RunAttention(size_t step_index, std::vector<Tensor>* values) {
    const Step& step = stage_.steps[step_index];
    AttentionMask mask;
    if (step.mask_cond >= 0) mask.cond = &(*values)[step.mask_cond];
    if (step.mask_add >= 0) mask.add = &(*values)[step.mask_add];
    mask.fill = step.mask_fill;
    absl::StatusOr<Tensor> out =
        FusedAttention((*values)[step.in[0]], (*values)[step.in[1]], (*values)[step.in[2]],
                       step.scale, mask, scratch_[step_index]);
    if (!out.ok()) {
      return absl::Status(out.status().code(),
                          absl::StrCat("node \"", step.node->name(), "\" (attention): ",
                                       out.status().message()));
    }
    Keep(step_index, *out);
    (*values)[step.out] = *std::move(out);
    return absl::OkStatus();
  }

  absl::Status RunNorm(size_t step_index, std::vector<Tensor>* values) {
    const Step& step = stage_.steps[step_index];
    const Tensor& x = (*values)[step.in[0]];
    size_t k = 1;
    const Tensor* residual = step.residual ? &(*values)[step.in[k++]] : nullptr;
    const Tensor* w = step.norm_weight ? &(*values)[step.in[k++]] : nullptr;
    const Tensor* b = step.norm_bias ? &(*values)[step.in[k++]] : nullptr;
    Tensor out = Buffer(step.norm_step, x.shape(), x.dtype());
    Tensor sum = residual == nullptr ? Tensor() : Buffer(step_index, x.shape(), x.dtype());
    absl::Status st =
        FusedNorm(step.norm, x, residual, w, b, residual == nullptr ? nullptr : &sum, &out);
    if (st.code() == absl::StatusCode::kUnimplemented) {
      // Shapes the fused pass does not take: the ops one by one.
      sum = Tensor();
      out = Tensor();
      return RunMembers(step_index, values);
    }
    if (!st.ok()) {
      return absl::Status(st.code(),
                          absl::StrCat("node \"", stage_.steps[step.norm_step].node->name(),
                                       "\" (fused norm): ", st.message()));
    }
    if (residual != nullptr) (*values)[step.out] = std::move(sum);
    (*values)[step.norm_out] = std::move(out);
    return absl::OkStatus();
  }

  // Runs a fused step's member ops one by one (the step itself with the
  // inputs it had before fusion).
  absl::Status RunMembers(size_t step_index, std::vector<Tensor>* values) {
    const Step& step = stage_.steps[step_index];
    for (int j : step.members) {
      const Step& m = stage_.steps[j];
      std::vector<const Tensor*> args;
      for (int slot : j == static_cast<int>(step_index) ? step.own_in : m.in) {
        args.push_back(&(*values)[slot]);
      }
      RETURN_IF_ERROR(RunOne(*m.node, args, m.out_type, &(*values)[m.out]));
    }
    return absl::OkStatus();
  }

  // Runs one node through RunCpuOp, its output shape from its schema.
  static absl::Status RunOne(const Node& node, const std::vector<const Tensor*>& args,
                             DataType out_type, Tensor* result) {
    std::vector<Shape> shapes;
    for (const Tensor* t : args) shapes.push_back(t->shape());
    absl::StatusOr<std::vector<Shape>> out_shape = FindOp(node.op())->infer(node, shapes);
    if (!out_shape.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("node \"", node.name(), "\" (", node.op(),
                                                     "): ", out_shape.status().message()));
    }
    ASSIGN_OR_RETURN(*result, RunCpuOp(node, args, (*out_shape)[0], out_type, Tensor()));
    return absl::OkStatus();
  }

  // ---- the KV cache (generation) --------------------------------------------

  // in = {q, k, v, kv_positions, kv_seq, kv_blocks, kv_seq_ids}.
  absl::Status RunCachedAttention(const Step& step, std::vector<Tensor>* values,
                                  absl::optional<KvStep>* kv_step) {
    const std::vector<Tensor>& v = *values;
    absl::Status st;
    if (!kv_step->has_value()) {
      absl::StatusOr<KvStep> checked =
          stage_.kv->BeginStep(v[step.in[3]], v[step.in[4]], v[step.in[5]], v[step.in[6]],
                               v[step.in[0]].rank() == 4 ? v[step.in[0]].dim(2) : -1);
      if (checked.ok()) *kv_step = *std::move(checked);
      st = checked.status();
    }
    absl::StatusOr<Tensor> out =
        st.ok() ? stage_.kv->Attend(step.kv_layer, **kv_step, v[step.in[0]], v[step.in[1]],
                                    v[step.in[2]], step.scale)
                : absl::StatusOr<Tensor>(st);
    if (!out.ok()) {
      return absl::Status(out.status().code(),
                          absl::StrCat("node \"", step.node->name(), "\" (cached_attention): ",
                                       out.status().message()));
    }
    (*values)[step.out] = *std::move(out);
    return absl::OkStatus();
  }

  // ---- output buffers -------------------------------------------------------

  // A buffer for step i's output: last run's, when nobody else holds it any
  // more and it is large enough, else a new one. Reuse matters: a fresh
  // 512 KiB buffer costs 128 page faults on first touch.
  Tensor OutputBuffer(size_t i, Shape shape) { return Buffer(i, shape, DT_FLOAT32); }

  // A buffer for step i's output: its last one when nobody else holds it
  // any more and it is large enough, else a new one.
  Tensor Buffer(size_t i, const Shape& shape, DataType type) {
    Tensor& cached = scratch_[i];
    const int64_t bytes = NumElements(shape) * ElementSize(type);
    if (cached.SoleOwner() && cached.capacity_bytes() >= bytes) {
      return cached.Retyped(type, shape);
    }
    Tensor fresh = Tensor::Empty(shape, type);
    Keep(i, fresh);
    return fresh;
  }

  // Makes `t` step i's buffer for the next runs if the kept buffers stay
  // within kScratchBudget bytes so; else step i keeps none, and `t` is
  // freed once its value is dead (a long prompt's step would otherwise
  // keep every layer's buffers at its size, for good).
  void Keep(size_t i, const Tensor& t) {
    Tensor& cached = scratch_[i];
    if (cached.storage() == t.storage()) return;
    scratch_bytes_ -= cached.capacity_bytes();
    cached = Tensor();
    if (scratch_bytes_ + t.capacity_bytes() > kScratchBudget) return;
    cached = t;
    scratch_bytes_ += t.capacity_bytes();
  }

  // ---- the profile ----------------------------------------------------------

  // PIPESERVE_CPU_PROFILE=1: time spent per op, printed to stderr when the
  // program is destroyed (where a stage's time goes, op by op).
  struct StepTimer {
    explicit StepTimer(double* sink) : sink(sink) {
      if (sink != nullptr) start = absl::Now();
    }
    ~StepTimer() {
      if (sink != nullptr) *sink += absl::ToDoubleMilliseconds(absl::Now() - start);
    }
    double* sink;
    absl::Time start;
  };

  void PrintProfile() const {
    if (profile_.empty()) return;
    const std::vector<Step>& steps = stage_.steps;
    absl::flat_hash_map<std::string, double> by_op;
    double total = 0;
    for (size_t i = 0; i < steps.size(); ++i) {
      std::string name = steps[i].kind == Kind::kAttention     ? "attention (fused)"
                         : steps[i].kind == Kind::kElementwise ? "elementwise (fused)"
                         : steps[i].kind == Kind::kNorm
                             ? absl::StrCat(steps[i].residual ? "add + " : "",
                                            steps[i].norm.rms ? "RMSNorm" : "layer_norm",
                                            " (fused)")
                         : steps[i].kind == Kind::kGeneric
                             ? steps[i].node->op()
                             : absl::StrCat(steps[i].node->op(), " (fast)");
      if (steps[i].kind == Kind::kSkip) continue;
      by_op[name] += profile_[i];
      total += profile_[i];
    }
    std::vector<std::pair<double, std::string>> rows;
    for (const auto& [op, ms] : by_op) rows.emplace_back(ms, op);
    std::sort(rows.rbegin(), rows.rend());
    std::fprintf(stderr, "cpu profile: %.1f ms in %d runs after the first (%.1f ms per run)\n",
                 total, runs_.load() - 1, runs_.load() > 1 ? total / (runs_.load() - 1) : 0.0);
    for (const auto& [ms, op] : rows) {
      std::fprintf(stderr, "  %-24s %10.1f ms  %5.1f%%\n", op.c_str(), ms, 100 * ms / total);
    }
  }

  const Graph graph_;
  const CpuBackendOptions options_;
  CompiledStage stage_;             // graph_ compiled; its steps point into graph_
  absl::optional<KvStep> kv_step_;  // the run's step, once its metadata is checked
  std::vector<Tensor> scratch_;     // per step: its last output buffer
  // Most bytes of scratch_ kept between runs, and those kept now.
  static constexpr int64_t kScratchBudget = int64_t{32} << 20;
  int64_t scratch_bytes_ = 0;
  std::vector<double> profile_;  // per step: ms in runs after the first (when profiling)
  std::atomic<int> runs_{0};     // Run calls so far
};

}  // namespace

absl::StatusOr<std::unique_ptr<StageProgram>> MakeCpuProgram(const Graph& graph,
                                                             const WeightMap& weights,
                                                             const CpuBackendOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<CpuProgram> prog, CpuProgram::Create(graph, weights, options));
  return std::unique_ptr<StageProgram>(std::move(prog));
}

}  // namespace pipeserve::cpu_program
