#include "runtime/cpu/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/types/optional.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "graph/op_schema.h"
#include "graph/validate.h"
#include "runtime/cpu/cpu_kernels.h"
#include "runtime/cpu/cpu_ops.h"
#include "runtime/cpu/kv_cache.h"
#include "runtime/signature.h"

namespace pipeserve {
namespace {

enum class Kind {
  kMm, kMatmul, kLinear, kAdd, kSub, kMul, kRelu, kClone, kIdentity,
  kForward,  // a ReLU already fused into the linear before it
  kGeneric,  // RunCpuOp (cpu_ops.h): every other op, and other dtypes
  kAttention,  // matmul -> scale -> mask -> softmax -> matmul, fused
  kCachedAttention,  // cached_attention: the stage's KvCache (kv_cache.h)
  kElementwise,  // a group of elementwise ops in one pass (ElementwiseGroup)
  kNorm,       // [add ->] layer_norm or RMSNorm in one pass (FusedNorm)
  kSkip,       // folded into a kAttention, kElementwise or kNorm step
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
  // kAttention: in = {q, k, v}; the scale and the mask (value slots).
  float scale = 1.0f;
  int kv_layer = -1;  // kCachedAttention: the layer in the program's cache
  int mask_cond = -1, mask_add = -1;
  float mask_fill = 0.0f;
  // kElementwise: the group, its external inputs are `in`; its member
  // steps (this one last), run one by one when a shape does not fit.
  std::shared_ptr<const ElementwiseGroup> group;
  std::vector<int> members;
  std::vector<int> own_in;  // the last member's own inputs
  // kNorm: in = {x, residual?, weight?, bias?}; at the residual add (`out`
  // the sum) or, without one, at the norm's last step. norm_step is the
  // step whose result the norm's is (its buffer is reused), norm_out its
  // slot; `members` (with `own_in`) run the ops one by one when the fused
  // pass cannot take the shapes.
  NormKind norm;
  bool residual = false, norm_weight = false, norm_bias = false;
  int norm_step = -1, norm_out = -1;
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
    // Kernels allocate their outputs, and some (Tensor::Empty) throw when
    // memory runs out: a request that needs more than there is fails with
    // kResourceExhausted, and the process serving it lives on.
    kv_step_.reset();  // checked at the stage's first cached attention
    absl::StatusOr<std::vector<Tensor>> out = RunCaught(inputs);
    // A step that failed after its cache positions were marked written
    // must not leave them marked: a later step would read them as held.
    if (!out.ok() && kv_step_.has_value()) kv_->AbortStep(*kv_step_);
    return out;
  }

 private:
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
    std::vector<Tensor> values = constants_;
    for (size_t i = 0; i < inputs.size(); ++i) {
      values[input_slots_[i]] = inputs[i];
    }
    SetComputeThreads(options_.threads);
    std::vector<Shape> in_shapes;
    for (size_t step_index = 0; step_index < steps_.size(); ++step_index) {
      {
        // The first run (page faults, oneDNN's JIT) is not profiled.
        StepTimer timer(profile_.empty() || runs_.load() == 0 ? nullptr : &profile_[step_index]);
        RETURN_IF_ERROR(RunStep(step_index, &in_shapes, &values));
      }
      // Values no later step reads go at once, so a long prompt's step
      // holds a few layers' values at a time, not all of them.
      for (int slot : release_after_[step_index]) values[slot] = Tensor();
    }
    ++runs_;
    std::vector<Tensor> outputs;
    outputs.reserve(output_slots_.size());
    for (int slot : output_slots_) outputs.push_back(values[slot]);
    return outputs;
  }

  absl::Status RunStep(size_t step_index, std::vector<Shape>* in_shapes,
                       std::vector<Tensor>* values_ptr) {
    std::vector<Tensor>& values = *values_ptr;
    const Step& step = steps_[step_index];
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

  // Per step, the value slots whose last reader it is (none of the
  // outputs): a fused step reads its members' inputs too.
  void FindLastReaders() {
    absl::flat_hash_map<int, size_t> last;
    auto reads = [&](const Step& st, size_t at) {
      for (int v : st.in) last[v] = at;
      for (int v : st.own_in) last[v] = at;
      for (int v : {st.mask_cond, st.mask_add}) {
        if (v >= 0) last[v] = at;
      }
    };
    for (size_t i = 0; i < steps_.size(); ++i) {
      reads(steps_[i], i);
      for (int m : steps_[i].members) {
        reads(steps_[m], i);
        last[steps_[m].out] = i;  // run one by one, members write and read their own
      }
    }
    for (int v : output_slots_) last.erase(v);
    release_after_.assign(steps_.size(), {});
    for (const auto& [slot, at] : last) release_after_[at].push_back(slot);
  }

  CpuProgram(const Graph& graph, const CpuBackendOptions& options)
      : graph_(graph), options_(options) {}

 public:
  ~CpuProgram() override { PrintProfile(); }

 private:
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
    absl::flat_hash_map<std::string, double> by_op;
    double total = 0;
    for (size_t i = 0; i < steps_.size(); ++i) {
      std::string name = steps_[i].kind == Kind::kAttention     ? "attention (fused)"
                         : steps_[i].kind == Kind::kElementwise ? "elementwise (fused)"
                         : steps_[i].kind == Kind::kNorm
                             ? absl::StrCat(steps_[i].residual ? "add + " : "",
                                            steps_[i].norm.rms ? "RMSNorm" : "layer_norm",
                                            " (fused)")
                         : steps_[i].kind == Kind::kGeneric
                             ? steps_[i].node->op()
                             : absl::StrCat(steps_[i].node->op(), " (fast)");
      if (steps_[i].kind == Kind::kSkip) continue;
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

  absl::Status RunElementwise(size_t step_index, std::vector<Tensor>* values) {
    const Step& step = steps_[step_index];
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

  // Runs a fused step's member ops one by one (the step itself with the
  // inputs it had before fusion).
  absl::Status RunMembers(size_t step_index, std::vector<Tensor>* values) {
    const Step& step = steps_[step_index];
    for (int j : step.members) {
      const Step& m = steps_[j];
      std::vector<const Tensor*> args;
      for (int slot : j == static_cast<int>(step_index) ? step.own_in : m.in) {
        args.push_back(&(*values)[slot]);
      }
      RETURN_IF_ERROR(RunOne(*m.node, args, m.out_type, &(*values)[m.out]));
    }
    return absl::OkStatus();
  }

  absl::Status RunAttention(size_t step_index, std::vector<Tensor>* values) {
    const Step& step = steps_[step_index];
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

  // in = {q, k, v, kv_positions, kv_seq, kv_blocks, kv_seq_ids}.
  absl::Status RunCachedAttention(const Step& step, std::vector<Tensor>* values,
                                  absl::optional<KvStep>* kv_step) {
    const std::vector<Tensor>& v = *values;
    absl::Status st;
    if (!kv_step->has_value()) {
      absl::StatusOr<KvStep> checked =
          kv_->BeginStep(v[step.in[3]], v[step.in[4]], v[step.in[5]], v[step.in[6]],
                         v[step.in[0]].rank() == 4 ? v[step.in[0]].dim(2) : -1);
      if (checked.ok()) *kv_step = *std::move(checked);
      st = checked.status();
    }
    absl::StatusOr<Tensor> out =
        st.ok() ? kv_->Attend(step.kv_layer, **kv_step, v[step.in[0]], v[step.in[1]],
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

  KvCacheUsage kv_cache() const override {
    if (kv_ == nullptr) return {};
    return {kv_->num_blocks(), kv_->blocks_in_use(), kv_->BlockBytes()};
  }

  // The program's KV cache layer for cached_attention `node` (the cache
  // is made with the first: num_blocks and block_size are the model's,
  // set on every such node by the coordinator).
  int AddCacheLayer(const Node& node, DataType dtype) {
    if (kv_ == nullptr) {
      kv_ = std::make_unique<KvCache>(IntAttr(node, "num_blocks", 0),
                                      static_cast<int>(IntAttr(node, "block_size", 16)));
    }
    return kv_->AddLayer(static_cast<int>(IntAttr(node, "kv_heads", 1)),
                         static_cast<int>(IntAttr(node, "head_dim", 1)), dtype);
  }

  absl::Status RunNorm(size_t step_index, std::vector<Tensor>* values) {
    const Step& step = steps_[step_index];
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
      return absl::Status(st.code(), absl::StrCat("node \"", steps_[step.norm_step].node->name(),
                                                  "\" (fused norm): ", st.message()));
    }
    if (residual != nullptr) (*values)[step.out] = std::move(sum);
    (*values)[step.norm_out] = std::move(out);
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

  struct SlotUses;  // below

  // A norm found in the graph: its input, weight and bias slots, its steps
  // (in order) and the step whose result is the norm's.
  struct NormMatch {
    NormKind kind;
    int x = -1, weight = -1, bias = -1;
    std::vector<int> steps;
    int last = -1;
  };

  // The RMSNorm pattern ending at step i: mul(w, mul(x, rsqrt(add(mean(
  // pow(x, 2), [-1], keepdim), eps)))), either operand order of the muls,
  // every value between read once, w of x's last dim.
  bool MatchRms(int i, const SlotUses& uses, const ValueShapes& shapes, NormMatch* m) const {
    auto made_by = [&](int slot, const char* op) -> const Step* {
      auto p = uses.producer.find(slot);
      if (p == uses.producer.end() || uses.readers.at(slot) != 1) return nullptr;
      const Step& s = steps_[p->second];
      if (s.node->op() != op || s.kind == Kind::kSkip || s.symbolic) return nullptr;
      return &s;
    };
    auto index = [&](const Step* s) { return static_cast<int>(s - steps_.data()); };
    const Step& root = steps_[i];
    if (root.node->op() != "mul" || root.in.size() != 2 || HasScalarOperand(*root.node)) {
      return false;
    }
    for (int wi : {0, 1}) {
      const Step* h = made_by(root.in[1 - wi], "mul");
      if (h == nullptr || h->in.size() != 2 || HasScalarOperand(*h->node)) continue;
      for (int xi : {0, 1}) {
        const Step* r = made_by(h->in[1 - xi], "rsqrt");
        const Step* a = r == nullptr ? nullptr : made_by(r->in[0], "add");
        if (a == nullptr || !HasScalarOperand(*a->node)) continue;
        const Step* mean = made_by(a->in[0], "mean");
        if (mean == nullptr || IntAttr(*mean->node, "keepdim", 0) == 0) continue;
        const Shape& xs = shapes.at(h->node->inputs(xi));
        const std::vector<int64_t> dims = ResolvedInts(*mean->node, "dims", {}, -1);
        if (xs.empty() || dims.size() != 1 ||
            (dims[0] != -1 && dims[0] != static_cast<int64_t>(xs.size()) - 1)) {
          continue;
        }
        const Step* pow = made_by(mean->in[0], "pow");
        if (pow == nullptr || !HasScalarOperand(*pow->node) ||
            IntAttr(*pow->node, "reverse", 0) != 0 || FloatAttr(*pow->node, "scalar", 0) != 2 ||
            pow->in[0] != h->in[xi]) {
          continue;
        }
        const Shape& ws = shapes.at(root.node->inputs(wi));
        if (NumElements(ws) != xs.back() || shapes.at(root.node->outputs(0)) != xs) continue;
        m->kind.rms = true;
        m->kind.ndim = 1;
        m->kind.eps = static_cast<float>(FloatAttr(*a->node, "scalar", 0));
        m->x = h->in[xi];
        m->weight = root.in[wi];
        m->steps = {index(pow), index(mean), index(a), index(r), index(h), i};
        m->last = i;
        return true;
      }
    }
    return false;
  }

  // Finds each layer_norm and each RMSNorm pattern (float32, bfloat16 or
  // float16, one dtype throughout) and runs it as one kNorm step. When its
  // input is made by add(x, residual) (x of the sum's shape, the residual
  // of it or of its trailing dims; the norm's weight and bias made before
  // the add), the add joins: the pre-norm transformer's residual stream,
  // where the sum is read again later. A lone layer_norm is left as it is
  // (it is one pass already).
  void FuseNorms(const ValueShapes& shapes, const ValueTypes& types) {
    SlotUses uses = CountSlotUses();
    for (size_t i = 0; i < steps_.size(); ++i) {
      Step& last = steps_[i];
      if (last.kind == Kind::kSkip || last.symbolic) continue;
      NormMatch m;
      if (last.node->op() == "layer_norm" && last.kind == Kind::kGeneric) {
        m.kind.ndim = IntAttr(*last.node, "ndim", 1);
        m.kind.eps = static_cast<float>(FloatAttr(*last.node, "eps", 1e-5));
        m.x = last.in[0];
        size_t k = 1;
        if (IntAttr(*last.node, "has_weight", 0)) m.weight = last.in[k++];
        if (IntAttr(*last.node, "has_bias", 0)) m.bias = last.in[k++];
        m.steps = {static_cast<int>(i)};
        m.last = static_cast<int>(i);
      } else if (!MatchRms(static_cast<int>(i), uses, shapes, &m)) {
        continue;
      }
      const DataType type = last.out_type;
      if (type != DT_FLOAT32 && type != DT_BFLOAT16 && type != DT_FLOAT16) continue;
      bool one_type = true;
      for (int j : m.steps) {
        for (const std::string& v : steps_[j].node->inputs()) {
          one_type = one_type && types.at(v) == type;
        }
      }
      if (!one_type) continue;
      // The residual add, if the norm's input is one.
      int host = m.last;
      std::vector<int> residual;
      auto p = uses.producer.find(m.x);
      if (p != uses.producer.end()) {
        const int ai = p->second;
        const Step& add = steps_[ai];
        std::vector<int> in = add.in;
        std::vector<std::string> names;
        for (const std::string& v : add.node->inputs()) names.push_back(v);
        const Shape& sum_shape = shapes.at(add.node->outputs(0));
        bool ok = add.node->op() == "add" &&
                  (add.kind == Kind::kAdd || add.kind == Kind::kGeneric) && !add.symbolic &&
                  in.size() == 2 && !HasScalarOperand(*add.node) &&
                  FloatAttr(*add.node, "alpha", 1) == 1 && add.out_type == type;
        if (ok && shapes.at(names[0]) != sum_shape) {
          std::swap(in[0], in[1]);
          std::swap(names[0], names[1]);
        }
        ok = ok && shapes.at(names[0]) == sum_shape && types.at(names[0]) == type &&
             types.at(names[1]) == type;
        for (int slot : {m.weight, m.bias}) {
          if (slot < 0) continue;
          auto q = uses.producer.find(slot);
          ok = ok && (q == uses.producer.end() || q->second < ai);
        }
        if (ok) {
          const Shape& r = shapes.at(names[1]);
          size_t first = 0;
          while (first < r.size() && r[first] == 1) ++first;
          ok = r.size() - first <= sum_shape.size() &&
               std::equal(r.begin() + first, r.end(), sum_shape.end() - (r.size() - first));
        }
        if (ok) {
          host = ai;
          residual = in;
        }
      }
      if (residual.empty() && !m.kind.rms) continue;
      Step& h = steps_[host];
      std::vector<int> members = m.steps;
      if (host != m.last) members.insert(members.begin(), host);
      h.own_in = h.in;
      h.members = members;
      h.in = residual.empty() ? std::vector<int>{m.x} : residual;
      if (m.weight >= 0) h.in.push_back(m.weight);
      if (m.bias >= 0) h.in.push_back(m.bias);
      h.kind = Kind::kNorm;
      h.norm = m.kind;
      h.residual = !residual.empty();
      h.norm_weight = m.weight >= 0;
      h.norm_bias = m.bias >= 0;
      h.norm_step = m.last;
      h.norm_out = steps_[m.last].out;
      for (int j : members) {
        if (j != host) steps_[j].kind = Kind::kSkip;
      }
      ++fused_norms_;
    }
  }

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

  // Groups elementwise float ops (ElementwiseGroup::Fusable) of one shape
  // whose values between them have no other reader into one kElementwise
  // step at the last of them.
  void FuseElementwise(const ValueShapes& shapes, const ValueTypes& types) {
    // Named, not a structured binding: clang 14 cannot capture those in lambdas.
    SlotUses uses = CountSlotUses();
    auto& producer = uses.producer;
    auto& readers = uses.readers;
    std::vector<bool> grouped(steps_.size(), false);
    auto candidate = [&](int i) {
      const Step& s = steps_[i];
      if (s.kind == Kind::kSkip || s.kind == Kind::kAttention || s.kind == Kind::kNorm ||
          s.kind == Kind::kForward ||
          s.kind == Kind::kIdentity || s.kind == Kind::kElementwise || s.fused_relu ||
          s.symbolic || !ElementwiseGroup::Fusable(*s.node)) {
        return false;
      }
      if (s.out_type != DT_FLOAT32 && s.out_type != DT_BFLOAT16) return false;
      for (const std::string& v : s.node->inputs()) {
        if (types.at(v) != s.out_type) return false;
      }
      return true;
    };
    for (int i = static_cast<int>(steps_.size()) - 1; i >= 0; --i) {
      if (grouped[i] || !candidate(i)) continue;
      const Shape& out_shape = shapes.at(steps_[i].node->outputs(0));
      std::vector<int> members = {i}, work = {i};
      while (!work.empty()) {
        const int m = work.back();
        work.pop_back();
        for (int v : steps_[m].in) {
          auto p = producer.find(v);
          if (p == producer.end()) continue;
          const int j = p->second;
          if (grouped[j] || std::find(members.begin(), members.end(), j) != members.end() ||
              !candidate(j) || readers[v] != 1 ||
              shapes.at(steps_[j].node->outputs(0)) != out_shape) {
            continue;
          }
          members.push_back(j);
          work.push_back(j);
        }
      }
      if (members.size() < 2) continue;
      std::sort(members.begin(), members.end());
      absl::flat_hash_map<int, int> op_of;  // member step -> op index
      std::vector<int> externals;
      auto operand = [&](int slot) {
        auto p = producer.find(slot);
        if (p != producer.end() && op_of.contains(p->second)) return op_of[p->second];
        auto e = std::find(externals.begin(), externals.end(), slot);
        if (e == externals.end()) {
          externals.push_back(slot);
          e = externals.end() - 1;
        }
        return -1 - static_cast<int>(e - externals.begin());
      };
      std::vector<ElementwiseGroup::Op> ops;
      for (int j : members) {
        ElementwiseGroup::Op op{steps_[j].node};
        op.a = operand(steps_[j].in[0]);
        if (steps_[j].in.size() > 1) op.b = operand(steps_[j].in[1]);
        op_of[j] = static_cast<int>(ops.size());
        ops.push_back(op);
      }
      Step& root = steps_[i];
      root.group = std::make_shared<ElementwiseGroup>(std::move(ops),
                                                      static_cast<int>(externals.size()));
      root.members = members;
      for (int j : members) {
        grouped[j] = true;
        if (j != i) steps_[j].kind = Kind::kSkip;
      }
      root.kind = Kind::kElementwise;
      root.own_in = root.in;
      root.in = externals;
      ++fused_elementwise_;
    }
  }

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
      Keep(step_index, *out);
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
      const bool cached = node.op() == "cached_attention";
      if (!cached && !HasCpuOp(node.op())) {
        return absl::InvalidArgumentError(
            absl::StrCat("the cpu backend has no kernel for op \"", node.op(), "\""));
      }
      Kind kind = cached ? Kind::kCachedAttention : KindOf(node, shapes, types);
      Step step{kind, &node, FindOp(node.op()), {}, slot_of(node.outputs(0))};
      step.symbolic = HasSymbolicAttrs(node);
      step.out_type = types.at(node.outputs(0));
      for (const std::string& v : node.inputs()) step.in.push_back(slot_of(v));
      if (cached) {
        step.kv_layer = AddCacheLayer(node, types.at(node.inputs(0)));
        step.scale = static_cast<float>(FloatAttr(node, "scale", 1.0));
      }
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
    if (options_.fuse_attention) FuseAttention(shapes, types);
    if (options_.fuse_elementwise) FuseNorms(shapes, types);
    if (options_.fuse_elementwise) FuseElementwise(shapes, types);
    constants_.resize(slot.size());
    scratch_.resize(steps_.size());
    FindLastReaders();
    static const bool profile = [] {
      const char* v = std::getenv("PIPESERVE_CPU_PROFILE");
      return v != nullptr && v[0] != '\0' && v[0] != '0';
    }();
    if (profile) profile_.assign(steps_.size(), 0.0);
    // Keep only the weights some step reads: a linear weight whose every
    // reader takes its transposed copy is not held twice.
    const absl::flat_hash_map<int, int> slot_readers = CountSlotUses().readers;
    for (auto& [s, t] : params) {
      if (slot_readers.contains(s)) constants_[s] = std::move(t);
    }
    return absl::OkStatus();
  }

  // Who makes each value slot (step index) and how often live steps and
  // the outputs read it; the fusion passes and the weight pruning use it.
  struct SlotUses {
    absl::flat_hash_map<int, int> producer;
    absl::flat_hash_map<int, int> readers;
  };
  SlotUses CountSlotUses() const {
    SlotUses u;
    for (size_t i = 0; i < steps_.size(); ++i) {
      u.producer[steps_[i].out] = static_cast<int>(i);
      if (steps_[i].kind == Kind::kSkip) continue;
      for (int v : steps_[i].in) ++u.readers[v];
      if (steps_[i].mask_cond >= 0) ++u.readers[steps_[i].mask_cond];
      if (steps_[i].mask_add >= 0) ++u.readers[steps_[i].mask_add];
    }
    for (int v : output_slots_) ++u.readers[v];
    return u;
  }

  // Finds matmul(q, k^T) -> [mul/div by a number] -> [where(mask, c, .) or
  // + mask] -> softmax(-1) -> matmul(., v), every value in between read
  // once (identities and casts seen through), and turns the last matmul
  // into one kAttention step; the others become kSkip.
  void FuseAttention(const ValueShapes& shapes, const ValueTypes& types) {
    // Named, not a structured binding: clang 14 cannot capture those in lambdas.
    SlotUses uses = CountSlotUses();
    auto& producer = uses.producer;
    auto& readers = uses.readers;
    auto step_of = [&](int slot) -> Step* {
      auto it = producer.find(slot);
      return it == producer.end() ? nullptr : &steps_[it->second];
    };
    auto op_of = [&](Step* s) { return s == nullptr ? std::string() : s->node->op(); };
    for (Step& last : steps_) {
      if (last.node->op() != "matmul" || last.kind == Kind::kSkip) continue;
      std::vector<Step*> chain;
      // Back from the probabilities through identities and casts.
      auto back = [&](int slot) {
        Step* s = step_of(slot);
        while (s != nullptr && (s->kind == Kind::kIdentity || op_of(s) == "cast") &&
               readers[slot] == 1) {
          chain.push_back(s);
          slot = s->in[0];
          s = step_of(slot);
        }
        return std::make_pair(slot, s);
      };
      auto [p_slot, softmax] = back(last.in[0]);
      if (op_of(softmax) != "softmax" || readers[p_slot] != 1) continue;
      const Shape& sshape = shapes.at(softmax->node->inputs(0));
      int64_t dim = IntAttr(*softmax->node, "dim", -1);
      if (dim != -1 && dim != static_cast<int64_t>(sshape.size()) - 1) continue;
      chain.push_back(softmax);
      auto [s2_slot, masked] = back(softmax->in[0]);
      if (readers[s2_slot] != 1) continue;
      int s1_slot = s2_slot;
      int cond = -1, add = -1;
      float fill = 0.0f;
      if (op_of(masked) == "where" && !HasScalarOperand(*masked->node)) {
        Step* c = step_of(masked->in[1]);
        if (op_of(c) != "full" || !ResolvedInts(*c->node, "shape", {}, -1).empty()) continue;
        fill = static_cast<float>(FloatAttr(*c->node, "value", 0));
        cond = masked->in[0];
        s1_slot = masked->in[2];
        chain.push_back(masked);
      } else if (op_of(masked) == "add" && !HasScalarOperand(*masked->node)) {
        add = masked->in[1];
        s1_slot = masked->in[0];
        chain.push_back(masked);
      }
      if (readers[s1_slot] != 1) continue;
      float scale = 1.0f;
      int s0_slot = s1_slot;
      Step* scaled = step_of(s1_slot);
      if ((op_of(scaled) == "mul" || op_of(scaled) == "div") && HasScalarOperand(*scaled->node) &&
          IntAttr(*scaled->node, "reverse", 0) == 0) {
        const float v = static_cast<float>(FloatAttr(*scaled->node, "scalar", 1));
        scale = op_of(scaled) == "mul" ? v : 1.0f / v;
        s0_slot = scaled->in[0];
        chain.push_back(scaled);
      }
      Step* scores = step_of(s0_slot);
      if (op_of(scores) != "matmul" || readers[s0_slot] != 1) continue;
      Step* kt = step_of(scores->in[1]);
      if (op_of(kt) != "permute" || readers[scores->in[1]] != 1) continue;
      const Shape& kshape = shapes.at(kt->node->inputs(0));
      std::vector<int64_t> dims = ResolvedInts(*kt->node, "dims", {}, -1);
      const int r = static_cast<int>(kshape.size());
      bool swap_last = r >= 2 && static_cast<int>(dims.size()) == r;
      for (int i = 0; swap_last && i < r; ++i) {
        int want = i == r - 2 ? r - 1 : i == r - 1 ? r - 2 : i;
        swap_last = dims[i] == want;
      }
      if (!swap_last || shapes.at(scores->node->inputs(0)).size() != kshape.size() ||
          shapes.at(last.node->inputs(1)).size() != kshape.size()) {
        continue;
      }
      if (!IsFloatingPoint(types.at(scores->node->inputs(0)))) continue;
      chain.push_back(scores);
      chain.push_back(kt);
      for (Step* s : chain) s->kind = Kind::kSkip;
      last.kind = Kind::kAttention;
      last.in = {scores->in[0], kt->in[0], last.in[1]};
      last.scale = scale;
      last.mask_cond = cond;
      last.mask_add = add;
      last.mask_fill = fill;
      ++fused_attention_;
    }
  }

  // A buffer for step i's output: last run's, when nobody else holds it any
  // more and it is large enough, else a new one. Reuse matters: a fresh
  // 512 KiB buffer costs 128 page faults on first touch.
  Tensor OutputBuffer(size_t i, Shape shape) { return Buffer(i, shape, DT_FLOAT32); }

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
  std::unique_ptr<KvCache> kv_;  // cache-aware graphs only
  absl::optional<KvStep> kv_step_;  // the run's step, once its metadata is checked
  std::vector<Step> steps_;
  std::vector<Tensor> constants_;  // weights in their slots, others empty
  std::vector<Tensor> scratch_;    // per step: its last output buffer
  // Most bytes of scratch_ kept between runs, and those kept now.
  static constexpr int64_t kScratchBudget = int64_t{32} << 20;
  int64_t scratch_bytes_ = 0;
  std::vector<std::vector<int>> release_after_;  // per step: slots it reads last
  std::vector<double> profile_;    // per step: ms in runs after the first (when profiling)
  std::atomic<int> runs_{0};  // Run calls so far
  int fused_attention_ = 0;
  int fused_elementwise_ = 0;
  int fused_norms_ = 0;
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
